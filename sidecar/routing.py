"""Routing state: which service a call is for, and which instances may serve it.

``RoutingTable`` is an immutable snapshot built from a Topology off the hot
path; ``route()`` is the pure view shared by the sidecar and `ringmesh route`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from registry.errors import NoLiveInstance, UnknownService
from registry.keys import validate_service
from registry.topology import Topology
from sidecar.ring import DEFAULT_LOAD_FACTOR, DEFAULT_VNODES, BoundedRing, Peer

SERVICE_HEADER = "ringmesh-service"
HASH_KEY_HEADER = "ringmesh-hash-key"


def grpc_service_of(method: str) -> str:
    """``/pkg.Svc/Method`` -> ``pkg.Svc`` ('' if the path is malformed)."""
    parts = method.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "" else ""


@dataclass(frozen=True)
class RoutingTable:
    """Rings of serving instances per service, and which services declare which gRPC services."""

    rings: Mapping[str, BoundedRing] = field(default_factory=lambda: MappingProxyType({}))
    # Services ever seen by this process: one whose instances are all gone is
    # "no live instance" (UNAVAILABLE, retryable), not "unknown". Declarations
    # and unary methods follow the registered records (see build()).
    known: frozenset[str] = frozenset()
    declared_by: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))
    unary_methods: frozenset[str] = frozenset()
    revision: int = 0

    @classmethod
    def build(
        cls,
        topology: Topology,
        *,
        previous: RoutingTable | None = None,
        vnodes: int = DEFAULT_VNODES,
        load_factor: float = DEFAULT_LOAD_FACTOR,
    ) -> RoutingTable:
        known = set(previous.known) if previous else set()
        declared: dict[str, set[str]] = {}
        unary: set[str] = set()
        rings: dict[str, BoundedRing] = {}
        for service, instances in topology.services.items():
            known.add(service)
            serving: list[Peer] = []
            for entry in instances.values():
                record = entry.record
                for grpc_service in record.grpc_services:
                    declared.setdefault(grpc_service, set()).add(service)
                unary.update(record.unary_methods)
                if record.serving:
                    serving.append(Peer(record.id, record.address, record.weight, record.zone))
            old = previous.rings.get(service) if previous else None
            if old is not None and _same_peers(old, serving) and old.load_factor == load_factor:
                rings[service] = old  # unchanged: keep the ring, skip the rebuild
            else:
                rings[service] = BoundedRing(serving, vnodes=vnodes, load_factor=load_factor)
        if previous is not None:
            # The registered records are the truth: a gRPC service moved to another
            # service, or a method no longer unary, follows them. A gRPC service
            # nobody registered declares now keeps its last declaration, so a
            # call for it is "no live instance" (retryable), not "unknown".
            now = set(declared) | {grpc_service_of(m) for m in unary}
            for grpc_service, owners in previous.declared_by.items():
                if grpc_service not in now:
                    declared[grpc_service] = set(owners)
            unary.update(m for m in previous.unary_methods if grpc_service_of(m) not in now)
        return cls(
            rings=MappingProxyType(rings),
            known=frozenset(known),
            declared_by=MappingProxyType({k: frozenset(v) for k, v in declared.items()}),
            unary_methods=frozenset(unary),
            revision=topology.revision,
        )

    def resolve(self, *, service: str | None, method: str) -> str:
        """The callee service of a call: metadata first, then the gRPC service in the path.

        Raises InvalidName for a malformed name, UnknownService when nothing matches.
        """
        if service is not None:
            validate_service(service)
            if service not in self.known:
                raise UnknownService(f"unknown service {service!r}")
            return service
        grpc_service = grpc_service_of(method)
        owners = self.declared_by.get(grpc_service, frozenset())
        if len(owners) == 1:
            return next(iter(owners))
        if len(owners) > 1:
            names = ", ".join(sorted(owners))
            raise UnknownService(
                f"gRPC service {grpc_service!r} is served by several services ({names}): "
                f"set the '{SERVICE_HEADER}' metadata"
            )
        raise UnknownService(
            f"unknown service for {method!r}: no registered service declares {grpc_service!r}; "
            f"set the '{SERVICE_HEADER}' metadata"
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
