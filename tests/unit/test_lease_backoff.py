"""Backoff (exponential, full jitter) alone, LeaseKeeper retrying with it, and hedging a
refresh that hangs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import statistics
from collections.abc import Callable
from typing import cast

import pytest

from registry.errors import MeshError
from registry.etcd import EtcdClient
from registry.lease import MIN_RETRY_LIMIT, Backoff, LeaseKeeper
from tests.unit.test_lease_keeper import Harness, longest, synchronously
from tests.waiting import eventually

# --- Backoff, pure ---------------------------------------------------------------------


def test_the_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    backoff = Backoff(base=0.25, cap=5.0, random_source=longest)
    assert [backoff.next() for _ in range(9)] == [0.25, 0.5, 1, 2, 4, 5, 5, 5, 5]
    assert backoff.failures == 9


def test_delays_are_spread_over_the_whole_range_below_each_ceiling() -> None:
    # Full jitter: attempt n waits uniform(0, ceiling n). 2,000 clients failing together
    # (each its own random source): within the bounds, mean ~ceiling/2, and both ends
    # of the range are reached, so no two groups of clients stay in step.
    rngs = [random.Random(seed) for seed in range(2000)]
    clients = [Backoff(random_source=rng.random) for rng in rngs]
    for ceiling in (0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0):
        delays = [client.next() for client in clients]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert statistics.fmean(delays) == pytest.approx(ceiling / 2, rel=0.05)
        assert min(delays) < 0.01 * ceiling and max(delays) > 0.99 * ceiling
        # As uniform as that: each tenth of the range holds 10% (+-3 points) of them.
        tenths = [0] * 10
        for d in delays:
            tenths[min(9, int(d / ceiling * 10))] += 1
        assert all(140 <= n <= 260 for n in tenths), tenths


def test_reset_starts_again_from_the_base() -> None:
    backoff = Backoff(base=0.25, cap=5.0, random_source=longest)
    for _ in range(6):
        backoff.next()
    assert backoff.ceiling() == 5.0
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.ceiling() == 0.25
    assert [backoff.next() for _ in range(3)] == [0.25, 0.5, 1.0]


def test_it_never_gives_up_and_never_exceeds_the_cap() -> None:
    rng = random.Random(7)
    backoff = Backoff(base=0.25, cap=5.0, random_source=rng.random)
    delays = [backoff.next() for _ in range(100_000)]  # 2**100000 would overflow a float
    assert backoff.failures == 100_000
    assert all(0.0 <= d <= 5.0 for d in delays)
    assert max(delays[-1000:]) > 4.9  # still at the cap, not stuck at 0 or the base


def test_a_limit_lowers_the_ceiling_but_still_counts_a_failure() -> None:
    backoff = Backoff(base=0.25, cap=5.0, random_source=longest)
    for _ in range(5):
        backoff.next()
    assert backoff.ceiling() == 5.0
    assert backoff.ceiling(limit=1.5) == 1.5
    assert backoff.ceiling(limit=-1.0) == 0.0
    assert backoff.next(limit=1.5) == 1.5
    assert backoff.failures == 6
    assert backoff.next(limit=100.0) == 5.0  # a limit never raises it


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(MeshError, match="base"):
        Backoff(base=0.0)
    with pytest.raises(MeshError, match="base"):
        Backoff(base=6.0, cap=5.0)
    with pytest.raises(MeshError, match="random source"):
        Backoff(random_source=lambda: 1.5).next()


def test_a_fleet_that_failed_together_comes_back_spread_out() -> None:
    # 1,000 clients fail from t=0 (etcd gone) and etcd is back at t=30. With the old
    # fixed 0.5 s retry every one of them would arrive within 0.5 s of it. With the
    # backoff, each arrives within the cap (5 s), and no 0.5 s holds more than a quarter
    # (the forward wait of a renewal process with uniform(0, 5) gaps is triangular on
    # [0, 5]: 19% in its first 0.5 s).
    back = 30.0
    arrivals = []
    for seed in range(1000):
        backoff = Backoff(random_source=random.Random(seed).random)
        t = 0.0
        while t < back:
            t += backoff.next()
        arrivals.append(t - back)
    assert max(arrivals) <= 5.0
    arrivals.sort()
    busiest = max(sum(1 for a in arrivals if start <= a < start + 0.5) for start in arrivals)
    assert busiest <= 250, busiest
    assert statistics.fmean(arrivals) > 1.0  # ~5/3 s for the triangle


# --- LeaseKeeper's retries -------------------------------------------------------------


@synchronously
async def test_a_long_outage_backs_off_to_the_cap_and_a_success_resets_it() -> None:
    h = Harness(ttl=9)
    await h.keeper.put("/k/a", b"A")
    h.start()
    await h.until(1)
    h.etcd.down = True
    await h.until(60)
    failed = [c.at for c in h.etcd.calls if c.op.endswith("-failed")]
    gaps = [b - a for a, b in itertools.pairwise(failed)]
    assert max(gaps) == 5.0  # the cap
    assert gaps[-5:] == [5.0] * 5  # and it stays there: it never gives up
    assert h.keeper.lease_id is None  # 59 s down: the lease is lost
    h.etcd.down = False
    await h.until(66)
    second = h.keeper.lease_id
    assert second is not None and h.keeper.granted.is_set()
    # A new outage starts from the base again: retries 0.25 s, then 0.5 s after it.
    await h.until(70)
    h.etcd.down = True
    await h.until(80)
    await h.stop()
    again = [c.at for c in h.etcd.calls if c.op == "refresh-failed" and c.at > 66]
    assert [round(b - a, 6) for a, b in itertools.pairwise(again[:3])] == [0.25, 0.5]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("back_at", [3.5, 5.0, 7.0, 8.5, 8.9])
@synchronously
async def test_an_outage_that_ends_before_the_lease_never_costs_it(
    seed: int, back_at: float
) -> None:
    # The lease was granted at t=0 (TTL 9) and etcd is down from t=1 (the refresh at 3
    # fails) until ``back_at``: whatever the jitter, a refresh comes before t=9.
    h = Harness(ttl=9, backoff=Backoff(random_source=random.Random(seed).random))
    await h.keeper.put("/k/a", b"A")
    h.start()
    await h.until(0.5)
    first = h.keeper.lease_id
    assert first is not None
    h.etcd.down = True
    await h.until(back_at)
    h.etcd.down = False
    await h.until(12)
    await h.stop()
    assert h.keeper.lease_id == first and h.keeper.grants == 1
    refreshed = [c.at for c in h.etcd.ops("refresh")]
    assert refreshed and back_at <= refreshed[0] < 9.0
    h.assert_never_put_without_lease()


@synchronously
async def test_near_the_end_of_a_lease_retries_come_at_least_every_min_retry_limit() -> None:
    h = Harness(ttl=9)  # the longest delays the backoff allows
    await h.keeper.put("/k/a", b"A")
    h.start()
    await h.until(1)
    h.etcd.down = True
    await h.until(9.5)
    await h.stop()
    failed = [c.at for c in h.etcd.calls if c.op == "refresh-failed"]
    # Each retry within half the time left (0 + 9 - t), or MIN_RETRY_LIMIT near the end.
    for a, b in itertools.pairwise(failed):
        assert b - a <= max(MIN_RETRY_LIMIT, (9 - a) / 2) + 1e-9
    assert 9 - MIN_RETRY_LIMIT <= failed[-1] < 9 + MIN_RETRY_LIMIT


@synchronously
async def test_after_a_short_blip_the_refresh_comes_within_a_second() -> None:
    # etcd down from t=2.9 to t=4: failures at 3, 3.25, 3.75 (longest delays), then the
    # next try at 4.75 at the latest succeeds, with the records put again.
    h = Harness(ttl=9)
    await h.keeper.put("/k/a", b"A")
    h.start()
    await h.until(2.9)
    first = h.keeper.lease_id
    h.etcd.down = True
    await h.keeper.put("/k/a", b"A2")  # fails: must be written on reconnect
    await h.until(4)
    h.etcd.down = False
    await h.until(5)
    await h.stop()
    ok = [c.at for c in h.etcd.ops("refresh")]
    assert ok and 4.0 <= ok[0] <= 4.75
    assert h.keeper.lease_id == first and h.etcd.store["/k/a"] == (b"A2", first)


# --- hedged refreshes (real time: TTL 2, the least there is) ---------------------------


class HangingEtcd:
    """Refreshes hang (as on a member that is stopped) unless ``answering`` says which
    ones answer: by their number, from 1."""

    def __init__(self, answering: set[int]) -> None:
        self.answering = answering
        self.refreshes = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.cancelled = 0
        self.grants = 0

    async def grant_lease(self, ttl: int) -> int:
        self.grants += 1
        return 0x100 + self.grants

    async def put(self, key: str, value: bytes, *, lease: int | None) -> int:
        return 1

    async def revoke_lease(self, lease_id: int) -> None:
        return None

    async def refresh_lease(self, lease_id: int) -> int:
        self.refreshes += 1
        if self.refreshes in self.answering:
            return 2
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        raise AssertionError("unreachable")


async def _keep(etcd: HangingEtcd, done: Callable[[], bool]) -> tuple[LeaseKeeper, float]:
    """Run a keeper (TTL 2) until ``done()``; it and how long that took."""
    keeper = LeaseKeeper(cast(EtcdClient, etcd), ttl=2)
    await keeper.put("/k/a", b"A")
    task = asyncio.create_task(keeper.run())
    took = await eventually(done, within=10, what="the keeper", task=task, interval=0.005)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return keeper, took


@synchronously
async def test_a_refresh_that_hangs_is_hedged_and_the_lease_kept() -> None:
    # The refresh at 0.67 s (TTL/3) hangs; with 1.33 s left, another goes out at 1.33 s
    # and answers: the lease is kept, the hanging one cancelled.
    etcd = HangingEtcd(answering={2, 3, 4, 5, 6})
    keeper, took = await _keep(etcd, lambda: etcd.refreshes >= 2)
    assert took >= 1.3
    assert etcd.grants == 1 and keeper.grants == 1 and keeper.lease_id == 0x101
    await asyncio.sleep(0)
    assert etcd.cancelled == 1 and etcd.in_flight == 0


@synchronously
async def test_refreshes_that_all_hang_lose_the_lease_in_time_with_three_at_most() -> None:
    etcd = HangingEtcd(answering=set())
    keeper, took = await _keep(etcd, lambda: etcd.grants >= 2)
    # Lost 2 s after the grant by our count, though no refresh has answered (nor failed).
    assert 2.0 <= took < 3.0
    assert keeper.grants == 2 and keeper.lease_id == 0x102
    assert etcd.most_in_flight == 3
    await asyncio.sleep(0)
    assert etcd.refreshes >= 3 and etcd.cancelled == etcd.refreshes and etcd.in_flight == 0
