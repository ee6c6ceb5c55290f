"""BoundedRing: the consistent-hash ring of one service (pure, no I/O).

The ring is built by the native data plane (``RingLookup.build``: uhashring
2.5's construction, point for point, checked against uhashring itself in
tests/unit/test_ring.py) and handed to it whole; lookups (the owner of a
key, its failover order) and shares run on that same value, so `ringmesh
route` and every sidecar agree by construction. The bounded-load choice is
the data plane's too (it needs the live in-flight counters). A ring is built
once per topology change and never mutated: the sidecar builds a new one and
swaps the reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from sidecar.plane import RingLookup

DEFAULT_VNODES = 160  # uhashring's default: points per unit of weight
DEFAULT_LOAD_FACTOR = 1.25


@dataclass(frozen=True)
class Peer:
    """One routable instance: the ring's node is its stable id."""

    id: str
    address: str
    weight: int = 1
    zone: str = ""


class BoundedRing:
    """A fixed set of peers on their ring (peer ``i`` of ``members`` is the ring's peer ``i``)."""

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
        self._list = tuple(self.peers.values())
        self.lookup = RingLookup.build([(p.id, p.weight) for p in self._list], vnodes)

    def __len__(self) -> int:
        return len(self._list)

    @property
    def members(self) -> tuple[Peer, ...]:
        """The peers in the ring's order (peer ``i`` is the ring's owner index ``i``)."""
        return self._list

    @cached_property
    def instances(self) -> list[tuple[str, str, int]]:
        """(id, address, weight) of each member, as ``DataPlane.install`` takes them; built
        once per ring, so installing a table whose other rings did not change is cheap."""
        return [(p.id, p.address, p.weight) for p in self._list]

    def owner(self, key: str) -> Peer | None:
        order = self.order(key)
        return order[0] if order else None

    def order(self, key: str) -> list[Peer]:
        """Every peer once, in ring order from ``key``: the owner, then the failover order."""
        if not self._list:
            return []
        return [self._list[i] for i in self.lookup.order(key)]

    def shares(self) -> dict[str, float]:
        """Fraction of the hash space each peer owns (what `ringmesh topology` prints)."""
        return dict(zip(self.peers, self.lookup.shares(), strict=True))
