"""A mesh under test: LocalMesh on a test's etcd, plus what tests read from it."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from proto import demo_pb2_grpc
from registry.embedded import EmbeddedEtcd
from registry.etcd import EtcdClient, EtcdConfig
from registry.keys import KeyLayout
from registry.topology import Topology, read_topology
from ringmesh.localmesh import Instance, LocalMesh

__all__ = ["Instance", "Mesh", "stats"]


class Mesh(LocalMesh):
    def __init__(self, etcd: EmbeddedEtcd, *, prefix: str, logs: Path) -> None:
        super().__init__(etcd.url, prefix=prefix, logs=logs)
        self.etcd = etcd
        self.layout = KeyLayout(prefix)

    def topology(self) -> Topology:
        async def read() -> Topology:
            async with EtcdClient(EtcdConfig.from_urls(self.etcd.url)) as client:
                return await read_topology(client, self.layout)

        return asyncio.run(read())

    def channel(self, outbound: str) -> grpc.Channel:
        return grpc.insecure_channel(outbound)

    def stub(self, channel: grpc.Channel) -> demo_pb2_grpc.DemoStub:
        return demo_pb2_grpc.DemoStub(channel)


def stats(instance: Instance) -> dict[str, Any]:
    """What the instance's sidecar serves at /stats (its admin port)."""
    with urllib.request.urlopen(f"http://{instance.info['admin']}/stats", timeout=5) as response:
        doc: dict[str, Any] = json.loads(response.read())
        return doc
