"""The outbound side: the app's calls to its peers, routed by consistent hashing."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Mapping

import grpc

from registry.errors import InvalidName, NoLiveInstance, UnknownService
from sidecar.attempts import Target
from sidecar.ejection import Ejector
from sidecar.proxy import CallRejected, Metadata
from sidecar.retry import IDEMPOTENT_HEADER, Outcome, RetryPolicy
from sidecar.ring import BoundedRing, Peer
from sidecar.routing import HASH_KEY_HEADER, SERVICE_HEADER, RoutingTable
from sidecar.stats import DataPlaneStats

_FAILURES = frozenset({Outcome.UNAVAILABLE, Outcome.TIMED_OUT})  # count towards ejection


def _peer_id(peer: Peer) -> str:
    return peer.id


class RingPlan:
    """A call's targets: the bounded-load choice first, then the key's ring order
    (the same on every sidecar), skipping ejected peers and peers already tried."""

    __slots__ = (
        "_director",
        "_ejector",
        "_inflight",
        "_key",
        "_name",
        "_order",
        "_ring",
        "_tried",
        "idempotent",
        "service",
    )

    def __init__(
        self,
        director: OutboundDirector,
        service: str,
        ring: BoundedRing,
        key: str | None,
        idempotent: bool,
    ) -> None:
        self._director = director
        self._name = service
        self._inflight = director.inflight[service]
        self._ejector = director.ejector(service)
        self._ring = ring
        self._key = key
        self._order: list[Peer] | None = None
        self._tried: list[str] = []
        self.service = f"service {service!r}"
        self.idempotent = idempotent

    def next(self) -> Target | None:
        director = self._director
        if not self._tried:
            peer = director.first_choice(self._ring, self._key, self._inflight, self._ejector)
        else:
            if self._order is None:
                # The ring in force now: the topology may have changed since the
                # first attempt (an instance left, or started draining).
                ring = director.table.rings.get(self._name) or self._ring
                if self._key is not None:
                    order = ring.order(self._key)
                else:
                    order = list(ring.peers.values())
                    director.rng.shuffle(order)
                self._order = self._ejector.usable(order, _peer_id)
            untried = [p for p in self._order if p.id not in self._tried]
            if not untried:
                return None
            peer = untried[0]
        self._tried.append(peer.id)
        return Target(peer.address, peer.id, self._name)


class OutboundDirector:
    """Picks instances from the current RoutingTable (swapped whole on change)."""

    upstream_is_mesh = True  # the upstream is a peer's inbound sidecar

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        new_ejector: Callable[[], Ejector] | None = None,
        stats: DataPlaneStats | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.table = RoutingTable()
        # Instance ids are unique within a service only: load and ejection state
        # are kept per service.
        self.inflight: defaultdict[str, defaultdict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self._ejectors: dict[str, Ejector] = {}
        self._new_ejector = new_ejector or Ejector
        self.retry = retry or RetryPolicy()
        self.stats = stats or DataPlaneStats()
        self.rng = rng or random.Random()
        self._idempotent_cache: dict[str, bool] = {}
        self._reduced_rings: dict[tuple[int, frozenset[str]], BoundedRing] = {}

    def plan(self, method: str, metadata: Metadata) -> RingPlan:
        service: str | None = None
        key: str | None = None
        idempotent = False
        for name, value in metadata:
            if name == SERVICE_HEADER:
                service = value if isinstance(value, str) else value.decode(errors="replace")
            elif name == HASH_KEY_HEADER:
                key = value if isinstance(value, str) else value.decode(errors="replace")
            elif name == IDEMPOTENT_HEADER:
                idempotent = value in ("1", b"1")
        table = self.table
        try:
            name = table.resolve(service=service, method=method)
            ring = table.ring(name)
        except InvalidName as exc:
            raise CallRejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        except UnknownService as exc:
            raise CallRejected(grpc.StatusCode.UNIMPLEMENTED, str(exc)) from exc
        except NoLiveInstance as exc:
            raise CallRejected(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        if not idempotent:
            idempotent = self._is_idempotent(method)
        return RingPlan(self, name, ring, key, idempotent)

    def _is_idempotent(self, method: str) -> bool:
        known = self._idempotent_cache.get(method)
        if known is None:
            known = self.retry.is_idempotent(method)
            if len(self._idempotent_cache) < 4096:
                self._idempotent_cache[method] = known
        return known

    def ejector(self, service: str) -> Ejector:
        ejector = self._ejectors.get(service)
        if ejector is None:
            ejector = self._ejectors[service] = self._new_ejector()
        return ejector

    def first_choice(
        self, ring: BoundedRing, key: str | None, inflight: Mapping[str, int], ejector: Ejector
    ) -> Peer:
        """Bounded-load choice among the peers that are not ejected (all of them in panic)."""
        if ejector.has_ejections():
            ring = self._without_ejected(ring, ejector)
        if key is None:
            return ring.pick_two(inflight, self.rng)
        return ring.choose(key, inflight)

    def _without_ejected(self, ring: BoundedRing, ejector: Ejector) -> BoundedRing:
        usable = ejector.usable(list(ring.peers.values()), _peer_id)
        if len(usable) == len(ring):
            return ring
        cache_key = (id(ring), frozenset(p.id for p in usable))
        reduced = self._reduced_rings.get(cache_key)
        if reduced is None:
            if len(self._reduced_rings) > 64:
                self._reduced_rings.clear()
            reduced = BoundedRing(usable, load_factor=ring.load_factor)
            self._reduced_rings[cache_key] = reduced
        return reduced

    def set_table(self, table: RoutingTable) -> None:
        self.table = table
        self._reduced_rings.clear()
        for service, ejector in list(self._ejectors.items()):
            ring = table.rings.get(service)
            ejector.forget(set(ring.peers) if ring is not None else set())

    def started(self, target: Target) -> None:
        self.inflight[target.service][target.peer_id] += 1

    def finished(self, target: Target, outcome: Outcome | None) -> None:
        peer_id = target.peer_id
        loads = self.inflight[target.service]
        left = loads[peer_id] - 1
        if left > 0:
            loads[peer_id] = left
        else:
            del loads[peer_id]
        ejector = self.ejector(target.service)
        if outcome is None:
            ejector.succeeded(peer_id)
        elif outcome is Outcome.NEVER_SENT or outcome is Outcome.NOT_PROCESSED:
            # Unreachable, or its app is: as good as a connect failure.
            if ejector.connect_failed(peer_id):
                self.stats.ejections += 1
        elif outcome in _FAILURES and ejector.failed(peer_id):
            # Like Envoy's consecutive gateway failures (502/503/504): a peer that
            # hangs every call is ejected too, not only one that refuses them.
            self.stats.ejections += 1

    def failure_metadata(self, outcome: Outcome) -> Metadata:
        return ()
