"""The election's lease budget over one leadership (Election.tenure), on a fake etcd
and a virtual clock: when a leadership ends by the clock it ends for good."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncGenerator
from typing import cast

from registry.election import Election, Tenure
from registry.etcd import EtcdClient, KeyValue, WatchEvent
from registry.keys import KeyLayout
from tests.unit.test_lease_keeper import synchronously

LAYOUT = KeyLayout("/t")
TTL = 4  # margin 1 s: a grant or refresh sent at t keeps us leading until t + 3


class VirtualTime:
    """A clock and a sleep for several tasks: time moves only in advance_to()."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._order), wake))
        await wake

    async def settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance_to(self, when: float) -> None:
        while True:
            await self.settle()
            if not self._sleepers or self._sleepers[0][0] > when:
                self.now = max(self.now, when)
                return
            at, _, wake = heapq.heappop(self._sleepers)
            self.now = max(self.now, at)
            if not wake.done():
                wake.set_result(None)


class FakeEtcd:
    """What Election calls, for one candidate; refreshes can be held, grants after the
    first wait until ``grants_open`` is set."""

    def __init__(self) -> None:
        self.revision = 1
        self.keys: dict[str, KeyValue] = {}
        self.deleted: dict[str, asyncio.Event] = {}
        self.leases = itertools.count(0xA)
        self.granted = 0
        self.grants_open = asyncio.Event()
        self.refresh_sent = asyncio.Event()
        self.release_refresh = asyncio.Event()
        self.release_refresh.set()

    async def grant_lease(self, ttl: int) -> int:
        if self.granted:
            await self.grants_open.wait()
        self.granted += 1
        return next(self.leases)

    async def refresh_lease(self, lease_id: int) -> int:
        self.refresh_sent.set()
        await self.release_refresh.wait()
        return TTL

    async def revoke_lease(self, lease_id: int) -> None:
        for key in [k for k, kv in self.keys.items() if kv.lease == lease_id]:
            del self.keys[key]
            self.revision += 1
            self.deleted.setdefault(key, asyncio.Event()).set()

    async def create(self, key: str, value: bytes, *, lease: int | None) -> int | None:
        if key in self.keys:
            return None
        self.revision += 1
        self.keys[key] = KeyValue(key, value, self.revision, self.revision, lease or 0)
        return self.revision

    async def get(self, key: str) -> KeyValue | None:
        return self.keys.get(key)

    async def get_prefix_by_create(self, prefix: str) -> tuple[list[KeyValue], int]:
        found = [kv for k, kv in self.keys.items() if k.startswith(prefix)]
        return sorted(found, key=lambda kv: kv.create_revision), self.revision

    async def watch_key(self, key: str, *, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        await self.deleted.setdefault(key, asyncio.Event()).wait()
        yield WatchEvent(key, None, self.revision, 0)


@synchronously
async def test_a_refresh_answered_after_the_budget_ran_out_does_not_bring_it_back() -> None:
    clock = VirtualTime()
    etcd = FakeEtcd()
    election = Election(
        cast(EtcdClient, etcd),
        LAYOUT,
        candidate_id="a",
        ttl=TTL,
        clock=clock,
        sleep=clock.sleep,
        retry_interval=0.1,
    )
    campaign = asyncio.create_task(election.campaign())
    await clock.advance_to(0.0)
    term = await asyncio.wait_for(campaign, 1)
    assert election.tenure == Tenure(term, since=0.0)
    assert election.is_leader and election.leading_until == 3.0

    # The refresh sent at t=1 (every (TTL - margin) / 3) is held up ...
    etcd.refresh_sent.clear()
    etcd.release_refresh.clear()
    await clock.advance_to(1.0)
    assert etcd.refresh_sent.is_set()
    # ... past the end of the budget, and answered before the step-down timer (due at
    # t=3) has run, as a late timer on a busy machine would let happen.
    clock.now = 3.5
    assert not election.is_leader
    assert election.tenure == Tenure(term, since=0.0, until=3.0)  # over by the clock
    etcd.release_refresh.set()
    await clock.settle()
    # The answer (sent at 1, TTL 4) would extend the budget to t=4: the leadership
    # does not come back to life; the candidacy is over and said so.
    assert not election.is_leader and election.term is None
    assert election.leader_lost.is_set()
    assert election.tenure == Tenure(term, since=0.0, until=3.0)
    assert election.key is None  # that key was given up (its lease is revoked)
    etcd.grants_open.set()
    await clock.advance_to(4.0)
    assert election.is_leader and election.term is not None and election.term > term
    tenure = election.tenure
    assert tenure is not None and tenure.since == 3.5 and tenure.until is None
    # The old term's end is still known, for a leader's code that looks only now.
    assert election.tenure_of(term) == Tenure(term, since=0.0, until=3.0)
    await election.aclose()
    assert election.tenure is not None and election.tenure.until == 4.0


@synchronously
async def test_a_resigned_leadership_ends_when_it_resigned() -> None:
    clock = VirtualTime()
    etcd = FakeEtcd()
    election = Election(
        cast(EtcdClient, etcd), LAYOUT, candidate_id="a", ttl=TTL, clock=clock, sleep=clock.sleep
    )
    campaign = asyncio.create_task(election.campaign())
    await clock.advance_to(2.5)
    term = await asyncio.wait_for(campaign, 1)
    assert election.tenure == Tenure(term, since=0.0)
    await election.resign()
    assert election.tenure == Tenure(term, since=0.0, until=2.5)
    assert etcd.keys == {}  # resigned first, then the key went
