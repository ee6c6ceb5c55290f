"""RoutingTable: which instances may serve each service, and who declares which gRPC service.

(Resolving a call's service from these is the data plane's: tested in Rust.)"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest

from registry.errors import MeshError, NoLiveInstance, UnknownService
from registry.records import DRAINING, SERVING, InstanceRecord
from registry.topology import Registered, Topology
from sidecar.ring import Peer
from sidecar.routing import RoutingTable


def rec(
    service: str,
    instance_id: str,
    *,
    port: int = 50051,
    state: str = SERVING,
    weight: int = 1,
    zone: str = "",
    grpc_services: tuple[str, ...] = (),
    unary_methods: tuple[str, ...] = (),
) -> InstanceRecord:
    return InstanceRecord(
        id=instance_id,
        service=service,
        address=f"{instance_id}.{service}:{port}",
        zone=zone,
        weight=weight,
        state=state,
        grpc_services=grpc_services,
        unary_methods=unary_methods,
    )


def topo(*records: InstanceRecord, revision: int = 10) -> Topology:
    return Topology.build(
        revision, [Registered(r, lease=0x100 + i, mod_revision=i) for i, r in enumerate(records)]
    )


def table(*records: InstanceRecord, previous: RoutingTable | None = None) -> RoutingTable:
    return RoutingTable.build(topo(*records), previous=previous)


ECHO = "demo.Echo"
ECHO_SVC = (ECHO, "grpc.health.v1.Health")


def test_empty_table_knows_nothing() -> None:
    routing = RoutingTable()
    assert routing.known == frozenset() and dict(routing.declared_by) == {}
    with pytest.raises(UnknownService, match="'echo'"):
        routing.ring("echo")


# -- ring / route ------------------------------------------------------------------


def test_ring_of_an_unknown_service_raises_unknown_service() -> None:
    routing = table(rec("echo", "e1"))
    with pytest.raises(UnknownService, match="unknown service 'billing'"):
        routing.ring("billing")
    with pytest.raises(UnknownService):
        routing.route("billing", "key")


def test_service_seen_before_but_now_empty_has_no_live_instance() -> None:
    first = table(rec("echo", "e1"), rec("billing", "b1"))
    second = table(rec("billing", "b1"), previous=first)
    assert "echo" in second.known
    with pytest.raises(NoLiveInstance) as info:
        second.ring("echo")
    assert str(info.value) == "no live instance of service 'echo'"
    with pytest.raises(NoLiveInstance):
        second.route("echo", "key")
    # Still known on the build after that: the memory does not fade after one build.
    third = table(rec("billing", "b1"), previous=second)
    with pytest.raises(NoLiveInstance):
        third.ring("echo")
    # Not "unknown": callers retry UNAVAILABLE, they do not retry UNIMPLEMENTED.
    assert not isinstance(info.value, UnknownService)
    assert isinstance(info.value, MeshError)


def test_draining_instances_are_not_in_the_ring() -> None:
    routing = table(
        rec("echo", "e1"),
        rec("echo", "e2", state=DRAINING),
        rec("echo", "e3"),
    )
    ring = routing.ring("echo")
    assert set(ring.peers) == {"e1", "e3"}
    for key in (f"k{i}" for i in range(200)):
        assert [p.id for p in routing.route("echo", key)] in (["e1", "e3"], ["e3", "e1"])


def test_all_instances_draining_means_no_live_instance() -> None:
    routing = table(rec("echo", "e1", state=DRAINING), rec("echo", "e2", state=DRAINING))
    assert "echo" in routing.known
    with pytest.raises(NoLiveInstance, match="no live instance of service 'echo'"):
        routing.ring("echo")


def test_ring_peers_carry_the_record_fields() -> None:
    routing = table(rec("echo", "e1", weight=3, zone="eu-1", port=7000))
    assert routing.ring("echo").peers == {
        "e1": Peer(id="e1", address="e1.echo:7000", weight=3, zone="eu-1")
    }


def test_route_is_owner_then_failover_order() -> None:
    routing = table(*(rec("echo", f"e{i}") for i in range(5)))
    ring = routing.ring("echo")
    for key in (f"user-{i}" for i in range(100)):
        order = routing.route("echo", key)
        assert order == ring.order(key)
        assert order[0] == ring.owner(key)
        assert len(order) == 5


def test_revision_comes_from_the_topology() -> None:
    routing = RoutingTable.build(topo(rec("echo", "e1"), revision=42))
    assert routing.revision == 42


# -- incremental builds -------------------------------------------------------------


def test_unchanged_rings_are_reused_across_builds() -> None:
    first = table(rec("echo", "e1"), rec("echo", "e2"), rec("billing", "b1"))
    # A new topology object, same serving peers for echo; billing gains an instance;
    # a draining echo instance does not change echo's ring either.
    second = table(
        rec("echo", "e2"),
        rec("echo", "e1"),
        rec("echo", "e9", state=DRAINING),
        rec("billing", "b1"),
        rec("billing", "b2"),
        previous=first,
    )
    assert second.rings["echo"] is first.rings["echo"]
    assert second.rings["billing"] is not first.rings["billing"]
    assert set(second.ring("billing").peers) == {"b1", "b2"}


@pytest.mark.parametrize(
    "changed",
    [
        rec("echo", "e1", weight=2),
        rec("echo", "e1", port=9999),
        rec("echo", "e1", zone="other"),
        rec("echo", "e1", state=DRAINING),
    ],
)
def test_a_changed_peer_rebuilds_the_ring(changed: InstanceRecord) -> None:
    first = table(rec("echo", "e1"), rec("echo", "e2"))
    second = table(changed, rec("echo", "e2"), previous=first)
    assert second.rings["echo"] is not first.rings["echo"]
    expected = {"e2"} if not changed.serving else {"e1", "e2"}
    assert set(second.ring("echo").peers) == expected
    if changed.serving:
        assert second.ring("echo").peers["e1"].address == changed.address
        assert second.ring("echo").peers["e1"].weight == changed.weight


def test_a_new_load_factor_rebuilds_the_ring() -> None:
    first = table(rec("echo", "e1"))
    second = RoutingTable.build(topo(rec("echo", "e1")), previous=first, load_factor=2.0)
    assert second.rings["echo"] is not first.rings["echo"]
    assert second.rings["echo"].load_factor == 2.0


def test_a_grpc_service_moved_to_another_service_follows_it() -> None:
    first = table(rec("echo", "e1", grpc_services=ECHO_SVC))
    both = table(
        rec("echo", "e1", grpc_services=ECHO_SVC),
        rec("talk", "t1", grpc_services=ECHO_SVC),
        previous=first,
    )
    assert both.declared_by[ECHO] == {"echo", "talk"}
    moved = table(rec("echo", "e2"), rec("talk", "t1", grpc_services=ECHO_SVC), previous=both)
    assert moved.declared_by[ECHO] == {"talk"}


def test_declarations_are_remembered_so_a_dead_service_still_resolves() -> None:
    first = table(rec("echo", "e1", grpc_services=ECHO_SVC), rec("billing", "b1"))
    second = table(rec("billing", "b1"), previous=first)
    # The path still resolves to echo, and routing it then says why it cannot be served.
    assert second.declared_by[ECHO] == {"echo"}
    with pytest.raises(NoLiveInstance):
        second.ring("echo")


def test_draining_instances_still_declare_their_services() -> None:
    routing = table(rec("echo", "e1", state=DRAINING, grpc_services=ECHO_SVC))
    assert routing.declared_by[ECHO] == {"echo"}


def test_build_does_not_mutate_the_previous_table() -> None:
    first = table(rec("echo", "e1", grpc_services=ECHO_SVC))
    snapshot = (dict(first.rings), first.known, dict(first.declared_by))
    table(rec("billing", "b1", grpc_services=(ECHO,)), previous=first)
    assert (dict(first.rings), first.known, dict(first.declared_by)) == snapshot


class _Watched(Mapping[str, Registered]):
    """An instance map that remembers whether anything read its entries."""

    def __init__(self, entries: Mapping[str, Registered]) -> None:
        self._entries = dict(entries)
        self.read = False

    def __getitem__(self, key: str) -> Registered:
        self.read = True
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        self.read = True
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def test_a_service_whose_instance_map_is_shared_is_not_looked_at_again() -> None:
    """TopologyWatch hands a new snapshot that shares the maps of untouched services:
    their rings, declarations and draining addresses are the previous table's, unread."""
    a1, a2 = rec("a", "a1", grpc_services=(ECHO,)), rec("a", "a2", state=DRAINING)
    b1, b2 = rec("b", "b1"), rec("b", "b2")
    listed = topo(a1, a2, b1)
    shared = _Watched(listed.services["a"])
    first = Topology(revision=10, services={"a": shared, "b": listed.services["b"]})
    before = RoutingTable.build(first)
    assert before.draining == [a2.address] and before.declared_by[ECHO] == {"a"}
    shared.read = False
    second = Topology(revision=11, services={"a": shared, "b": topo(b1, b2).services["b"]})
    after = RoutingTable.build(second, previous=before)
    assert not shared.read  # the untouched service was not even compared
    assert after.rings["a"] is before.rings["a"]
    assert after.rings["b"] is not before.rings["b"] and len(after.rings["b"]) == 2
    assert after.draining == [a2.address] and after.declared_by == before.declared_by
    # A fresh listing (new maps, same content) still reuses the rings by comparing peers.
    again = RoutingTable.build(topo(a1, a2, b1, b2), previous=after)
    assert again.rings["a"] is after.rings["a"] and again.rings["b"] is after.rings["b"]
