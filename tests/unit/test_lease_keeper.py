"""LeaseKeeper against a fake etcd, a fake clock and a sleep that advances it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ParamSpec, cast

import pytest

from registry.errors import EtcdError, EtcdUnavailable, MeshError
from registry.etcd import EtcdClient
from registry.lease import Backoff, LeaseKeeper

P = ParamSpec("P")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let other tasks (the test driver) run


@dataclass
class Call:
    at: float
    op: str
    lease: int | None = None
    key: str | None = None
    value: bytes | None = None


@dataclass
class FakeEtcd:
    """Just the lease part of EtcdClient, with switches to make it misbehave."""

    clock: FakeClock
    down: bool = False  # every call raises EtcdUnavailable
    fail_puts: bool = False
    calls: list[Call] = field(default_factory=list)
    store: dict[str, tuple[bytes, int | None]] = field(default_factory=dict)
    live: set[int] = field(default_factory=set)
    next_lease: int = 0x1000
    refresh_latency: float = 0.0  # seconds between sending a refresh and its reply
    # Hooks run inside a call, to act "while the request is in flight".
    after_put: Callable[[], Awaitable[None]] | None = None
    before_grant_returns: Callable[[], Awaitable[None]] | None = None

    def expire(self, lease_id: int) -> None:
        """What etcd does when a lease runs out: the lease and its keys are gone."""
        self.live.discard(lease_id)
        for key in [k for k, (_, lease) in self.store.items() if lease == lease_id]:
            del self.store[key]

    def _check(self, op: str) -> None:
        if self.down:
            self.calls.append(Call(self.clock.now, f"{op}-failed"))
            raise EtcdUnavailable(f"etcd {op}: unavailable (fake)")

    async def grant_lease(self, ttl: int) -> int:
        self._check("grant")
        lease = self.next_lease
        self.next_lease += 1
        if self.before_grant_returns is not None:
            await self.before_grant_returns()
        self.live.add(lease)
        self.calls.append(Call(self.clock.now, "grant", lease))
        return lease

    async def refresh_lease(self, lease_id: int) -> int:
        self._check("refresh")
        self.calls.append(Call(self.clock.now, "refresh", lease_id))
        if self.refresh_latency:
            await self.clock.sleep(self.refresh_latency)
        if lease_id not in self.live:
            return 0
        return 10

    async def put(self, key: str, value: bytes, *, lease: int | None) -> int:
        self._check("put")
        if self.fail_puts:
            raise EtcdError("etcd put: fake refusal")
        if lease is not None and lease not in self.live:
            raise EtcdError("etcd put: requested lease not found")
        self.calls.append(Call(self.clock.now, "put", lease, key, value))
        self.store[key] = (value, lease)
        if self.after_put is not None:
            hook, self.after_put = self.after_put, None
            await hook()
        return len(self.calls)

    async def revoke_lease(self, lease_id: int) -> None:
        self._check("revoke")
        self.calls.append(Call(self.clock.now, "revoke", lease_id))
        self.expire(lease_id)

    def ops(self, op: str) -> list[Call]:
        return [c for c in self.calls if c.op == op]


def longest() -> float:
    """A random source that always gives the backoff's longest delay: a fixed schedule."""
    return 1.0


class Harness:
    def __init__(self, *, ttl: int = 9, backoff: Backoff | None = None) -> None:
        self.clock = FakeClock()
        self.etcd = FakeEtcd(self.clock)
        self.new_leases: list[tuple[float, int]] = []
        self.keeper = LeaseKeeper(
            cast(EtcdClient, self.etcd),
            ttl=ttl,
            clock=self.clock,
            sleep=self.clock.sleep,
            on_new_lease=self._on_new_lease,
            backoff=backoff if backoff is not None else Backoff(random_source=longest),
        )
        self.task: asyncio.Task[None] | None = None

    async def _on_new_lease(self, lease_id: int) -> None:
        self.new_leases.append((self.clock.now, lease_id))

    def start(self) -> None:
        self.task = asyncio.create_task(self.keeper.run())

    async def until(self, when: float) -> None:
        """Let run() go on until the fake clock has reached ``when``."""
        assert self.task is not None
        for _ in range(100_000):
            if self.clock.now >= when or self.task.done():
                break
            await asyncio.sleep(0)
        else:
            raise AssertionError(f"fake clock stuck at {self.clock.now}")
        if self.task.done():
            self.task.result()  # surface a crash of run()

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def assert_never_put_without_lease(self) -> None:
        puts = self.etcd.ops("put")
        assert all(c.lease is not None for c in puts), puts
        granted = {c.lease for c in self.etcd.ops("grant")}
        assert all(c.lease in granted for c in puts)


def synchronously(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test on a fresh event loop (no pytest-asyncio here)."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def test_ttl_below_two_is_rejected() -> None:
    with pytest.raises(MeshError, match="at least 2"):
        LeaseKeeper(cast(EtcdClient, object()), ttl=1)


@synchronously
async def test_put_before_a_lease_waits_for_the_grant() -> None:
    h = Harness()
    await h.keeper.put("/k/a", b"A")
    assert h.etcd.ops("put") == []  # nothing written without a lease
    assert h.keeper.lease_id is None and not h.keeper.granted.is_set()
    h.start()
    await h.until(1)
    lease = h.keeper.lease_id
    assert lease is not None and h.keeper.granted.is_set()
    assert h.etcd.store == {"/k/a": (b"A", lease)}
    # Once granted, a put goes out at once under the lease.
    await h.keeper.put("/k/b", b"B")
    assert h.etcd.store["/k/b"] == (b"B", lease)
    assert h.new_leases == [(0.0, lease)]
    assert h.keeper.grants == 1
    await h.stop()
    h.assert_never_put_without_lease()


@synchronously
async def test_refreshes_every_third_of_the_ttl() -> None:
    h = Harness(ttl=9)
    await h.keeper.put("/k/a", b"A")
    h.start()
    await h.until(31)
    await h.stop()
    refreshes = h.etcd.ops("refresh")
    assert [c.at for c in refreshes] == [3.0 * i for i in range(1, 11)]
    lease = h.etcd.ops("grant")[0].lease
    assert {c.lease for c in refreshes} == {lease}
    assert len(h.etcd.ops("grant")) == 1
    assert len(h.etcd.ops("put")) == 1  # healthy refreshes do not rewrite the records
    assert h.keeper.grants == 1


@synchronously
async def test_ttl_zero_means_a_new_lease_and_every_record_put_again() -> None:
    h = Harness(ttl=9)
    await h.keeper.put("/k/a", b"A")
    await h.keeper.put("/k/b", b"B")
    h.start()
    await h.until(4)
    first = h.keeper.lease_id
    assert first is not None
    h.etcd.expire(first)  # e.g. a long pause of this process, or etcd restored from backup
    await h.until(7)
    second = h.keeper.lease_id
    assert second is not None and second != first
    assert h.keeper.grants == 2
    assert h.etcd.store == {"/k/a": (b"A", second), "/k/b": (b"B", second)}
    assert [lease for _, lease in h.new_leases] == [first, second]
    # The new lease was granted right after the refresh at t=6 said TTL 0.
    assert h.new_leases[1][0] == 6.0
    # The expired lease is never refreshed again; the new one is.
    await h.until(13)
    await h.stop()
    refreshed = [c.lease for c in h.etcd.ops("refresh") if c.at > 6.0]
    assert refreshed and set(refreshed) == {second}
    h.assert_never_put_without_lease()


@synchronously
async def test_refresh_failures_for_a_whole_ttl_lose_the_lease_then_regrant() -> None:
    h = Harness(ttl=9)
    await h.keeper.put("/k/a", b"A")
    h.start()
    await h.until(1)
    first = h.keeper.lease_id
    assert first is not None
    h.etcd.down = True
    await h.until(8.9)
    # Less than a TTL without a successful refresh: the lease is still ours.
    assert h.keeper.lease_id == first and h.keeper.granted.is_set()
    # Retrying soon while etcd is down, not every ttl/3: after 0.25 s, then 0.5 s, ...
    failed = [c.at for c in h.etcd.calls if c.op == "refresh-failed"]
    assert failed[:4] == [3.0, 3.25, 3.75, 4.75]
    await h.until(9.5)
    # A whole TTL (9 s since the grant at t=0) without a refresh: lost.
    assert h.keeper.lease_id is None and not h.keeper.granted.is_set()
    await h.keeper.put("/k/b", b"B")  # meanwhile the app registers more: kept for later
    await h.until(20)
    assert h.etcd.ops("grant") == [c for c in h.etcd.ops("grant") if c.lease == first]
    assert any(c.op == "grant-failed" for c in h.etcd.calls)  # it kept trying
    h.etcd.down = False
    await h.until(20 + 5)  # the backoff's cap: 5 s
    second = h.keeper.lease_id
    assert second is not None and second != first
    assert h.etcd.store == {"/k/a": (b"A", second), "/k/b": (b"B", second)}
    assert [lease for _, lease in h.new_leases] == [first, second]
    assert h.keeper.granted.is_set()
    await h.until(40)
    await h.stop()
    assert [c.lease for c in h.etcd.ops("refresh")][-1] == second
    assert all(c.lease != first for c in h.etcd.ops("refresh") if c.at > 9)
    h.assert_never_put_without_lease()


@synchronously
async def test_refresh_failures_shorter_than_a_ttl_keep_the_lease_and_resync() -> None:
    h = Harness(ttl=9)
    await h.keeper.put("/k/a", b"A")
    h.start()
    await h.until(1)
    first = h.keeper.lease_id
    h.etcd.down = True
    await h.until(5)
    await h.keeper.put("/k/a", b"A2")  # fails now: must be written on reconnect
    assert h.etcd.store["/k/a"] == (b"A", first)
    h.etcd.down = False
    await h.until(7)
    assert h.keeper.lease_id == first
    assert h.keeper.grants == 1
    assert h.etcd.store["/k/a"] == (b"A2", first)
    # Back to the normal pace once etcd answers.
    await h.until(20)
    await h.stop()
    ok = [c.at for c in h.etcd.ops("refresh")]
    assert ok[-1] - ok[-2] == 3.0
    h.assert_never_put_without_lease()


@synchronously
async def test_failed_put_of_the_records_after_a_grant_is_retried() -> None:
    h = Harness(ttl=9)
    await h.keeper.put("/k/a", b"A")
    h.etcd.fail_puts = True
    h.start()
    await h.until(3)
    assert not h.keeper.granted.is_set()  # granted means: the records are in etcd
    assert h.etcd.store == {}
    h.etcd.fail_puts = False
    await h.until(5)
    await h.stop()
    lease = h.keeper.lease_id
    assert lease is not None and h.keeper.granted.is_set()
    assert h.etcd.store == {"/k/a": (b"A", lease)}
    h.assert_never_put_without_lease()


@synchronously
async def test_grant_failures_are_retried_until_etcd_answers() -> None:
    h = Harness(ttl=9)
    h.etcd.down = True
    await h.keeper.put("/k/a", b"A")
    h.start()
    await h.until(2)
    assert h.keeper.lease_id is None
    failed = [c.at for c in h.etcd.calls if c.op == "grant-failed"]
    assert failed[:4] == [0.0, 0.25, 0.75, 1.75]
    h.etcd.down = False
    await h.until(1.75 + 2 + 1)  # the retry after 1.75 comes 2 s later
    await h.stop()
    assert h.keeper.grants == 1
    assert h.etcd.store["/k/a"][1] == h.keeper.lease_id


@synchronously
async def test_revoke_revokes_the_lease_and_stops_run() -> None:
    h = Harness(ttl=9)
    await h.keeper.put("/k/a", b"A")
    h.start()
    await h.until(4)
    lease = h.keeper.lease_id
    assert lease is not None
    await h.keeper.revoke()
    assert [c.lease for c in h.etcd.ops("revoke")] == [lease]
    assert h.etcd.store == {}  # revoking deletes the records at once
    assert h.keeper.lease_id is None and not h.keeper.granted.is_set()
    assert h.task is not None
    # run() returns by itself after its current sleep: no cancellation needed.
    await asyncio.wait_for(h.task, timeout=5)
    assert h.etcd.ops("refresh")[-1].at < 6.0  # no refresh after the revoke
    # After a revoke nothing is written any more, and revoke() is idempotent.
    await h.keeper.put("/k/b", b"B")
    await h.keeper.revoke()
    assert len(h.etcd.ops("revoke")) == 1
    assert h.etcd.store == {}
    assert len(h.etcd.ops("grant")) == 1


@synchronously
async def test_revoke_without_a_lease_does_nothing() -> None:
    h = Harness()
    await h.keeper.revoke()
    assert h.etcd.calls == []
    h.start()
    await h.until(0)
    assert h.task is not None
    await asyncio.wait_for(h.task, timeout=5)  # run() of a revoked keeper returns at once
    assert h.etcd.calls == []


@synchronously
async def test_revoke_when_etcd_is_down_does_not_raise() -> None:
    h = Harness()
    await h.keeper.put("/k/a", b"A")
    h.start()
    await h.until(1)
    h.etcd.down = True
    await h.keeper.revoke()  # the records expire with the lease
    assert h.keeper.lease_id is None
    await h.stop()


@pytest.mark.parametrize("seed", range(12))
@synchronously
async def test_random_faults_never_put_without_lease_and_heal(seed: int) -> None:
    rng = random.Random(seed)
    h = Harness(ttl=6, backoff=Backoff(random_source=random.Random(seed).random))
    records: dict[str, bytes] = {}
    await h.keeper.put("/k/0", b"v0")
    records["/k/0"] = b"v0"
    h.start()
    for second in range(1, 120):
        await h.until(second)
        roll = rng.random()
        if roll < 0.08:
            h.etcd.down = not h.etcd.down
        elif roll < 0.11:
            h.etcd.fail_puts = not h.etcd.fail_puts
        elif roll < 0.14 and h.keeper.lease_id is not None:
            h.etcd.expire(h.keeper.lease_id)
        elif roll < 0.30:
            key, value = f"/k/{rng.randrange(4)}", f"v{second}".encode()
            await h.keeper.put(key, value)
            records[key] = value
    h.etcd.down = h.etcd.fail_puts = False
    await h.until(120 + 2 * h.keeper.ttl)
    await h.stop()
    h.assert_never_put_without_lease()
    lease = h.keeper.lease_id
    assert lease is not None and lease in h.etcd.live and h.keeper.granted.is_set()
    # Healed: every record, at its latest value, under the live lease.
    assert h.etcd.store == {k: (v, lease) for k, v in records.items()}
    assert h.keeper.grants == len(h.new_leases)


@synchronously
async def test_revoke_during_the_put_of_several_records_never_puts_without_lease() -> None:
    h = Harness(ttl=9)
    await h.keeper.put("/k/a", b"A")
    await h.keeper.put("/k/b", b"B")

    async def revoke_meanwhile() -> None:
        await h.keeper.revoke()

    # SIGTERM just after etcd applied the first put, before the second is sent.
    h.etcd.after_put = revoke_meanwhile
    h.start()
    await h.until(2)
    await h.stop()
    h.assert_never_put_without_lease()


@synchronously
async def test_revoke_during_a_grant_leaves_no_record_behind() -> None:
    h = Harness(ttl=9)
    await h.keeper.put("/k/a", b"A")

    async def revoke_meanwhile() -> None:
        h.etcd.before_grant_returns = None
        await h.keeper.revoke()

    h.etcd.before_grant_returns = revoke_meanwhile  # SIGTERM while the grant is in flight
    h.start()
    await h.until(2)
    await h.stop()
    assert h.etcd.store == {}


@synchronously
async def test_a_put_during_the_put_of_every_record_after_a_regrant_is_never_overwritten() -> None:
    # The drain marks the instance `draining` while a re-grant is putting every
    # record again: the re-grant must not then write its older `serving` value
    # over it, or peers keep routing to a draining instance.
    h = Harness(ttl=9)
    await h.keeper.put("/k/load", b"L")
    await h.keeper.put("/k/instance", b"serving")
    h.start()
    await h.until(4)
    first = h.keeper.lease_id
    assert first is not None
    drains: list[asyncio.Task[None]] = []
    asked_at: list[int] = []  # len(calls) when the drain asked for `draining`

    async def drain_meanwhile() -> None:
        # Another task (the drain) calls put() while the re-grant's put of
        # /k/load is in flight; give it every chance to run as far as it can.
        asked_at.append(len(h.etcd.calls))
        drains.append(asyncio.create_task(h.keeper.put("/k/instance", b"draining")))
        for _ in range(10):
            await asyncio.sleep(0)

    h.etcd.expire(first)  # the refresh at t=6 says TTL 0: re-grant, put every record
    h.etcd.after_put = drain_meanwhile
    await h.until(7)
    assert len(drains) == 1
    await asyncio.wait_for(drains[0], timeout=5)
    second = h.keeper.lease_id
    assert second is not None and second != first
    assert h.etcd.store["/k/instance"] == (b"draining", second)
    # Nothing wrote the old value once the drain had asked for `draining`.
    later = [c.value for c in h.etcd.calls[asked_at[0] :] if c.key == "/k/instance"]
    assert later and set(later) == {b"draining"}
    # And it stays so: no later resync brings `serving` back.
    await h.until(20)
    await h.stop()
    assert h.etcd.store["/k/instance"] == (b"draining", second)
    h.assert_never_put_without_lease()


@synchronously
async def test_puts_go_out_one_at_a_time_with_the_latest_value() -> None:
    h = Harness(ttl=9)
    await h.keeper.put("/k/a", b"A0")
    h.start()
    await h.until(1)
    lease = h.keeper.lease_id
    in_flight = 0
    most = 0
    real_put = h.etcd.put

    async def slow_put(key: str, value: bytes, *, lease: int | None) -> int:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        for _ in range(5):
            await asyncio.sleep(0)
        in_flight -= 1
        return await real_put(key, value, lease=lease)

    h.etcd.put = slow_put  # type: ignore[method-assign]
    await asyncio.gather(*(h.keeper.put("/k/a", f"A{i}".encode()) for i in range(1, 6)))
    await h.stop()
    assert most == 1
    assert h.etcd.store["/k/a"] == (b"A5", lease)


@synchronously
async def test_lease_loss_is_counted_from_when_the_last_good_refresh_was_sent() -> None:
    # etcd restarts the TTL when it handles a refresh, which may be long before
    # its reply arrives: a slow reply must not stretch our trust in the lease.
    h = Harness(ttl=9)
    await h.keeper.put("/k/a", b"A")
    h.start()
    await h.until(1)
    first = h.keeper.lease_id
    assert first is not None
    h.etcd.refresh_latency = 2.0  # the refresh sent at t=3 is answered at t=5
    await h.until(5)
    h.etcd.refresh_latency = 0.0
    h.etcd.down = True
    assert [c.at for c in h.etcd.ops("refresh")] == [3.0]
    await h.until(11.9)
    assert h.keeper.lease_id == first  # less than a TTL since the refresh was sent
    await h.until(12.1)
    # 9 s after the refresh was sent at t=3, not after its reply at t=5.
    assert h.keeper.lease_id is None and not h.keeper.granted.is_set()
    await h.stop()
