"""Leader election (registry/election.py) against a real etcd, in one process.

Several candidates, each with its own EtcdClient, run in one asyncio.run; "another
process" is another client. TTL 2 s keeps the file short: with the default margin
(TTL / 4) a candidate trusts its lease for 1.5 s after the last refresh it sent.
A stopped (SIGSTOP) leader is modelled by holding one candidate's lease refreshes and
fenced writes (PausableClient) for longer than the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

import pytest

from registry.election import Election, election_prefix, read_leader
from registry.embedded import EmbeddedEtcd
from registry.errors import MeshError, NotLeader
from registry.etcd import EtcdClient, EtcdConfig
from registry.keys import KeyLayout
from tests.waiting import eventually

pytestmark = pytest.mark.integration

TTL = 2
# A handover is milliseconds; waiting for a lease to expire would take TTL.
PROMPTLY = 0.75 * TTL
# How late a step-down timer may fire on a busy machine, still before etcd
# could expire the lease (margin = TTL / 4).
LATE = 0.4


# --- helpers -------------------------------------------------------------------------------


class PausableClient(EtcdClient):
    """An EtcdClient whose lease calls and fenced writes wait while it is paused, as if
    the process were stopped on its way to etcd (reads and watches still go through)."""

    def __init__(self, config: EtcdConfig) -> None:
        super().__init__(config)
        self.running = asyncio.Event()
        self.running.set()

    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    async def grant_lease(self, ttl: int) -> int:
        await self.running.wait()
        return await super().grant_lease(ttl)

    async def refresh_lease(self, lease_id: int) -> int:
        await self.running.wait()
        return await super().refresh_lease(lease_id)

    async def revoke_lease(self, lease_id: int) -> None:
        await self.running.wait()
        await super().revoke_lease(lease_id)

    async def put_fenced(
        self,
        key: str,
        value: bytes,
        *,
        lease: int | None,
        fence_key: str,
        fence_create_revision: int,
    ) -> bool:
        await self.running.wait()
        return await super().put_fenced(
            key,
            value,
            lease=lease,
            fence_key=fence_key,
            fence_create_revision=fence_create_revision,
        )


@contextlib.asynccontextmanager
async def candidates(
    url: str,
    layout: KeyLayout,
    names: Sequence[str],
    *,
    call_timeout: float = 2.0,
    exclusive: bool = True,
) -> AsyncIterator[list[Election]]:
    """One Election per name, each on a client of its own; all closed on the way out.

    ``exclusive``: no two of them may ever think they lead at once (checked every 5 ms).
    That holds unless someone deletes the leader's key behind its back: the old leader
    then learns it from its watch a moment after the next one leads (the fence covers
    that moment).
    """
    config = EtcdConfig.from_urls(url, timeout=call_timeout)
    async with contextlib.AsyncExitStack() as stack:
        elections: list[Election] = []
        clients: list[PausableClient] = []
        for name in names:
            client = PausableClient(config)
            await stack.enter_async_context(client)
            election = Election(client, layout, candidate_id=name, ttl=TTL, retry_interval=0.1)
            clients.append(client)
            elections.append(await stack.enter_async_context(election))

        async def at_most_one_leader() -> None:
            while exclusive:
                both = leaders(elections)
                assert len(both) <= 1, f"two leaders at once: {both}"
                await asyncio.sleep(0.005)

        monitor = asyncio.create_task(at_most_one_leader())
        try:
            yield elections
        finally:
            for client in clients:
                client.resume()  # else closing would wait on a paused revoke
            if monitor.done():
                monitor.result()  # raise what it found
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)


async def enter(election: Election) -> asyncio.Task[int]:
    """Start ``election`` campaigning and wait until its key exists (its place in the queue)."""
    task = asyncio.create_task(election.campaign())
    # A campaign still waiting when its election closes ends in NotLeader: expected.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    await eventually(
        lambda: election.key is not None, within=5, what=f"{election.candidate_id} key"
    )
    return task


def leaders(elections: Sequence[Election]) -> list[str]:
    return [e.candidate_id for e in elections if e.is_leader]


def client_of(election: Election) -> PausableClient:
    client = election._client
    assert isinstance(client, PausableClient)
    return client


async def lease_of(client: EtcdClient, key: str | None) -> int:
    assert key is not None
    found = await client.get(key)
    assert found is not None, f"{key} is gone"
    return found.lease


# --- the adapter's additions ---------------------------------------------------------------


def test_adapter_create_sorted_listing_fenced_writes_and_key_watch(
    shared_etcd: EmbeddedEtcd, prefix: str
) -> None:
    async def scenario() -> None:
        async with EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as client:
            lease = await client.grant_lease(5)
            # create: only if absent, under the given lease, returning the create revision.
            created = await client.create(f"{prefix}/q/z", b"first", lease=lease)
            assert created is not None
            assert await client.create(f"{prefix}/q/z", b"again", lease=None) is None
            found = await client.get(f"{prefix}/q/z")
            assert found is not None
            assert (found.value, found.lease, found.create_revision) == (b"first", lease, created)

            # Oldest first, whatever the key order.
            later = await client.create(f"{prefix}/q/a", b"second", lease=None)
            assert later is not None and later > created
            kvs, revision = await client.get_prefix_by_create(f"{prefix}/q/")
            assert [kv.key for kv in kvs] == [f"{prefix}/q/z", f"{prefix}/q/a"]
            assert revision >= later

            # Fenced writes hold only while the fence key has that create revision.
            async def put_t(value: bytes) -> bool:
                return await client.put_fenced(
                    f"{prefix}/t",
                    value,
                    lease=None,
                    fence_key=f"{prefix}/q/z",
                    fence_create_revision=created,
                )

            async def delete_t() -> bool:
                return await client.delete_fenced(
                    f"{prefix}/t", fence_key=f"{prefix}/q/z", fence_create_revision=created
                )

            assert await put_t(b"1") is True
            assert await delete_t() is True
            assert await client.get(f"{prefix}/t") is None
            await client.put(f"{prefix}/t", b"kept", lease=None)
            await client.revoke_lease(lease)  # the fence key goes with its lease
            assert await put_t(b"2") is False
            assert await delete_t() is False
            # Created again: a new create revision, so the old fence still fails.
            assert await client.create(f"{prefix}/q/z", b"reborn", lease=None) is not None
            assert await put_t(b"3") is False
            found = await client.get(f"{prefix}/t")
            assert found is not None and found.value == b"kept"
            with pytest.raises(ValueError):
                await client.put_fenced(
                    f"{prefix}/t",
                    b"4",
                    lease=None,
                    fence_key=f"{prefix}/none",
                    fence_create_revision=0,
                )

            # watch_key sees exactly its key, not others sharing its prefix.
            start = await client.put(f"{prefix}/w/k2", b"other", lease=None)
            await client.put(f"{prefix}/w/k", b"mine", lease=None)
            await client.delete(f"{prefix}/w/k")
            events = client.watch_key(f"{prefix}/w/k", start_revision=start)
            async with contextlib.aclosing(events):
                seen = [await anext(events), await anext(events)]
            assert [(e.key, e.value) for e in seen] == [
                (f"{prefix}/w/k", b"mine"),
                (f"{prefix}/w/k", None),
            ]

    asyncio.run(scenario())


# --- one leader, in create order -----------------------------------------------------------


def test_exactly_one_of_three_leads_and_its_key_follows_the_contract(
    shared_etcd: EmbeddedEtcd, prefix: str
) -> None:
    layout = KeyLayout(prefix)

    async def scenario() -> None:
        async with (
            candidates(shared_etcd.url, layout, ["a", "b", "c"]) as elections,
            EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as other,
        ):
            a, b, c = elections
            tasks = [await enter(e) for e in elections]
            term = await asyncio.wait_for(tasks[0], 5)
            assert a.term == term and a.is_leader

            # Hold well past the TTL: the lease is kept and nobody else takes over.
            until = time.monotonic() + 1.5 * TTL
            while time.monotonic() < until:
                assert leaders(elections) == ["a"]
                assert not tasks[1].done() and not tasks[2].done()
                await asyncio.sleep(0.1)
            assert a.term == term and not a.leader_lost.is_set()

            # The contract: election/scaler/<lease-hex> = the id, under that lease;
            # the term is the leader key's create revision.
            kvs, _ = await other.get_prefix_by_create(f"{prefix}/election/scaler/")
            assert [kv.value for kv in kvs] == [b"a", b"b", b"c"]
            for kv, election in zip(kvs, elections, strict=True):
                assert kv.key == election.key == f"{prefix}/election/scaler/{kv.lease:x}"
            assert kvs[0].create_revision == term
            assert await b.leader() == "a"
            found = await read_leader(other, layout)
            assert found is not None and (found.id, found.term) == ("a", term)
            assert election_prefix(layout) == f"{prefix}/election/scaler/"

            # A fenced write from the leader lands; from the others it is refused.
            await a.put_fenced(f"{prefix}/targets/echo", b"3", term=term)
            for follower in (b, c):
                with pytest.raises(NotLeader):
                    await follower.put_fenced(f"{prefix}/targets/echo", b"9")
            with pytest.raises(NotLeader):
                await a.put_fenced(f"{prefix}/targets/echo", b"9", term=term - 1)
            found_target = await other.get(f"{prefix}/targets/echo")
            assert found_target is not None and found_target.value == b"3"

    asyncio.run(scenario())


def test_resign_hands_over_in_create_order_and_terms_grow(
    shared_etcd: EmbeddedEtcd, prefix: str
) -> None:
    layout = KeyLayout(prefix)

    async def scenario() -> None:
        async with (
            candidates(shared_etcd.url, layout, ["a", "b", "c"]) as elections,
            EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as other,
        ):
            a, b, c = elections
            task_a, task_b, task_c = [await enter(e) for e in elections]
            term_a = await asyncio.wait_for(task_a, 5)
            key_a = a.key

            await a.resign()
            assert not a.is_leader and a.leader_lost.is_set() and a.term is None
            assert await other.get(key_a or "") is None  # resigning deletes our key
            term_b = await asyncio.wait_for(task_b, PROMPTLY)  # promptly: b was next
            assert leaders(elections) == ["b"] and not task_c.done()
            assert await c.leader() == "b"
            with pytest.raises(NotLeader):
                await a.put_fenced(f"{prefix}/targets/echo", b"from a")

            task_a = await enter(a)  # a campaigns again: now behind c
            await b.aclose()
            await b.aclose()  # idempotent
            with pytest.raises(MeshError):
                await b.campaign()
            term_c = await asyncio.wait_for(task_c, PROMPTLY)
            assert leaders(elections) == ["c"] and not task_a.done()

            await c.resign()
            term_a2 = await asyncio.wait_for(task_a, PROMPTLY)
            assert leaders(elections) == ["a"] and not a.leader_lost.is_set()
            assert term_a < term_b < term_c < term_a2

    asyncio.run(scenario())


# --- losing the lease ----------------------------------------------------------------------


def test_revoked_lease_hands_over_within_a_second_and_the_old_leader_notices(
    shared_etcd: EmbeddedEtcd, prefix: str
) -> None:
    """Someone revokes the leader's lease while the leader's fenced write is on its way:
    the next candidate leads at once, the old one steps down, and its write is refused
    by etcd (the fence), not only by its own bookkeeping."""
    layout = KeyLayout(prefix)
    target = f"{prefix}/targets/echo"

    async def scenario() -> None:
        async with (
            candidates(shared_etcd.url, layout, ["a", "b"], exclusive=False) as elections,
            EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as other,
        ):
            a, b = elections
            task_a, task_b = [await enter(e) for e in elections]
            term_a = await asyncio.wait_for(task_a, 5)

            client_of(a).pause()  # a decided to write, then stalled on the way to etcd
            in_flight = asyncio.create_task(a.put_fenced(target, b"from a", term=term_a))
            await asyncio.sleep(0.1)
            assert not in_flight.done()

            old_key = a.key
            await other.revoke_lease(await lease_of(other, old_key))
            revoked_at = time.monotonic()
            term_b = await asyncio.wait_for(task_b, PROMPTLY)
            took_over = time.monotonic() - revoked_at
            await eventually(lambda: a.leader_lost.is_set(), within=1, what="a notices")
            assert not a.is_leader and leaders(elections) == ["b"]
            assert term_b > term_a and took_over < PROMPTLY

            client_of(a).resume()
            with pytest.raises(NotLeader):
                await in_flight
            assert await other.get(target) is None  # nothing written
            await b.put_fenced(target, b"from b", term=term_b)
            found = await other.get(target)
            assert found is not None and found.value == b"from b"

            # a campaigns again on its own, with a new lease, behind b.
            await eventually(
                lambda: a.key is not None and a.key != old_key,
                within=3,
                what="a's new candidacy",
            )
            kvs, _ = await other.get_prefix_by_create(f"{prefix}/election/scaler/")
            assert [kv.value for kv in kvs] == [b"b", b"a"]

    asyncio.run(scenario())


def test_a_stalled_leader_steps_down_before_its_lease_expires_and_its_write_fails(
    shared_etcd: EmbeddedEtcd, prefix: str
) -> None:
    """SIGSTOP, modelled: everything the leader sends about its lease, and its fenced
    write, hangs for longer than the TTL. It steps down before etcd can expire its
    lease, so the next leader (once the lease expired) never overlaps it; when it
    resumes, the write it decided on under the old term is refused."""
    layout = KeyLayout(prefix)
    target = f"{prefix}/targets/echo"

    async def scenario() -> None:
        async with (
            candidates(shared_etcd.url, layout, ["a", "b"]) as elections,
            EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as other,
        ):
            a, b = elections
            task_a, task_b = [await enter(e) for e in elections]
            term_a = await asyncio.wait_for(task_a, 5)
            await asyncio.sleep(0.6)  # past one refresh
            lease_a = await lease_of(other, a.key)

            client_of(a).pause()
            paused_at = time.monotonic()
            in_flight = asyncio.create_task(a.put_fenced(target, b"from a", term=term_a))
            await asyncio.sleep(0.1)
            assert not in_flight.done()

            await asyncio.wait_for(a.leader_lost.wait(), TTL)
            lost_after = time.monotonic() - paused_at
            assert not a.is_leader and a.term is None
            # Its last refresh was sent before the pause: trusted for TTL - margin at most.
            assert lost_after < TTL - a.margin + LATE
            assert not task_b.done() and not b.is_leader  # a's lease is still alive in etcd

            term_b = await asyncio.wait_for(task_b, 2 * TTL)
            led_after = time.monotonic() - paused_at
            assert await other.lease_ttl(lease_a) == -1  # b leads because a's lease expired
            assert term_b > term_a and led_after > lost_after

            client_of(a).resume()
            with pytest.raises(NotLeader):
                await in_flight
            with pytest.raises(NotLeader):
                await a.put_fenced(target, b"again")
            assert await other.get(target) is None
            assert leaders(elections) == ["b"]
            print(
                f"stalled leader stepped down after {lost_after:.2f} s, next led at {led_after:.2f} s"
            )

    asyncio.run(scenario())


def test_etcd_down_leader_steps_down_before_its_ttl_then_campaigns_again(
    etcd: EmbeddedEtcd,
) -> None:
    layout = KeyLayout("/ringmesh/v1")
    target = "/ringmesh/v1/targets/echo"

    async def scenario() -> None:
        async with candidates(etcd.url, layout, ["a", "b"], call_timeout=1.0) as elections:
            a, _b = elections
            task_a, _task_b = [await enter(e) for e in elections]
            term_a = await asyncio.wait_for(task_a, 5)
            await asyncio.sleep(0.6)  # past one refresh

            etcd.kill()
            killed_at = time.monotonic()
            await asyncio.wait_for(a.leader_lost.wait(), TTL)
            lost_after = time.monotonic() - killed_at
            assert lost_after < TTL - a.margin + LATE  # refreshes stopped with the kill
            assert leaders(elections) == []
            with pytest.raises(NotLeader):
                await a.put_fenced(target, b"x")

            await asyncio.to_thread(etcd.start)  # not blocking the candidates' timers
            restarted_at = time.monotonic()
            await eventually(
                lambda: len(leaders(elections)) == 1, within=15, what="a leader after restart"
            )
            relead_after = time.monotonic() - restarted_at
            (leader,) = [e for e in elections if e.is_leader]
            assert leader.term is not None and leader.term > term_a
            await leader.put_fenced(target, b"after", term=leader.term)
            async with EtcdClient(EtcdConfig.from_urls(etcd.url)) as other:
                found = await other.get(target)
                assert found is not None and found.value == b"after"
                # The old candidacies' leases were revoked on reconnect: only new keys remain.
                await eventually(
                    lambda: _values(other, election_prefix(layout)),
                    within=5,
                    what="a new key for each candidate",
                )
                kvs, _ = await other.get_prefix_by_create(election_prefix(layout))
                assert kvs[0].create_revision == leader.term
            print(
                f"etcd down: stepped down after {lost_after:.2f} s, led {relead_after:.2f} s after restart"
            )

    asyncio.run(scenario())


async def _values(client: EtcdClient, prefix: str) -> bool:
    kvs, _ = await client.get_prefix_by_create(prefix)
    return sorted(kv.value for kv in kvs) == [b"a", b"b"]
