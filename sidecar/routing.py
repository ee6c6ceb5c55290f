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
from registry.topology import Registered, Topology
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
    # What each ring was built from (the topology's instance map per service, by
    # identity) and the gRPC services each service declared: a rebuild skips both.
    _sources: Mapping[str, Mapping[str, Registered]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )
    _grpc_of: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )
    _draining_of: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )

    @property
    def draining(self) -> list[str]:
        """Addresses of instances registered but draining: not routed to, but their
        connections stay open while calls already sent there finish."""
        return sorted(a for addresses in self._draining_of.values() for a in addresses)

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
        """The table for ``topology``; with ``previous``, a service whose instance map is
        the very one the previous table was built from (TopologyWatch shares the maps of
        services a change did not touch) keeps its ring and declarations as they were."""
        watched = frozenset(watching)
        known = (set(previous.known) if previous else set()) | watched
        grpc_of: dict[str, frozenset[str]] = {}
        draining_of: dict[str, tuple[str, ...]] = {}
        rings: dict[str, BoundedRing] = {}
        for service, instances in topology.services.items():
            known.add(service)
            old = previous.rings.get(service) if previous else None
            if (
                previous is not None
                and old is not None
                and previous._sources.get(service) is instances
                and old.load_factor == load_factor
            ):
                rings[service], grpc_of[service] = old, previous._grpc_of[service]
                draining_of[service] = previous._draining_of[service]
                continue
            serving: list[Peer] = []
            declares: set[str] = set()
            draining: list[str] = []
            for entry in instances.values():
                record = entry.record
                declares.update(record.grpc_services)
                if record.serving:
                    serving.append(Peer(record.id, record.address, record.weight, record.zone))
                else:
                    draining.append(record.address)
            grpc_of[service] = frozenset(declares)
            draining_of[service] = tuple(draining)
            if old is not None and _same_peers(old, serving) and old.load_factor == load_factor:
                rings[service] = old  # unchanged: keep the ring, skip the rebuild
            else:
                rings[service] = BoundedRing(serving, vnodes=vnodes, load_factor=load_factor)
        declared: dict[str, set[str]] = {}
        for service, grpc_services in grpc_of.items():
            for grpc_service in grpc_services:
                declared.setdefault(grpc_service, set()).add(service)
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
            _sources=topology.services,
            _grpc_of=MappingProxyType(grpc_of),
            _draining_of=MappingProxyType(draining_of),
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
