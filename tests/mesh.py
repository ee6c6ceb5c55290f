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
from tests.waiting import until

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

    def seen_by(self, *instances: Instance, within: float = 5.0) -> None:
        """Wait until each instance's sidecar routes with every record registered now.

        ``add()`` returns once the new sidecar is registered; the others learn
        of it through their watch a moment later."""
        topology = self.topology()
        newest = max(
            (e.mod_revision for ids in topology.services.values() for e in ids.values()),
            default=0,
        )
        until(
            lambda: all(stats(i)["topology_revision"] >= newest for i in instances),
            within=within,
            what=f"every sidecar's topology at revision {newest}",
        )

    def channel(self, outbound: str) -> grpc.Channel:
        return grpc.insecure_channel(outbound)

    def stub(self, channel: grpc.Channel) -> demo_pb2_grpc.DemoStub:
        return demo_pb2_grpc.DemoStub(channel)


def stats(instance: Instance) -> dict[str, Any]:
    """What the instance's sidecar serves at /stats (its admin port)."""
    with urllib.request.urlopen(f"http://{instance.info['admin']}/stats", timeout=5) as response:
        doc: dict[str, Any] = json.loads(response.read())
        return doc
