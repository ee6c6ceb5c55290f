"""BoundedRing: the consistent-hash ring of one service (pure, no I/O).

The ring is built here with uhashring and exported as its sorted points and
their owners; lookups (the owner of a key, its failover order) run in the
native data plane on that export, so `ringmesh route` and every sidecar
agree by construction. The bounded-load choice is the data plane's too (it
needs the live in-flight counters). A ring is built once per topology
change and never mutated (uhashring mutates in place and is not
thread-safe): the sidecar builds a new one and swaps the reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from uhashring import HashRing

from sidecar.plane import RingExport, RingIndex

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
    """A fixed set of peers on a uhashring ring, exported for the data plane."""

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
        self._ring = HashRing(
            {p.id: {"instance": p, "weight": p.weight, "vnodes": vnodes} for p in self._list}
        )

    def __len__(self) -> int:
        return len(self._list)

    @property
    def members(self) -> tuple[Peer, ...]:
        """The peers in the order the export's owner indices refer to."""
        return self._list

    @cached_property
    def export(self) -> RingExport:
        """The sorted points (16-byte big-endian each) and each point's owner index."""
        index = {p.id: i for i, p in enumerate(self._list)}
        points = self._ring.get_points()
        return RingExport(
            points=b"".join(point.to_bytes(16, "big") for point, _ in points),
            owners=[index[node] for _, node in points],
            peers=len(self._list),
        )

    @cached_property
    def _index(self) -> RingIndex:
        return RingIndex(self.export)

    def owner(self, key: str) -> Peer | None:
        order = self.order(key)
        return order[0] if order else None

    def order(self, key: str) -> list[Peer]:
        """Every peer once, in ring order from ``key``: the owner, then the failover order."""
        if not self._list:
            return []
        return [self._list[i] for i in self._index.order(key)]

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
