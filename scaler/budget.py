"""A global replica budget (``--max-total-replicas``) shared by every scaled service.

``allocate`` runs after each service's own recommendation and only ever holds
scale-ups back; it never forces a running service down:

1. Every service first gets its floor, ``min(desired, max(min_replicas, current))``:
   a scale-down (or no change) gets exactly its desired count, a scale-up
   keeps at least what it runs now, and nobody drops below its minimum.
   If the floors alone exceed the budget they are granted anyway and the
   allocation says so (``over_budget``): shrinking running services to meet
   a budget is an operator's decision, not the scaler's.
2. What is left of the budget goes to the scale-ups one replica at a time,
   from a priority queue ordered by relative deficit
   ``(desired - granted) / desired``, largest first (ties by service name),
   never past a service's desired count. Handing out one replica at a time
   makes the result the water-filling one: no single replica moved from one
   service to another would lower the largest relative deficit.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from registry.errors import ConfigError


@dataclass(frozen=True)
class BudgetRequest:
    """One service's wish for this period: it runs ``current``, its policy wants ``desired``."""

    service: str
    current: int
    desired: int
    min_replicas: int = 0

    def __post_init__(self) -> None:
        for name in ("current", "desired", "min_replicas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{self.service}: {name} must be an integer >= 0, got {value!r}")

    @property
    def wanted(self) -> int:
        """The desired count, never below the service's minimum."""
        return max(self.desired, self.min_replicas)

    @property
    def floor(self) -> int:
        """What the service gets whatever the budget (see the module docstring)."""
        return min(self.wanted, max(self.min_replicas, self.current))


@dataclass(frozen=True)
class Allocation:
    """Replicas granted per service; ``capped`` are those granted less than they wanted."""

    granted: Mapping[str, int]
    capped: frozenset[str]
    max_total: int | None
    over_budget: bool = False

    @property
    def total(self) -> int:
        return sum(self.granted.values())

    def describe(self, service: str, wanted: int) -> str:
        """A human-readable note for a capped service's target reason."""
        granted = self.granted[service]
        note = f"global budget {self.max_total}: granted {granted} of {wanted}"
        if self.over_budget:
            note += " (minimums and running replicas alone exceed the budget)"
        return note


def allocate(requests: Iterable[BudgetRequest], max_total: int | None) -> Allocation:
    """Share ``max_total`` replicas among ``requests``; None means no budget at all."""
    wishes = list(requests)
    by_service: dict[str, BudgetRequest] = {}
    for request in wishes:
        if request.service in by_service:
            raise ValueError(f"service {request.service!r} requested twice")
        by_service[request.service] = request
    if max_total is None:
        return Allocation(
            granted={r.service: r.wanted for r in wishes}, capped=frozenset(), max_total=None
        )
    if isinstance(max_total, bool) or not isinstance(max_total, int) or max_total < 0:
        raise ConfigError(f"--max-total-replicas must be an integer >= 0, got {max_total!r}")

    granted = {r.service: r.floor for r in wishes}
    spare = max_total - sum(granted.values())
    over_budget = spare < 0

    # Largest relative deficit first; Fraction keeps equal deficits equal.
    queue = [
        (-_deficit(r, granted[r.service]), r.service)
        for r in wishes
        if granted[r.service] < r.wanted
    ]
    heapq.heapify(queue)
    while spare > 0 and queue:
        _, service = heapq.heappop(queue)
        granted[service] += 1
        spare -= 1
        request = by_service[service]
        if granted[service] < request.wanted:
            heapq.heappush(queue, (-_deficit(request, granted[service]), service))

    capped = frozenset(r.service for r in wishes if granted[r.service] < r.wanted)
    return Allocation(granted=granted, capped=capped, max_total=max_total, over_budget=over_budget)


def _deficit(request: BudgetRequest, granted: int) -> Fraction:
    return Fraction(request.wanted - granted, request.wanted)
