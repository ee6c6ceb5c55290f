"""Instances (a demo app and its sidecar) on this machine, started through the CLI.

One implementation for `ringmesh up`, the tests and the benchmarks.
Every process started is stopped by ``close()``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from registry.keys import DEFAULT_PREFIX
from ringmesh.procs import Child, demo_app, sidecar, stop_all


@dataclass
class Instance:
    name: str
    service: str
    app: Child
    app_port: int
    sidecar: Child
    info: dict[str, Any]  # the sidecar's announced addresses

    @property
    def outbound(self) -> str:
        return str(self.info["outbound"])

    @property
    def address(self) -> str:
        return str(self.info["address"])

    @property
    def admin(self) -> str:
        return str(self.info["admin"])


class LocalMesh:
    def __init__(
        self, etcd_url: str, *, prefix: str = DEFAULT_PREFIX, logs: Path | None = None
    ) -> None:
        self.etcd_url = etcd_url
        self.prefix = prefix
        self.logs = logs
        self.children: list[Child] = []
        self.instances: dict[str, Instance] = {}
        self._files: list[IO[bytes]] = []
        self._numbers: dict[str, itertools.count[int]] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _log(self, name: str) -> IO[bytes] | None:
        if self.logs is None:
            return None
        f = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in close()
        self._files.append(f)
        return f

    def log_text(self, name: str) -> str:
        assert self.logs is not None
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def next_name(self, service: str) -> str:
        counter = self._numbers.setdefault(service, itertools.count(1))
        while True:
            name = f"{service}-{next(counter)}"
            if name not in self.instances:
                return name

    def add(
        self,
        service: str,
        name: str | None = None,
        *extra: str,
        wait: bool = True,
        env: dict[str, str] | None = None,
    ) -> Instance:
        """Start a demo app and its sidecar; by default wait until it is registered."""
        name = name or self.next_name(service)
        app = demo_app(name, stderr=self._log(f"app-{name}"))
        self.children.append(app)
        port = int(app.wait_event("listening")["port"])
        side = sidecar(
            service, f"127.0.0.1:{port}", self.etcd_url,
            "--prefix", self.prefix, "--instance-id", name, *extra,
            name=f"sidecar {name}", stderr=self._log(f"sidecar-{name}"), env=env,
        )  # fmt: skip
        self.children.append(side)
        info = side.wait_event("registered" if wait else "listening")
        instance = Instance(name, service, app, port, side, info)
        self.instances[name] = instance
        return instance

    def close(self) -> None:
        stop_all(self.children, timeout=10)
        self.children.clear()
        for f in self._files:
            f.close()
        self._files.clear()
