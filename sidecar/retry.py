"""Retry decisions: when a failed attempt may be sent again, and when to wait.

A call is retried on the next ring instance when it provably never reached
the app (connect failure, refused stream, ``ringmesh-not-processed``); any
other UNAVAILABLE only for idempotent methods. At most 3 attempts, never past
the caller's deadline, full-jitter backoff (25 ms base, 250 ms cap) except
before the first hop to a different instance, and a retry budget of 20% of
active calls (at least 3 retrying calls at once; a retry over it waits its
turn for at most 1 s) so a dying cluster is not hammered.
"""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import random
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

NOT_PROCESSED_HEADER = "ringmesh-not-processed"
IDEMPOTENT_HEADER = "ringmesh-idempotent"
ATTEMPTS_HEADER = "ringmesh-attempts"

# What gRPC core says when no connection could be made, or the stream was
# refused before the server saw it: the request was never processed.
_NEVER_SENT_MARKERS = (
    "failed to connect to all addresses",
    "Failed to connect to remote host",
    "Connection refused",
    "REFUSED_STREAM",
    "Stream refused",
)


class Outcome(enum.Enum):
    """Why an attempt failed, as far as retrying is concerned."""

    NEVER_SENT = "connect"  # connect failure or refused stream
    NOT_PROCESSED = "not_processed"  # the inbound sidecar could not reach its app
    UNAVAILABLE = "unavailable"  # may or may not have been processed
    TIMED_OUT = "timed_out"  # the deadline passed upstream: not retried, counts as a failure
    FINAL = "final"  # an answer from the app: never retried
    CANCELLED = "cancelled"  # the caller left or its deadline passed: says nothing of the peer


def classify(
    code: grpc.StatusCode, details: str, trailing: Iterable[tuple[str, str | bytes]]
) -> Outcome:
    if code != grpc.StatusCode.UNAVAILABLE:
        return Outcome.TIMED_OUT if code == grpc.StatusCode.DEADLINE_EXCEEDED else Outcome.FINAL
    for key, value in trailing:
        if key == NOT_PROCESSED_HEADER and value in ("1", b"1"):
            return Outcome.NOT_PROCESSED
    if any(marker in details for marker in _NEVER_SENT_MARKERS):
        return Outcome.NEVER_SENT
    return Outcome.UNAVAILABLE


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_base: float = 0.025
    backoff_cap: float = 0.25
    budget_ratio: float = 0.2
    budget_min: int = 3
    # How long a retry over the budget waits for a slot (never past the deadline):
    # long enough for the first retries of a dead instance's calls to finish.
    budget_wait: float = 1.0
    stream_buffer_bytes: int = 64 * 1024
    idempotent: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # One compiled regex for all globs: matched once per method, then cached.
        object.__setattr__(
            self,
            "_idempotent_re",
            re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in self.idempotent))
            if self.idempotent
            else None,
        )

    def is_idempotent(self, method: str) -> bool:
        pattern: re.Pattern[str] | None = self.__dict__["_idempotent_re"]
        return pattern is not None and pattern.match(method) is not None

    def may_retry(self, outcome: Outcome, *, idempotent: bool) -> bool:
        if outcome in (Outcome.NEVER_SENT, Outcome.NOT_PROCESSED):
            return True
        return outcome is Outcome.UNAVAILABLE and idempotent

    def backoff(self, attempt: int, rng: random.Random, *, new_instance: bool) -> float:
        """Seconds to wait before attempt number ``attempt`` (2 = the first retry)."""
        if attempt <= 2 and new_instance:
            return 0.0  # the first hop to a different instance goes at once
        # The n-th retry (attempt n + 1) waits up to base x 2^(n-1): 25, 50, 100 ... ms.
        return rng.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 2)))


class RetryBudget:
    """Retries in flight may not exceed max(budget_min, budget_ratio x active calls).

    A retry over the budget waits its turn (first come, first served) for a
    bounded time instead of failing at once: the instance that just died had
    every caller's call in flight, so its callers all retry at the same
    instant, and turning the fourth one away would fail a call that a moment
    later had somewhere to go. Waiting costs the peers nothing, so the cap on
    concurrent retries still protects a dying cluster.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self._ratio = policy.budget_ratio
        self._min = policy.budget_min
        self.active = 0
        self.retrying = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def limit(self) -> int:
        return max(self._min, int(self._ratio * self.active))

    def call_started(self) -> None:
        self.active += 1
        self._hand_over()

    def call_ended(self) -> None:
        self.active -= 1

    def try_acquire(self) -> bool:
        if self._waiters or self.retrying >= self.limit():
            return False
        self.retrying += 1
        return True

    async def acquire(self, wait: float) -> bool:
        """Take a retry slot, waiting at most ``wait`` seconds for one to free."""
        if self.try_acquire():
            return True
        if wait <= 0:
            return False
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(turn)  # a timeout must not cancel the turn itself
        except TimeoutError:
            pass
        except BaseException:  # the call was cancelled while waiting
            if turn.done():
                self.release()
            raise
        finally:
            if not turn.done():
                turn.cancel()
                self._waiters.remove(turn)
        # The slot may have been handed over just as the wait ran out: keep it.
        return not turn.cancelled()

    def release(self) -> None:
        self.retrying -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and self.retrying < self.limit():
            self.retrying += 1
            self._waiters.popleft().set_result(None)
