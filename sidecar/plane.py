"""The sidecar's one seam to the native data plane (``dataplane/``, Rust).

Everything the data plane learns comes from here, as whole snapshots; what
it counts is read from here. Its tokio threads never call into Python: the
snapshot of the routing table is pushed, the counters are pulled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dataplane import DataPlane, RingLookup
from dataplane import build_profile as _build_profile

__all__ = ["NativePlane", "RingLookup", "build_profile"]
from registry.errors import ConfigError
from sidecar.config import SidecarConfig, join_hostport, split_hostport

if TYPE_CHECKING:
    from dataplane._native import SpanTuple
    from sidecar.ring import BoundedRing
    from sidecar.routing import RoutingTable


def build_profile() -> str:
    """'release' or 'debug': which build of the data plane is installed."""
    return _build_profile()


def _bind_address(address: str) -> str:
    host, port = split_hostport(address, what="address")
    if host == "localhost":
        host = "127.0.0.1"
    return join_hostport(host, port)


class NativePlane:
    """The data plane of one sidecar: its two ports, routing, retries and counters."""

    def __init__(self, config: SidecarConfig, *, tracing: bool) -> None:
        self._config = config
        self._installed: dict[str, BoundedRing] = {}  # the rings in the data plane, by service
        try:
            self._plane = DataPlane(
                service=config.service,
                app=config.app,
                idempotent=list(config.idempotent),
                tracing=tracing,
                log_level=logging.getLogger("ringmesh.dataplane").getEffectiveLevel(),
                tls_dir=config.tls_dir,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def start(self) -> tuple[int, int | None]:
        """Bind and serve; (outbound port, inbound port or None without an app)."""
        config = self._config
        inbound = _bind_address(config.inbound) if config.app is not None else None
        try:
            return self._plane.start(_bind_address(config.outbound), inbound)
        except OSError as exc:
            raise ConfigError(_user_address(str(exc), config)) from exc

    def install(self, table: RoutingTable) -> None:
        """Swap ``table`` in. A service whose ring is the very one installed last time
        (RoutingTable.build keeps the rings a change did not touch) is kept as the data
        plane has it: at 10,000 instances one change costs its own service, not all."""
        installed = self._installed
        changed = [
            (name, ring.instances, ring.lookup)
            for name, ring in table.rings.items()
            if installed.get(name) is not ring
        ]
        kept = [name for name, ring in table.rings.items() if installed.get(name) is ring]
        self._plane.install(
            changed,
            sorted(table.known),
            {grpc_service: sorted(owners) for grpc_service, owners in table.declared_by.items()},
            table.draining,
            table.revision,
            sorted(table.watching),
            kept,
        )
        self._installed = dict(table.rings)

    def set_authz(self, rules: Mapping[str, frozenset[str]]) -> None:
        """The authz/ records in force (no entry for a service: every mesh peer may call it)."""
        self._plane.set_authz({service: sorted(callers) for service, callers in rules.items()})

    def set_registered(self, registered: bool) -> None:
        self._plane.set_registered(registered)

    def set_draining(self) -> None:
        self._plane.set_draining()

    def app_up(self) -> bool:
        return self._plane.app_up()

    def calls_in_progress(self) -> int:
        return self._plane.calls_in_progress()

    def quiet_for(self) -> float:
        return self._plane.quiet_for()

    def busy_seconds(self) -> float:
        return self._plane.busy_seconds()

    def revision(self) -> int:
        return self._plane.revision()

    def stats(self) -> dict[str, Any]:
        return self._plane.stats()

    def take_spans(self) -> list[SpanTuple]:
        return self._plane.take_spans()

    def shutdown(self, grace: float) -> None:
        """GOAWAY, wait at most ``grace`` s for calls in flight, stop. Blocks: run it in a thread."""
        self._plane.shutdown(grace)


def _user_address(message: str, config: SidecarConfig) -> str:
    """The bind error names the address as the user wrote it (localhost, not 127.0.0.1)."""
    for address in (config.outbound, config.inbound):
        bound = _bind_address(address)
        if bound != address and f"cannot listen on {bound}:" in message:
            return message.replace(f"cannot listen on {bound}:", f"cannot listen on {address}:")
    return message
