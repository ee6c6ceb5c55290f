"""One call's attempts: its targets in order (a Plan), and its retry state (Attempts).

Attempts counts what was tried, carries the caller's deadline to each
attempt, holds the call's slot in the retry budget, and waits out backoffs;
the retry decisions themselves are the pure rules of ``sidecar.retry``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sidecar.retry import Outcome, RetryBudget, RetryPolicy
from sidecar.stats import DataPlaneStats

_MAX_CONNECT_WAIT = 1.0  # a peer that has not connected within this is a connect failure


@dataclass(frozen=True, slots=True)
class Target:
    address: str
    peer_id: str = ""  # unique within its service
    service: str = ""


class Plan(Protocol):
    """The targets of one call, in the order to try them."""

    idempotent: bool
    service: str  # what the call is for, in error messages: "service 'x'", "the app"

    def next(self) -> Target | None: ...


class Attempts:
    """One call's retry state: attempts made, deadline, budget, backoff."""

    __slots__ = (
        "_budget",
        "_deadline",
        "_loop",
        "_policy",
        "_retrying",
        "_rng",
        "_stats",
        "count",
        "plan",
        "target",
    )

    def __init__(
        self,
        plan: Plan,
        policy: RetryPolicy | None,
        budget: RetryBudget | None,
        stats: DataPlaneStats,
        rng: random.Random,
        remaining: float | None,
    ) -> None:
        self.plan = plan
        self._policy = policy
        self._budget = budget
        self._stats = stats
        self._rng = rng
        self._loop = asyncio.get_running_loop()
        self._deadline = None if remaining is None else self._loop.time() + remaining
        self._retrying = False
        self.count = 0
        self.target: Target | None = None

    def first(self) -> Target | None:
        self.target = self.plan.next()
        if self.target is not None:
            self.count = 1
        return self.target

    def timeout(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self._loop.time())

    def ended(self, result: Outcome | None, *, responded: bool = False) -> Outcome | None:
        """How an attempt ended, for the director: cut off by the caller's deadline
        before any response is a timeout (the peer did not answer in time), not a
        caller leaving; a stream that was answering until its deadline is fine."""
        if result is Outcome.CANCELLED and self.timeout() == 0.0:
            result = Outcome.TIMED_OUT
        if result is Outcome.TIMED_OUT and responded:
            return Outcome.CANCELLED
        return result

    def connect_wait(self) -> float:
        left = self.timeout()
        return _MAX_CONNECT_WAIT if left is None else min(_MAX_CONNECT_WAIT, left / 2)

    async def retry(
        self, outcome: Outcome, *, possible: Callable[[], bool] | None = None
    ) -> Target | None:
        """The next target after a failed attempt, after its backoff; None to give up.

        ``possible`` is asked last, after every wait: a stream that can no longer
        be replayed ends here, before the retry is counted.
        """
        policy, budget = self._policy, self._budget
        if policy is None or budget is None or self.count >= policy.max_attempts:
            return None
        if not policy.may_retry(outcome, idempotent=self.plan.idempotent):
            return None
        previous = self.target
        target = self.plan.next()
        if target is None:
            return None
        if not self._retrying:
            # One slot per retrying call, kept until the call ends.
            if not budget.try_acquire():
                # Over the budget: wait for a slot, for a bounded time.
                left = self.timeout()
                wait = policy.budget_wait if left is None else min(policy.budget_wait, left)
                if wait > 0:
                    self._stats.retry_budget_waits += 1
                if not await budget.acquire(wait):
                    self._stats.retry_budget_exhausted += 1
                    return None
            self._retrying = True
            self._stats.retries_in_flight_peak = max(
                self._stats.retries_in_flight_peak, budget.retrying
            )
        delay = policy.backoff(
            self.count + 1,
            self._rng,
            new_instance=previous is None or target.peer_id != previous.peer_id,
        )
        if self._deadline is not None and self._loop.time() + delay >= self._deadline:
            return None
        if delay:
            await asyncio.sleep(delay)
        if possible is not None and not possible():
            return None
        self._stats.retries[outcome.value] += 1
        self.count += 1
        self.target = target
        return target

    def release(self) -> None:
        if self._budget is not None:
            self._budget.call_ended()
            if self._retrying:
                self._budget.release()
        self._stats.attempts += self.count
