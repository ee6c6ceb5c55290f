"""Retry decisions, backoff and budget (sidecar/retry.py): every row of the rules."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from sidecar.attempts import Attempts, Target
from sidecar.retry import NOT_PROCESSED_HEADER, Outcome, RetryBudget, RetryPolicy, classify
from sidecar.stats import DataPlaneStats

U = grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("code", "details", "trailing", "expected"),
    [
        (U, "failed to connect to all addresses; last error: ...", (), Outcome.NEVER_SENT),
        (
            U,
            "ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused",
            (),
            Outcome.NEVER_SENT,
        ),
        (U, "Stream refused by server", (), Outcome.NEVER_SENT),
        (U, "anything", ((NOT_PROCESSED_HEADER, "1"),), Outcome.NOT_PROCESSED),
        (U, "anything", ((NOT_PROCESSED_HEADER, b"1"),), Outcome.NOT_PROCESSED),
        (U, "Socket closed", (), Outcome.UNAVAILABLE),
        (U, "Socket closed", ((NOT_PROCESSED_HEADER, "0"),), Outcome.UNAVAILABLE),
        (grpc.StatusCode.INTERNAL, "failed to connect to all addresses", (), Outcome.FINAL),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", (), Outcome.TIMED_OUT),
        (grpc.StatusCode.NOT_FOUND, "", ((NOT_PROCESSED_HEADER, "1"),), Outcome.FINAL),
    ],
)
def test_classify(
    code: grpc.StatusCode,
    details: str,
    trailing: tuple[tuple[str, str | bytes], ...],
    expected: Outcome,
) -> None:
    assert classify(code, details, trailing) is expected


@pytest.mark.parametrize(
    ("outcome", "idempotent", "retry"),
    [
        (Outcome.NEVER_SENT, False, True),
        (Outcome.NEVER_SENT, True, True),
        (Outcome.NOT_PROCESSED, False, True),
        (Outcome.NOT_PROCESSED, True, True),
        (Outcome.UNAVAILABLE, False, False),
        (Outcome.UNAVAILABLE, True, True),
        (Outcome.FINAL, False, False),
        (Outcome.FINAL, True, False),
    ],
)
def test_may_retry(outcome: Outcome, idempotent: bool, retry: bool) -> None:
    assert RetryPolicy().may_retry(outcome, idempotent=idempotent) is retry


def test_idempotent_globs_match_method_paths() -> None:
    policy = RetryPolicy(idempotent=("/shop.Catalog/*", "/shop.Orders/Get*"))
    assert policy.is_idempotent("/shop.Catalog/List")
    assert policy.is_idempotent("/shop.Orders/GetOrder")
    assert not policy.is_idempotent("/shop.Orders/PlaceOrder")
    assert not policy.is_idempotent("/shop.CatalogAdmin/Drop")
    assert not RetryPolicy().is_idempotent("/shop.Catalog/List")


def test_no_backoff_before_the_first_hop_to_another_instance() -> None:
    rng = random.Random(1)
    policy = RetryPolicy()
    assert policy.backoff(2, rng, new_instance=True) == 0.0
    # Same instance again, or a later attempt: the n-th retry waits up to
    # base x 2^(n-1) (full jitter), capped at 250 ms.
    for _ in range(200):
        assert 0.0 <= policy.backoff(2, rng, new_instance=False) <= 0.025
        assert 0.0 <= policy.backoff(3, rng, new_instance=True) <= 0.05
        assert 0.0 <= policy.backoff(5, rng, new_instance=True) <= 0.2
        assert 0.0 <= policy.backoff(10, rng, new_instance=True) <= 0.25
    samples = [policy.backoff(3, rng, new_instance=True) for _ in range(500)]
    assert max(samples) > 0.04 and min(samples) < 0.01, "full jitter spreads over [0, cap]"
    assert max(policy.backoff(10, rng, new_instance=True) for _ in range(500)) > 0.2


def test_budget_allows_twenty_percent_of_active_with_a_minimum_of_three() -> None:
    budget = RetryBudget(RetryPolicy())
    budget.active = 4
    assert [budget.try_acquire() for _ in range(4)] == [True, True, True, False]
    budget.release()
    assert budget.try_acquire()
    big = RetryBudget(RetryPolicy())
    big.active = 50
    assert sum(big.try_acquire() for _ in range(20)) == 10


def _budget(active: int) -> RetryBudget:
    budget = RetryBudget(RetryPolicy())
    for _ in range(active):
        budget.call_started()
    return budget


def test_a_retry_over_the_budget_waits_for_a_slot_in_arrival_order() -> None:
    async def scenario() -> None:
        budget = _budget(4)
        assert all([budget.try_acquire() for _ in range(3)])
        first = asyncio.create_task(budget.acquire(5.0))
        second = asyncio.create_task(budget.acquire(5.0))
        await asyncio.sleep(0.01)
        assert not first.done() and not second.done()
        assert not budget.try_acquire(), "nobody jumps the queue"
        budget.release()
        assert await first and not second.done()
        assert budget.retrying == 3
        budget.release()
        assert await second and budget.retrying == 3

    asyncio.run(scenario())


def test_a_waiting_retry_gives_up_after_its_wait_and_holds_nothing() -> None:
    async def scenario() -> None:
        budget = _budget(1)
        assert all([budget.try_acquire() for _ in range(3)])
        assert not await budget.acquire(0.0)
        assert not await budget.acquire(0.02)
        assert budget.retrying == 3
        for _ in range(3):
            budget.release()
        assert budget.retrying == 0 and await budget.acquire(0.0)

    asyncio.run(scenario())


def test_more_active_calls_let_a_waiting_retry_go() -> None:
    async def scenario() -> None:
        budget = _budget(15)  # limit max(3, 0.2 x 15) = 3
        assert all([budget.try_acquire() for _ in range(3)])
        waiting = asyncio.create_task(budget.acquire(5.0))
        await asyncio.sleep(0)
        budget.call_started()  # 16 active: limit 3 still
        await asyncio.sleep(0)
        assert not waiting.done()
        for _ in range(4):
            budget.call_started()  # 20 active: limit 4
        assert await waiting and budget.retrying == 4

    asyncio.run(scenario())


def test_a_call_cancelled_while_waiting_leaks_no_slot() -> None:
    async def scenario() -> None:
        budget = _budget(1)
        assert all([budget.try_acquire() for _ in range(3)])
        waiting = asyncio.create_task(budget.acquire(5.0))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        budget.release()
        assert budget.retrying == 2, "the slot is not handed to the cancelled call"

        # Handed over, then cancelled before it could run: the slot comes back.
        waiting = asyncio.create_task(budget.acquire(5.0))
        assert budget.try_acquire()
        await asyncio.sleep(0)
        budget.release()  # hands the slot to the waiting call...
        waiting.cancel()  # ...which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert budget.retrying == 2

    asyncio.run(scenario())


class _TwoTargets:
    """A plan over two instances (pure: no channel, no server)."""

    def __init__(self) -> None:
        self._targets = [Target("127.0.0.1:1", "a", "s"), Target("127.0.0.1:2", "b", "s")]
        self.idempotent = True
        self.service = "service 's'"

    def next(self) -> Target | None:
        return self._targets.pop(0) if self._targets else None


def test_a_retry_that_became_impossible_during_its_wait_is_not_counted() -> None:
    async def scenario() -> None:
        policy = RetryPolicy()
        budget = RetryBudget(policy)
        budget.call_started()
        stats = DataPlaneStats()
        attempts = Attempts(_TwoTargets(), policy, budget, stats, random.Random(1), 5.0)
        assert attempts.first() is not None
        # e.g. the caller streamed past the replay buffer during the backoff
        assert await attempts.retry(Outcome.NEVER_SENT, possible=lambda: False) is None
        assert attempts.count == 1 and sum(stats.retries.values()) == 0
        attempts.release()
        assert budget.retrying == 0 and budget.active == 0

    asyncio.run(scenario())


def test_only_a_deadline_before_any_response_is_a_timeout() -> None:
    async def scenario() -> None:
        attempts = Attempts(_TwoTargets(), None, None, DataPlaneStats(), random.Random(1), 0.0)
        assert attempts.ended(Outcome.CANCELLED) is Outcome.TIMED_OUT
        assert attempts.ended(Outcome.TIMED_OUT, responded=True) is Outcome.CANCELLED
        assert attempts.ended(Outcome.CANCELLED, responded=True) is Outcome.CANCELLED
        assert attempts.ended(None) is None
        later = Attempts(_TwoTargets(), None, None, DataPlaneStats(), random.Random(1), 5.0)
        assert later.ended(Outcome.CANCELLED) is Outcome.CANCELLED  # the caller left early

    asyncio.run(scenario())
