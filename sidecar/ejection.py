"""Outlier ejection (pure, clock-injected): which peers to skip for new attempts.

A connect failure (the peer or its app unreachable) ejects a peer at once;
5 consecutive failures eject it for 30 s x its ejection count (at most
300 s). A peer ejected as unreachable returns as soon as a health probe
passes, since the probe shows exactly that it is reachable again. One
ejected for failing calls (UNAVAILABLE, timeouts) serves its time: its
sidecar answers SERVING while its app hangs, so a probe proves nothing.
Each cause keeps its own multiplier, one less for every 30 s back in
rotation (as Envoy's): a flapping app does not make a later ejection for
failing calls last five minutes.
If more than half the peers are ejected, ejections are ignored (panic
mode): better to try a suspect peer than to fail for sure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass
class _PeerHealth:
    consecutive_failures: int = 0
    # Recent ejections, per cause: each multiplies its cause's next ejection
    # time. A probe cuts an unreachable ejection short, so a flapping app must
    # not make a later ejection for failing calls last minutes.
    unreachable_ejections: int = 0
    failure_ejections: int = 0
    ejected_until: float = 0.0
    unreachable: bool = False  # ejected because it could not be reached


class Ejector:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        consecutive: int = 5,
        base_seconds: float = 30.0,
        cap_seconds: float = 300.0,
    ) -> None:
        self._clock = clock
        self._consecutive = consecutive
        self._base = base_seconds
        self._cap = cap_seconds
        self._peers: dict[str, _PeerHealth] = {}
        self.ejection_count = 0  # total ejections, for telemetry

    def _eject(self, peer: _PeerHealth, *, unreachable: bool) -> None:
        now = self._clock()
        if peer.ejected_until:
            # As Envoy's multiplier: one less for each base period back in rotation.
            healthy = max(0, int((now - peer.ejected_until) // self._base))
            peer.unreachable_ejections = max(0, peer.unreachable_ejections - healthy)
            peer.failure_ejections = max(0, peer.failure_ejections - healthy)
        if unreachable:
            peer.unreachable_ejections += 1
            count = peer.unreachable_ejections
        else:
            peer.failure_ejections += 1
            count = peer.failure_ejections
        peer.unreachable = unreachable
        peer.consecutive_failures = 0
        peer.ejected_until = now + min(self._cap, self._base * count)
        self.ejection_count += 1

    def connect_failed(self, peer_id: str) -> bool:
        """The peer refused or could not be reached: eject it now. True if newly ejected."""
        peer = self._peers.setdefault(peer_id, _PeerHealth())
        if self.is_ejected(peer_id):
            return False
        self._eject(peer, unreachable=True)
        return True

    def failed(self, peer_id: str) -> bool:
        """A failed call; the ``consecutive``-th in a row ejects. True if newly ejected."""
        peer = self._peers.setdefault(peer_id, _PeerHealth())
        peer.consecutive_failures += 1
        if peer.consecutive_failures < self._consecutive:
            return False
        if self.is_ejected(peer_id):
            # Reached anyway (panic mode, last resort) and failing: a probe of its
            # sidecar no longer says enough to bring it back.
            peer.unreachable = False
            return False
        self._eject(peer, unreachable=False)
        return True

    def succeeded(self, peer_id: str) -> None:
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.consecutive_failures = 0

    def probe_passed(self, peer_id: str) -> None:
        """A passing health probe brings back a peer ejected as unreachable."""
        peer = self._peers.get(peer_id)
        if peer is not None and peer.unreachable:
            peer.ejected_until = 0.0
            peer.consecutive_failures = 0

    def has_ejections(self) -> bool:
        """Is any peer ejected now? (Cheap when no peer ever failed.)"""
        if not self._peers:
            return False
        now = self._clock()
        return any(p.ejected_until > now for p in self._peers.values())

    def is_ejected(self, peer_id: str) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.ejected_until > self._clock()

    def ejected(self) -> list[str]:
        now = self._clock()
        return [pid for pid, p in self._peers.items() if p.ejected_until > now]

    def awaiting_probe(self) -> list[str]:
        """The ejected peers a passing health probe would bring back."""
        now = self._clock()
        return [pid for pid, p in self._peers.items() if p.ejected_until > now and p.unreachable]

    def usable(self, peers: Sequence[T], peer_id: Callable[[T], str]) -> list[T]:
        """``peers`` without the ejected ones, in order; all of them in panic mode."""
        if not self._peers:
            return list(peers)
        kept = [p for p in peers if not self.is_ejected(peer_id(p))]
        if len(peers) - len(kept) > len(peers) / 2:
            return list(peers)  # panic mode
        return kept

    def forget(self, keep: set[str]) -> None:
        """Drop state of peers that left the topology."""
        self._peers = {k: v for k, v in self._peers.items() if k in keep}
