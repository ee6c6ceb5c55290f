"""BoundedRing: consistent hashing with bounded loads, on uhashring (pure, no I/O).

A ring is built once per topology change and never mutated (uhashring
mutates in place and is not thread-safe): the sidecar builds a new one and
swaps the reference.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from uhashring import HashRing

DEFAULT_VNODES = 160
DEFAULT_LOAD_FACTOR = 1.25
_HASH_SPACE = 1 << 128  # uhashring's default hash is md5


@dataclass(frozen=True)
class Peer:
    """One routable instance: the ring's node is its stable id."""

    id: str
    address: str
    weight: int = 1
    zone: str = ""


class BoundedRing:
    """Owner lookup, failover order and bounded-load choice over a fixed set of peers."""

    def __init__(
        self,
        peers: Iterable[Peer],
        *,
        vnodes: int = DEFAULT_VNODES,
        load_factor: float = DEFAULT_LOAD_FACTOR,
    ) -> None:
        if load_factor < 1.0:
            raise ValueError(f"load factor must be >= 1, got {load_factor}")
        self.peers: dict[str, Peer] = {p.id: p for p in sorted(peers, key=lambda p: p.id)}
        self.load_factor = load_factor
        # Exact integer maths for the bound: float rounding let a peer take one
        # call over ceil(c x average) (e.g. weights 3 and 14, 67 in flight).
        self._lf_num, self._lf_den = (
            Fraction(load_factor).limit_denominator(10_000).as_integer_ratio()
        )
        self._list = tuple(self.peers.values())
        self._total_weight = sum(p.weight for p in self._list)
        self._ring = HashRing(
            {p.id: {"instance": p, "weight": p.weight, "vnodes": vnodes} for p in self._list}
        )

    def __len__(self) -> int:
        return len(self._list)

    def owner(self, key: str) -> Peer | None:
        node = self._ring.get(key)
        return None if node is None else node["instance"]

    def order(self, key: str) -> list[Peer]:
        """Every peer once, in ring order from ``key``: the owner, then the failover order."""
        if not self._list:
            return []
        return [node["instance"] for node in self._ring.range(key)]

    def capacity(self, peer: Peer, total_inflight: int) -> int:
        """Most calls ``peer`` may hold once one more call is placed (weighted bound)."""
        numerator = self._lf_num * (total_inflight + 1) * peer.weight
        return -(-numerator // (self._lf_den * self._total_weight))

    def choose(self, key: str, inflight: Mapping[str, int]) -> Peer:
        """The first peer in ring order from ``key`` that is below its bounded load."""
        if not self._list:
            raise LookupError("empty ring")
        total = sum(inflight.get(p.id, 0) for p in self._list)
        owner = self.owner(key)
        assert owner is not None
        if inflight.get(owner.id, 0) < self.capacity(owner, total):
            return owner
        for node in self._ring.range(key):
            peer: Peer = node["instance"]
            if inflight.get(peer.id, 0) < self.capacity(peer, total):
                return peer
        return owner  # unreachable: the loads cannot all be above their bounds

    def pick_two(self, inflight: Mapping[str, int], rng: random.Random) -> Peer:
        """Unkeyed calls: the less loaded (per weight) of two random peers."""
        if not self._list:
            raise LookupError("empty ring")
        if len(self._list) == 1:
            return self._list[0]
        a, b = rng.sample(self._list, 2)
        if inflight.get(b.id, 0) * a.weight < inflight.get(a.id, 0) * b.weight:
            return b
        return a

    def shares(self) -> dict[str, float]:
        """Fraction of the hash space each peer owns (what `ringmesh topology` prints)."""
        points = self._ring.get_points()
        owned = {p.id: 0 for p in self._list}
        if not points:
            return {k: 0.0 for k in owned}
        previous = points[-1][0] - _HASH_SPACE
        for point, node in points:
            owned[node] += point - previous
            previous = point
        return {k: v / _HASH_SPACE for k, v in owned.items()}
