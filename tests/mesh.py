"""A mesh under test: demo apps and sidecars started through the CLI, always stopped."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import grpc

from proto import demo_pb2_grpc
from registry.embedded import EmbeddedEtcd
from registry.etcd import EtcdClient, EtcdConfig
from registry.keys import KeyLayout
from registry.topology import Topology, read_topology
from ringmesh.procs import Child, demo_app, sidecar

_names = itertools.count(1)


@dataclass
class Instance:
    name: str
    service: str
    app: Child
    sidecar: Child
    info: dict[str, Any]

    @property
    def outbound(self) -> str:
        return str(self.info["outbound"])

    @property
    def address(self) -> str:
        return str(self.info["address"])


class Mesh:
    def __init__(self, etcd: EmbeddedEtcd, *, prefix: str, logs: Path) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.layout = KeyLayout(prefix)
        self.logs = logs
        self.children: list[Child] = []
        self._files: list[IO[bytes]] = []
        self.instances: dict[str, Instance] = {}

    def __enter__(self) -> Mesh:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                child.stop(timeout=10)
        for f in self._files:
            f.close()

    def _log(self, name: str) -> IO[bytes]:
        f = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in close()
        self._files.append(f)
        return f

    def log_text(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def start_app(self, name: str) -> Child:
        app = demo_app(name, stderr=self._log(f"app-{name}"))
        self.children.append(app)
        return app

    def start_sidecar(self, service: str, name: str, app_port: int, *extra: str) -> Child:
        child = sidecar(
            service, f"127.0.0.1:{app_port}", self.etcd.url,
            "--prefix", self.prefix, "--instance-id", name, *extra,
            name=f"sidecar {name}", stderr=self._log(f"sidecar-{name}"),
        )  # fmt: skip
        self.children.append(child)
        return child

    def add(
        self, service: str = "echo", name: str | None = None, *extra: str, wait: bool = True
    ) -> Instance:
        """Start a demo app and its sidecar; by default wait until it is registered."""
        name = name or f"{service}-{next(_names)}"
        app = self.start_app(name)
        port = app.wait_event("listening")["port"]
        side = self.start_sidecar(service, name, port, *extra)
        info = side.wait_event("registered" if wait else "listening")
        instance = Instance(name, service, app, side, info)
        self.instances[name] = instance
        return instance

    def topology(self) -> Topology:
        async def read() -> Topology:
            async with EtcdClient(EtcdConfig.from_urls(self.etcd.url)) as client:
                return await read_topology(client, self.layout)

        return asyncio.run(read())

    def channel(self, outbound: str) -> grpc.Channel:
        return grpc.insecure_channel(outbound)

    def stub(self, channel: grpc.Channel) -> demo_pb2_grpc.DemoStub:
        return demo_pb2_grpc.DemoStub(channel)
