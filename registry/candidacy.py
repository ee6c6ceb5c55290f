"""The pure part of the election: who stands where in the queue, and how long a lease
can be trusted. No I/O; ``registry.election`` drives it against etcd."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from registry.errors import MeshError
from registry.etcd import KeyValue
from registry.keys import KeyLayout


def election_prefix(layout: KeyLayout, name: str = "scaler") -> str:
    """``<prefix>/election/<name>/``: every candidate's key is directly under it."""
    return layout.election(name)


# --- the pure core: the queue of candidates, and how long a lease can be trusted -------


@dataclass(frozen=True)
class Candidate:
    """One key under the election prefix; ``term`` is its create revision."""

    id: str
    key: str
    term: int
    lease: int

    @classmethod
    def from_kv(cls, kv: KeyValue) -> Candidate:
        return cls(kv.value.decode(errors="replace"), kv.key, kv.create_revision, kv.lease)


def queue(kvs: Iterable[KeyValue]) -> list[Candidate]:
    """The candidates in election order: lowest create revision (the leader) first."""
    return sorted((Candidate.from_kv(kv) for kv in kvs), key=lambda c: c.term)


@dataclass(frozen=True)
class Standing:
    """Where one candidate stands: ``ahead`` is the key it waits on, None if it leads."""

    ahead: Candidate | None

    @property
    def leading(self) -> bool:
        return self.ahead is None


def standing(candidates: Sequence[Candidate], key: str, term: int) -> Standing | None:
    """Our place in ``candidates``; None when our key (with this create revision) is gone."""
    if not any(c.key == key and c.term == term for c in candidates):
        return None
    earlier = [c for c in candidates if c.term < term]
    return Standing(max(earlier, key=lambda c: c.term) if earlier else None)


@dataclass
class LeaseBudget:
    """Until when, by our clock, the lease is surely alive in etcd (less a safety margin).

    etcd restarts a lease's TTL when it handles a refresh, which is after we sent it:
    counting from the send time never overestimates.
    """

    ttl: int
    margin: float
    valid_until: float = float("-inf")

    def __post_init__(self) -> None:
        if self.ttl < 2:
            raise MeshError(f"lease TTL must be at least 2 s, got {self.ttl}")
        if not 0 <= self.margin < self.ttl:
            raise MeshError(f"safety margin must be in [0, {self.ttl}) s, got {self.margin}")

    @property
    def span(self) -> float:
        """How long one successful refresh keeps us trusting the lease."""
        return self.ttl - self.margin

    @property
    def refresh_interval(self) -> float:
        """Refresh often enough that two refreshes may fail before the budget runs out."""
        return self.span / 3

    def renewed(self, sent_at: float, ttl: int) -> None:
        """A grant or refresh sent at ``sent_at`` succeeded with ``ttl`` seconds."""
        self.valid_until = max(self.valid_until, sent_at + min(ttl, self.ttl) - self.margin)

    def valid(self, now: float) -> bool:
        return now < self.valid_until

    def left(self, now: float) -> float:
        return self.valid_until - now
