"""Retry decisions, backoff and budget (sidecar/retry.py): every row of the rules."""

from __future__ import annotations

import random

import grpc
import pytest

from sidecar.retry import NOT_PROCESSED_HEADER, Outcome, RetryBudget, RetryPolicy, classify

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
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", (), Outcome.FINAL),
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
    # Same instance again, or a later attempt: full jitter up to base x 2^(n-1), capped.
    for _ in range(200):
        assert 0.0 <= policy.backoff(2, rng, new_instance=False) <= 0.05
        assert 0.0 <= policy.backoff(3, rng, new_instance=True) <= 0.1
        assert 0.0 <= policy.backoff(10, rng, new_instance=True) <= 0.25
    samples = [policy.backoff(3, rng, new_instance=True) for _ in range(500)]
    assert max(samples) > 0.08 and min(samples) < 0.02, "full jitter spreads over [0, cap]"


def test_budget_allows_twenty_percent_of_active_with_a_minimum_of_three() -> None:
    budget = RetryBudget(RetryPolicy())
    budget.active = 4
    assert [budget.try_acquire() for _ in range(4)] == [True, True, True, False]
    budget.release()
    assert budget.try_acquire()
    big = RetryBudget(RetryPolicy())
    big.active = 50
    assert sum(big.try_acquire() for _ in range(20)) == 10
