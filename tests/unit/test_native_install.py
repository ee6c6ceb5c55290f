"""The data plane's install: a routing table in, services a change did not touch kept as
they are (the Rust side is dataplane/src/plane.rs; its tests cover the counters)."""

from __future__ import annotations

from typing import Any

import pytest

from registry.records import InstanceRecord
from registry.topology import Registered, Topology
from sidecar.config import SidecarConfig
from sidecar.plane import NativePlane
from sidecar.routing import RoutingTable


def _topology(**services: int) -> Topology:
    entries = [
        Registered(
            InstanceRecord(id=f"{name}-{i}", service=name, address=f"127.0.0.1:{9000 + i}"),
            lease=1,
            mod_revision=1,
        )
        for name, count in services.items()
        for i in range(count)
    ]
    return Topology.build(1, entries)


class _Recording:
    """The native DataPlane, with the names each install sent and kept written down."""

    def __init__(self, native: Any) -> None:
        self._native = native
        self.installs: list[tuple[list[str], list[str]]] = []

    def install(self, services: list[tuple[str, Any, Any]], *rest: Any) -> None:
        self.installs.append(([name for name, _, _ in services], list(rest[-1])))
        self._native.install(services, *rest)


def test_a_change_sends_only_the_changed_service_and_keeps_the_others() -> None:
    plane = NativePlane(SidecarConfig(service="client", app=None), tracing=False)
    recording = _Recording(plane._plane)
    plane._plane = recording  # type: ignore[assignment]
    topology = _topology(a=3, b=2)
    table = RoutingTable.build(topology)
    plane.install(table)
    joined = Registered(InstanceRecord(id="b-9", service="b", address="127.0.0.1:9"), 1, 2)
    plane.install(RoutingTable.build(topology.changed(2, "b", "b-9", joined), previous=table))
    assert recording.installs == [(["a", "b"], []), (["b"], ["a"])]


def test_keeping_a_service_the_data_plane_does_not_have_is_refused() -> None:
    plane = NativePlane(SidecarConfig(service="client", app=None), tracing=False)
    with pytest.raises(ValueError, match="cannot keep the routes of service nosuch"):
        plane._plane.install([], [], {}, [], 1, [], ["nosuch"])
