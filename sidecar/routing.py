"""Routing state: which instances may serve each service, and which services
declare which gRPC services.

``RoutingTable`` is an immutable snapshot built from a Topology off the hot
path and pushed whole into the data plane, which resolves each call's
service and picks its instance; ``route()`` (the owner of a key, then the
failover order) runs the data plane's own ring lookup, so `ringmesh route`
and the sidecars agree by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from registry.errors import NoLiveInstance, UnknownService
from registry.topology import Topology
from sidecar.ring import DEFAULT_LOAD_FACTOR, DEFAULT_VNODES, BoundedRing, Peer


@dataclass(frozen=True)
class RoutingTable:
    """Rings of serving instances per service, and which services declare which gRPC services."""

    rings: Mapping[str, BoundedRing] = field(default_factory=lambda: MappingProxyType({}))
    # Services ever seen by this process: one whose instances are all gone is
    # "no live instance" (UNAVAILABLE, retryable), not "unknown". Declarations
    # follow the registered records (see build()).
    known: frozenset[str] = frozenset()
    declared_by: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))
    revision: int = 0
    # The services a scoped sidecar watches (--watch); empty: the whole mesh. A watched
    # service with no instance is "no live instance"; any other is unknown here.
    watching: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        topology: Topology,
        *,
        previous: RoutingTable | None = None,
        watching: Iterable[str] = (),
        vnodes: int = DEFAULT_VNODES,
        load_factor: float = DEFAULT_LOAD_FACTOR,
    ) -> RoutingTable:
        watched = frozenset(watching)
        known = (set(previous.known) if previous else set()) | watched
        declared: dict[str, set[str]] = {}
        rings: dict[str, BoundedRing] = {}
        for service, instances in topology.services.items():
            known.add(service)
            serving: list[Peer] = []
            for entry in instances.values():
                record = entry.record
                for grpc_service in record.grpc_services:
                    declared.setdefault(grpc_service, set()).add(service)
                if record.serving:
                    serving.append(Peer(record.id, record.address, record.weight, record.zone))
            old = previous.rings.get(service) if previous else None
            if old is not None and _same_peers(old, serving) and old.load_factor == load_factor:
                rings[service] = old  # unchanged: keep the ring, skip the rebuild
            else:
                rings[service] = BoundedRing(serving, vnodes=vnodes, load_factor=load_factor)
        if previous is not None:
            # The registered records are the truth: a gRPC service moved to another
            # service follows them. A gRPC service nobody registered declares now
            # keeps its last declaration, so a call for it is "no live instance"
            # (retryable), not "unknown".
            for grpc_service, owners in previous.declared_by.items():
                if grpc_service not in declared:
                    declared[grpc_service] = set(owners)
        return cls(
            rings=MappingProxyType(rings),
            known=frozenset(known),
            declared_by=MappingProxyType({k: frozenset(v) for k, v in declared.items()}),
            revision=topology.revision,
            watching=watched,
        )

    def ring(self, service: str) -> BoundedRing:
        ring = self.rings.get(service)
        if ring is None or not len(ring):
            if service not in self.known:
                raise UnknownService(f"unknown service {service!r}")
            raise NoLiveInstance(f"no live instance of service {service!r}")
        return ring

    def route(self, service: str, key: str) -> list[Peer]:
        """The owner of ``key`` first, then the failover order (the same on every sidecar)."""
        return self.ring(service).order(key)


def _same_peers(ring: BoundedRing, peers: Iterable[Peer]) -> bool:
    new = {p.id: p for p in peers}
    return new == ring.peers
