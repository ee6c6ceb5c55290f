"""The registry against a real etcd: the adapter, leases, the topology watch, outages.

Every test is a plain function running one async scenario with asyncio.run.
Tests that kill, stop or compact etcd get their own (the ``etcd`` fixture);
the others share one and keep to their own key prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from registry.embedded import EmbeddedEtcd, find_etcd, free_port
from registry.errors import EtcdError, EtcdUnavailable
from registry.etcd import EtcdClient, EtcdConfig, WatchEvent
from registry.keys import KeyLayout
from registry.lease import Backoff, LeaseKeeper
from registry.records import InstanceRecord
from registry.topology import Topology, TopologyWatch, read_topology
from tests.integration.certs import Pki, make_pki, openssl
from tests.waiting import eventually

pytestmark = pytest.mark.integration


def quick_retry() -> Backoff:
    """Retries within 0.1 s: the watches under test come back fast."""
    return Backoff(base=0.1, cap=0.1)


_ports = iter(range(20000, 30000))


# --- helpers -------------------------------------------------------------------------------


def record(instance_id: str, service: str = "echo", **fields: Any) -> InstanceRecord:
    return InstanceRecord(
        id=instance_id, service=service, address=f"127.0.0.1:{next(_ports)}", **fields
    )


def ids(topology: Topology) -> set[str]:
    """The topology as a set of ``service/id`` strings."""
    return {f"{service}/{i}" for service, instances in topology.services.items() for i in instances}


@contextlib.asynccontextmanager
async def running(coro: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``coro`` as a task for the block; always cancel and reap it."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def put_retrying(client: EtcdClient, key: str, value: bytes, *, within: float) -> int:
    """Put without a lease, retrying while etcd is still coming back."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await client.put(key, value, lease=None)
        except EtcdUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def first_event(client: EtcdClient, prefix: str, start_revision: int) -> WatchEvent:
    events = cast(
        AsyncGenerator[WatchEvent, None],
        client.watch_prefix(prefix, start_revision=start_revision),
    )
    try:
        async for event in events:
            return event
    finally:
        await events.aclose()  # cancel the etcd watch now, not when collected
    raise AssertionError("watch ended without an event")


def etcdctl(url: str, *args: str) -> str:
    binary = Path(find_etcd()).with_name("etcdctl")
    done = subprocess.run(
        [str(binary), "--endpoints", url, *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, f"etcdctl {args}: {done.stderr}"
    return done.stdout


def skipped_keys(caplog: pytest.LogCaptureFixture) -> set[str]:
    """Keys named by the topology's 'skipping <key>: why' warnings."""
    return {
        r.getMessage().split()[1].rstrip(":")
        for r in caplog.records
        if r.name == "registry.topology"
        and r.levelno == logging.WARNING
        and r.getMessage().startswith("skipping ")
    }


# --- 1. the adapter: basics, errors, timeouts ----------------------------------------------


def test_client_put_get_prefix_delete_and_leases(shared_etcd: EmbeddedEtcd, prefix: str) -> None:
    async def scenario() -> None:
        async with EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as client:
            empty, empty_rev = await client.get_prefix(f"{prefix}/")
            assert empty == [] and empty_rev > 0

            lease = await client.grant_lease(5)
            assert 0 < await client.lease_ttl(lease) <= 5
            rev_a = await client.put(f"{prefix}/a", b"alpha", lease=lease)
            rev_b = await client.put(f"{prefix}/b", b"beta", lease=None)
            assert rev_b > rev_a > empty_rev

            a = await client.get(f"{prefix}/a")
            assert a is not None
            assert (a.value, a.lease, a.mod_revision, a.create_revision) == (
                b"alpha",
                lease,
                rev_a,
                rev_a,
            )
            assert await client.get(f"{prefix}/missing") is None

            kvs, revision = await client.get_prefix(f"{prefix}/")
            assert [(kv.key, kv.value) for kv in kvs] == [
                (f"{prefix}/a", b"alpha"),
                (f"{prefix}/b", b"beta"),
            ]
            assert [kv.lease for kv in kvs] == [lease, 0]
            assert revision >= rev_b  # the store revision the listing was read at

            assert await client.delete(f"{prefix}/b") is True
            assert await client.delete(f"{prefix}/b") is False
            assert await client.get(f"{prefix}/b") is None
            _, after_delete = await client.get_prefix(f"{prefix}/")
            assert after_delete > revision

            assert await client.refresh_lease(lease) > 0
            await client.revoke_lease(lease)
            assert await client.get(f"{prefix}/a") is None  # its keys go with it
            assert await client.lease_ttl(lease) == -1
            assert await client.refresh_lease(lease) == 0
            await client.revoke_lease(lease)  # again: not an error

            with pytest.raises(EtcdError) as caught:
                await client.put(f"{prefix}/c", b"orphan", lease=lease)
            assert not isinstance(caught.value, EtcdUnavailable)
            assert await client.get(f"{prefix}/c") is None

    asyncio.run(scenario())


async def _timed(call: Awaitable[object]) -> tuple[BaseException | None, float]:
    start = time.monotonic()
    try:
        await call
    except Exception as exc:
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


async def _all_unavailable(client: EtcdClient, lease: int, *, within: float) -> None:
    """Every kind of call fails with EtcdUnavailable, each within ``within`` seconds."""
    calls: dict[str, Awaitable[object]] = {
        "get": client.get("/dead/k"),
        "get_prefix": client.get_prefix("/dead/"),
        "put": client.put("/dead/k", b"v2", lease=lease),
        "delete": client.delete("/dead/other"),
        "grant_lease": client.grant_lease(5),
        "refresh_lease": client.refresh_lease(lease),
        "lease_ttl": client.lease_ttl(lease),
        "watch": first_event(client, "/dead/", 1),
    }
    results = await asyncio.gather(*(_timed(call) for call in calls.values()))
    for name, (exc, elapsed) in zip(calls, results, strict=True):
        assert isinstance(exc, EtcdUnavailable), f"{name}: {exc!r}"
        assert elapsed <= within, f"{name} took {elapsed:.2f} s"


def _wait_stopped(pid: int) -> None:
    """Wait until every thread of ``pid`` is stopped: SIGSTOP takes effect asynchronously."""
    deadline = time.monotonic() + 5
    while True:
        states = set()
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            with contextlib.suppress(OSError):
                states.add(stat.read_text().rpartition(")")[2].split()[0])
        if states and states <= {"T", "t"}:
            return
        assert time.monotonic() < deadline, f"etcd {pid} not stopped: {states}"
        time.sleep(0.01)


def test_calls_to_a_dead_or_hung_etcd_raise_unavailable_within_the_timeout(
    etcd: EmbeddedEtcd,
) -> None:
    timeout = 1.0
    # What the test proves is that the timeout ends a call (a real hang is unbounded, and a
    # refused connection is near-instant); 2 s over it lets eight calls on one event loop
    # be scheduled, fail and be reported on a busy machine without blurring that.
    slack = 2.0

    async def scenario() -> None:
        config = EtcdConfig.from_urls(etcd.url, timeout=timeout)
        async with EtcdClient(config) as client:
            lease = await client.grant_lease(30)
            await client.put("/dead/k", b"v", lease=lease)
            pid = etcd.pid
            assert pid is not None

            # Hung (SIGSTOP): connected, but nothing answers; only the timeout ends a call.
            os.kill(pid, signal.SIGSTOP)
            try:
                _wait_stopped(pid)
                await _all_unavailable(client, lease, within=timeout + slack)
            finally:
                os.kill(pid, signal.SIGCONT)

            async def readable() -> bool:
                with contextlib.suppress(EtcdUnavailable):
                    return await client.get("/dead/k") is not None
                return False

            await eventually(readable, within=10, what="the client works again after SIGCONT")

        # Dead (SIGKILL): the connection breaks, and new ones are refused, fast. (A new
        # client: on the one above, the watch stream left over from the hang makes a kill
        # sometimes surface as EtcdError; see test_topology_watch_survives_a_failed_watch_stream.)
        async with EtcdClient(config) as client:
            assert await client.get("/dead/k") is not None
            etcd.kill()
            await _all_unavailable(client, lease, within=timeout + slack)

        async with EtcdClient(config) as fresh:  # never connected before
            exc, elapsed = await _timed(fresh.get("/dead/k"))
            assert isinstance(exc, EtcdUnavailable) and elapsed <= timeout + slack

    asyncio.run(scenario())


# --- 2. several endpoints -------------------------------------------------------------------


@pytest.mark.parametrize("dead_first", [True, False], ids=["dead-first", "dead-last"])
def test_several_endpoints_fail_over_to_the_live_one(
    shared_etcd: EmbeddedEtcd, prefix: str, dead_first: bool
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    urls = [dead, shared_etcd.url] if dead_first else [shared_etcd.url, dead]

    async def scenario() -> None:
        config = EtcdConfig.from_urls(",".join(urls), timeout=2.0)
        assert len(config.endpoints) == 2
        async with EtcdClient(config) as client:
            lease = await client.grant_lease(5)
            revision = await client.put(f"{prefix}/k", b"v", lease=lease)
            found = await client.get(f"{prefix}/k")
            assert found is not None and found.value == b"v" and found.lease == lease
            event = await asyncio.wait_for(first_event(client, f"{prefix}/", revision), 5)
            assert (event.key, event.value, event.revision) == (f"{prefix}/k", b"v", revision)
            await client.revoke_lease(lease)
            assert await client.get(f"{prefix}/k") is None

    asyncio.run(scenario())


# --- 3. TLS ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsEtcd:
    url: str
    pki: Pki


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEtcd]:
    """etcd on https with client certificates required (EmbeddedEtcd has no TLS flags)."""
    if openssl() is None:
        pytest.skip("openssl is not installed: cannot make test certificates")
    root = tmp_path_factory.mktemp("etcd-tls")
    pki = make_pki(root / "pki")
    url = f"https://127.0.0.1:{free_port()}"
    peer = f"http://127.0.0.1:{free_port()}"
    args = [
        find_etcd(),
        "--name", "tls",
        "--data-dir", str(root / "data"),
        "--listen-client-urls", url,
        "--advertise-client-urls", url,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"tls={peer}",
        "--cert-file", str(pki.server_cert),
        "--key-file", str(pki.server_key),
        "--trusted-ca-file", str(pki.ca),
        "--client-cert-auth",
        "--log-level", "warn",
    ]  # fmt: skip
    env = dict(os.environ)
    if platform.machine() in ("aarch64", "arm64"):
        env.setdefault("ETCD_UNSUPPORTED_ARCH", "arm64")
    log_path = root / "etcd.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    try:
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"TLS etcd exited: {log_path.read_text()[-2000:]}"
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(url + "/health", timeout=1, context=context) as response,
            ):
                if b'"health":"true"' in response.read():
                    break
            assert time.monotonic() < deadline, f"TLS etcd not healthy: {log_path.read_text()}"
            time.sleep(0.05)
        yield TlsEtcd(url, pki)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_tls_with_a_client_certificate(tls_etcd: TlsEtcd) -> None:
    pki = tls_etcd.pki

    async def scenario() -> None:
        config = EtcdConfig.from_urls(
            tls_etcd.url,
            ca_file=str(pki.ca),
            cert_file=str(pki.client_cert),
            key_file=str(pki.client_key),
            timeout=2.0,
        )
        assert config.tls
        async with EtcdClient(config) as client:
            lease = await client.grant_lease(5)
            revision = await client.put("/tls/k", b"secret", lease=lease)
            found = await client.get("/tls/k")
            assert found is not None and (found.value, found.lease) == (b"secret", lease)
            kvs, _ = await client.get_prefix("/tls/")
            assert [kv.key for kv in kvs] == ["/tls/k"]
            event = await asyncio.wait_for(first_event(client, "/tls/", revision), 5)
            assert event.value == b"secret"

        refused: list[EtcdConfig] = [
            # trusts the server, but shows no client certificate
            EtcdConfig.from_urls(tls_etcd.url, ca_file=str(pki.ca), timeout=2.0),
            # shows the client certificate, but does not trust the test CA
            EtcdConfig(
                endpoints=config.endpoints,
                tls=True,
                cert_file=str(pki.client_cert),
                key_file=str(pki.client_key),
                timeout=2.0,
            ),
            # plain http to an https port
            EtcdConfig.from_urls(tls_etcd.url.replace("https", "http"), timeout=2.0),
        ]
        for bad in refused:
            async with EtcdClient(bad) as client:
                with pytest.raises((EtcdError, EtcdUnavailable)):
                    await client.get("/tls/k")
                with pytest.raises((EtcdError, EtcdUnavailable)):
                    await client.put("/tls/intruder", b"x", lease=None)

    asyncio.run(scenario())


def test_tls_with_several_endpoints(tls_etcd: TlsEtcd) -> None:
    pki = tls_etcd.pki
    dead = f"https://127.0.0.1:{free_port()}"

    async def scenario() -> None:
        config = EtcdConfig.from_urls(
            f"{dead},{tls_etcd.url}",
            ca_file=str(pki.ca),
            cert_file=str(pki.client_cert),
            key_file=str(pki.client_key),
            timeout=2.0,
        )
        async with EtcdClient(config) as client:
            await client.put("/tls-multi/k", b"v", lease=None)
            found = await client.get("/tls-multi/k")
            assert found is not None and found.value == b"v"

    asyncio.run(scenario())


# --- 4. LeaseKeeper -------------------------------------------------------------------------


def test_lease_keeper_keeps_renews_replaces_and_revokes(
    shared_etcd: EmbeddedEtcd, prefix: str
) -> None:
    # The keeper refreshes every TTL/3, so the lease survives an event-loop stall of up to
    # 2/3 TTL: 2 s with TTL 3 (1.3 s with the minimum TTL of 2 was too little on a busy
    # machine). A lost lease still shows as a second grant, and the test stays short.
    ttl = 3
    layout = KeyLayout(prefix)
    key_a = layout.instance("echo", "a")
    key_load = layout.load("echo", "a")
    key_late = layout.instance("echo", "late")

    async def scenario() -> None:
        config = EtcdConfig.from_urls(shared_etcd.url, timeout=2.0)
        async with EtcdClient(config) as client, EtcdClient(config) as other:
            new_leases: list[int] = []

            async def on_new_lease(lease_id: int) -> None:
                new_leases.append(lease_id)

            keeper = LeaseKeeper(client, ttl=ttl, on_new_lease=on_new_lease)
            value_a = record("a").to_json()
            await keeper.put(key_a, value_a)
            await keeper.put(key_load, b'{"inflight":0}')
            assert await other.get(key_a) is None  # no lease yet: nothing is written

            async def leases_of(*keys: str) -> set[int | None]:
                found = [await other.get(key) for key in keys]
                return {kv.lease if kv else None for kv in found}

            async with running(keeper.run()) as task:
                await asyncio.wait_for(keeper.granted.wait(), 5)
                first = keeper.lease_id
                assert first is not None and new_leases == [first]
                assert await leases_of(key_a, key_load) == {first}
                assert 0 < await other.lease_ttl(first) <= ttl

                # A record put while running is written at once, under the lease.
                await keeper.put(key_late, record("late").to_json())
                assert await leases_of(key_late) == {first}

                # Alive well beyond the TTL (six refreshes): same lease, never lost.
                until = time.monotonic() + 2 * ttl
                while time.monotonic() < until:
                    assert await leases_of(key_a, key_load, key_late) == {first}
                    await asyncio.sleep(0.25)
                assert keeper.grants == 1 and keeper.lease_id == first

                # Someone else revokes the lease: a new one, the records again, the owner told.
                await other.revoke_lease(first)
                assert first not in await leases_of(key_a, key_load, key_late)

                await eventually(
                    lambda: len(new_leases) == 2, within=3 * ttl, what="new lease", task=task
                )
                second = new_leases[1]
                assert second != first and keeper.lease_id == second and keeper.grants == 2
                assert await leases_of(key_a, key_load, key_late) == {second}
                found = await other.get(key_a)
                assert found is not None and found.value == value_a

                # revoke(): the keys are gone at once, and run() stops by itself.
                await keeper.revoke()
                assert await leases_of(key_a, key_load, key_late) == {None}
                assert await other.lease_ttl(second) == -1
                await asyncio.wait_for(asyncio.shield(task), ttl)
                assert keeper.lease_id is None and not keeper.granted.is_set()
                await keeper.revoke()  # idempotent
                await keeper.put(key_a, record("a").to_json())  # after revoke: not written
                assert await other.get(key_a) is None

    asyncio.run(scenario())


# --- 5. etcd outage -------------------------------------------------------------------------


def test_outage_keeps_the_topology_then_reregisters_and_resumes_the_watch(
    etcd: EmbeddedEtcd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry")
    layout = KeyLayout("/ringmesh/v1")
    mine = layout.instance("echo", "mine")

    async def scenario() -> None:
        config = EtcdConfig.from_urls(etcd.url, timeout=1.0)
        async with EtcdClient(config) as client, EtcdClient(config) as other:
            changes: list[Topology] = []
            keeper = LeaseKeeper(client, ttl=10)
            await keeper.put(mine, record("mine").to_json())
            watch = TopologyWatch(client, layout, on_change=changes.append)
            await other.put(layout.instance("echo", "peer"), record("peer").to_json(), lease=None)

            async with running(keeper.run()) as keeper_task, running(watch.run()) as watch_task:
                await asyncio.wait_for(keeper.granted.wait(), 5)
                await eventually(
                    lambda: ids(watch.topology) == {"echo/mine", "echo/peer"},
                    within=5,
                    what="initial topology",
                    task=watch_task,
                )
                # Written (and acknowledged) just before etcd dies: the watch may not see it yet.
                before = layout.instance("echo", "before")
                await other.put(before, record("before").to_json(), lease=None)
                etcd.kill()

                # Once the watch has seen the break, nothing more can arrive (etcd is dead):
                # from then on the topology must stay as it is.
                await eventually(
                    lambda: any(
                        r.name == "registry.topology"
                        and r.getMessage().startswith("topology watch broken")
                        for r in caplog.records
                    ),
                    within=10,
                    what="the watch to break",
                    task=watch_task,
                )
                during = watch.topology
                published = len(changes)
                assert {"echo/mine", "echo/peer"} <= ids(during)
                outage_end = time.monotonic() + 5
                while time.monotonic() < outage_end:
                    assert watch.topology is during, "the topology changed during the outage"
                    assert not watch_task.done() and not keeper_task.done()
                    await asyncio.sleep(0.1)
                assert len(changes) == published  # nothing published while etcd was down

                etcd.start()
                after = layout.instance("echo", "after")
                await put_retrying(other, after, record("after").to_json(), within=10)

                expected = {"echo/mine", "echo/peer", "echo/before", "echo/after"}
                await eventually(
                    lambda: ids(watch.topology) == expected,
                    within=15,
                    what="the changes around the outage in the topology",
                    task=watch_task,
                )

                # The watch is live again: a change now shows up.
                await other.put(
                    layout.instance("echo", "later"), record("later").to_json(), lease=None
                )
                await eventually(
                    lambda: "echo/later" in ids(watch.topology),
                    within=5,
                    what="a change after the restart",
                    task=watch_task,
                )
                assert "topology watch resumed" in caplog.text

                # Still registered: in etcd under the keeper's live lease.
                async def registered() -> bool:
                    found = await other.get(mine)
                    return (
                        keeper.granted.is_set()
                        and found is not None
                        and found.lease != 0
                        and found.lease == keeper.lease_id
                        and await other.lease_ttl(found.lease) > 0
                    )

                await eventually(registered, within=15, what="registered after the outage")
                assert watch.topology.services["echo"]["mine"].lease == keeper.lease_id
                await keeper.revoke()

    asyncio.run(scenario())


class FaultyEtcdProxy:
    """A gRPC pass-through to a real etcd (KV Range and Watch only, opaque bytes) whose
    first ``watch_failures`` Watch streams fail with INTERNAL "Internal error from Core",
    as gRPC reports a stream broken while a request was being written."""

    def __init__(self, upstream: str, *, watch_failures: int = 1) -> None:
        self._upstream = upstream
        self._watch_failures = watch_failures
        self.watch_calls = 0
        self.url = ""

    async def __aenter__(self) -> FaultyEtcdProxy:
        self._channel = grpc.aio.insecure_channel(self._upstream)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "etcdserverpb.KV", {"Range": grpc.unary_unary_rpc_method_handler(self._range)}
                ),
                grpc.method_handlers_generic_handler(
                    "etcdserverpb.Watch",
                    {"Watch": grpc.stream_stream_rpc_method_handler(self._watch)},
                ),
            )
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._server.stop(None)
        await self._channel.close()

    async def _range(self, request: bytes, context: Any) -> bytes:
        reply: bytes = await self._channel.unary_unary("/etcdserverpb.KV/Range")(request)
        return reply

    async def _watch(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        self.watch_calls += 1
        if self.watch_calls <= self._watch_failures:
            await context.abort(grpc.StatusCode.INTERNAL, "Internal error from Core")
        call = self._channel.stream_stream("/etcdserverpb.Watch/Watch")(requests)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()


def test_topology_watch_survives_a_failed_watch_stream(
    shared_etcd: EmbeddedEtcd, prefix: str
) -> None:
    layout = KeyLayout(prefix)

    async def scenario() -> None:
        async with (
            FaultyEtcdProxy(f"127.0.0.1:{shared_etcd.client_port}") as proxy,
            EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as direct,
            EtcdClient(EtcdConfig.from_urls(proxy.url, timeout=2.0)) as client,
        ):
            await direct.put(layout.instance("echo", "a"), record("a").to_json(), lease=None)
            watch = TopologyWatch(client, layout, backoff=quick_retry)
            async with running(watch.run()) as task:
                await asyncio.wait_for(watch.ready.wait(), 5)
                assert ids(watch.topology) == {"echo/a"}
                await eventually(
                    lambda: proxy.watch_calls >= 1, within=5, what="a watch", task=task
                )
                await direct.put(layout.instance("echo", "b"), record("b").to_json(), lease=None)
                await eventually(
                    lambda: ids(watch.topology) == {"echo/a", "echo/b"},
                    within=5,
                    what="a change after the failed watch stream",
                    task=task,
                )
                assert proxy.watch_calls >= 2

    asyncio.run(scenario())


def test_a_change_rebuilds_only_its_service_and_scoped_watches_see_only_theirs(
    shared_etcd: EmbeddedEtcd, prefix: str
) -> None:
    """Whole prefix: a change in one service shares every other service's map with the
    previous snapshot. Scoped (--watch): other services are never seen at all."""
    layout = KeyLayout(prefix)

    async def scenario() -> None:
        async with EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as client:
            for service, name in (("echo", "a"), ("users", "u1"), ("orders", "o1")):
                record_ = record(name, service=service)
                await client.put(layout.instance(service, name), record_.to_json(), lease=None)
            whole = TopologyWatch(client, layout)
            scoped = TopologyWatch(client, layout, services=("echo", "users"))
            async with running(whole.run()) as t1, running(scoped.run()) as t2:
                await asyncio.wait_for(asyncio.gather(whole.ready.wait(), scoped.ready.wait()), 5)
                assert ids(scoped.topology) == {"echo/a", "users/u1"}
                before = whole.topology
                await client.put(
                    layout.instance("users", "u2"),
                    record("u2", service="users").to_json(),
                    lease=None,
                )
                await client.put(
                    layout.instance("orders", "o2"),
                    record("o2", service="orders").to_json(),
                    lease=None,
                )
                await eventually(
                    lambda: "orders/o2" in ids(whole.topology), within=5, what="o2", task=t1
                )
                await eventually(
                    lambda: "users/u2" in ids(scoped.topology), within=5, what="u2", task=t2
                )
                after = whole.topology
                assert after.services["echo"] is before.services["echo"]
                assert after.services["users"] is not before.services["users"]
                assert ids(scoped.topology) == {"echo/a", "users/u1", "users/u2"}
                await client.delete(layout.instance("echo", "a"))
                await eventually(
                    lambda: "echo" not in scoped.topology.services,
                    within=5,
                    what="echo gone",
                    task=t2,
                )
                assert scoped.revision > 0 and ids(scoped.topology) == {"users/u1", "users/u2"}

    asyncio.run(scenario())


# --- 6. compaction --------------------------------------------------------------------------


async def _compact_all(other: EtcdClient, url: str, prefix: str) -> int:
    _, revision = await other.get_prefix(prefix)
    out = etcdctl(url, "compact", str(revision))
    assert f"compacted revision {revision}" in out
    return revision


def test_fresh_run_after_compaction_relists(etcd: EmbeddedEtcd) -> None:
    layout = KeyLayout("/ringmesh/v1")

    async def scenario() -> None:
        config = EtcdConfig.from_urls(etcd.url, timeout=2.0)
        async with EtcdClient(config) as client, EtcdClient(config) as other:
            watch = TopologyWatch(client, layout)
            for name in ("a", "b"):
                await other.put(layout.instance("echo", name), record(name).to_json(), lease=None)
            async with running(watch.run()) as task:
                await eventually(
                    lambda: ids(watch.topology) == {"echo/a", "echo/b"},
                    within=5,
                    what="first topology",
                    task=task,
                )
            stopped_at = watch.revision

            await other.delete(layout.instance("echo", "a"))
            await other.put(layout.instance("echo", "c"), record("c").to_json(), lease=None)
            heavy = record("b", weight=7).to_json()
            await other.put(layout.instance("echo", "b"), heavy, lease=None)
            compacted = await _compact_all(other, etcd.url, layout.instances)
            assert compacted > stopped_at + 1
            await other.put(layout.instance("echo", "d"), record("d").to_json(), lease=None)

            async with running(watch.run()) as task:
                await eventually(
                    lambda: ids(watch.topology) == {"echo/b", "echo/c", "echo/d"},
                    within=5,
                    what="topology after compaction",
                    task=task,
                )
                assert watch.topology.services["echo"]["b"].record.weight == 7
                assert watch.revision > compacted
                await other.put(layout.instance("echo", "e"), record("e").to_json(), lease=None)
                await eventually(
                    lambda: "echo/e" in ids(watch.topology),
                    within=5,
                    what="live after compaction",
                    task=task,
                )

    asyncio.run(scenario())


def test_watch_relists_when_its_resume_revision_was_compacted(
    etcd: EmbeddedEtcd, caplog: pytest.LogCaptureFixture
) -> None:
    """The watch breaks (etcd killed); while it waits to retry, etcd comes back and is
    compacted past the watch's revision: resuming must hit 'compacted' and re-list."""
    caplog.set_level(logging.INFO, logger="registry")
    layout = KeyLayout("/ringmesh/v1")

    async def scenario() -> None:
        broken = asyncio.Event()
        may_retry = asyncio.Event()

        async def gated_sleep(seconds: float) -> None:
            broken.set()
            await may_retry.wait()
            await asyncio.sleep(seconds)

        config = EtcdConfig.from_urls(etcd.url, timeout=1.0)
        async with EtcdClient(config) as client, EtcdClient(config) as other:
            watch = TopologyWatch(client, layout, sleep=gated_sleep, backoff=quick_retry)
            for name in ("a", "b"):
                await other.put(layout.instance("echo", name), record(name).to_json(), lease=None)
            async with running(watch.run()) as task:
                await eventually(
                    lambda: ids(watch.topology) == {"echo/a", "echo/b"},
                    within=5,
                    what="first topology",
                    task=task,
                )
                etcd.kill()
                await asyncio.wait_for(broken.wait(), 10)
                stopped_at = watch.revision
                etcd.start()

                c = record("c").to_json()
                await put_retrying(other, layout.instance("echo", "c"), c, within=10)
                await other.delete(layout.instance("echo", "a"))
                compacted = await _compact_all(other, etcd.url, layout.instances)
                assert compacted > stopped_at + 1
                assert ids(watch.topology) == {"echo/a", "echo/b"}  # still the last known one

                may_retry.set()
                await eventually(
                    lambda: ids(watch.topology) == {"echo/b", "echo/c"},
                    within=10,
                    what="re-listed topology",
                    task=task,
                )
                assert "compacted" in caplog.text
                assert watch.revision >= compacted
                await other.put(layout.instance("echo", "d"), record("d").to_json(), lease=None)
                await eventually(
                    lambda: "echo/d" in ids(watch.topology),
                    within=5,
                    what="live after the re-list",
                    task=task,
                )

    asyncio.run(scenario())


# --- 7. garbage in etcd ---------------------------------------------------------------------


def _garbage(layout: KeyLayout) -> dict[str, bytes]:
    inst = layout.instances
    return {
        f"{inst}echo/not-json": b"{this is not json",
        f"{inst}echo/not-utf8": b"\xff\xfe\x00",
        f"{inst}echo/a-list": b'["echo", "a-list"]',
        f"{inst}echo/wrong-type": json.dumps(
            {"id": "wrong-type", "service": "echo", "address": "127.0.0.1:1", "weight": "heavy"}
        ).encode(),
        f"{inst}echo/no-address": b'{"id": "no-address", "service": "echo"}',
        f"{inst}echo/bad-port": json.dumps(
            {"id": "bad-port", "service": "echo", "address": "127.0.0.1:99999"}
        ).encode(),
        # the key and the body disagree: on the id, on the service
        f"{inst}echo/liar": record("someone-else").to_json(),
        f"{inst}echo/wrong-service": record("wrong-service", service="other").to_json(),
        # a key that is not a valid instances key at all
        f"{inst}Bad_Service/x": record("x").to_json(),
        f"{inst}echo": record("echo").to_json(),
    }


def test_garbage_records_are_skipped(
    shared_etcd: EmbeddedEtcd, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry")
    layout = KeyLayout(prefix)
    garbage = _garbage(layout)

    async def scenario() -> None:
        async with EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as client:
            for name in ("good-1", "good-2"):
                await client.put(layout.instance("echo", name), record(name).to_json(), lease=None)
            for key, value in garbage.items():
                await client.put(key, value, lease=None)

            # A listing skips the garbage and keeps the rest.
            topology = await read_topology(client, layout)
            assert ids(topology) == {"echo/good-1", "echo/good-2"}
            assert skipped_keys(caplog) == set(garbage)

            # So does a running watch, receiving each piece of garbage as an event.
            caplog.clear()
            for key in garbage:
                await client.delete(key)
            watch = TopologyWatch(client, layout)
            async with running(watch.run()) as task:
                await asyncio.wait_for(watch.ready.wait(), 5)
                assert ids(watch.topology) == {"echo/good-1", "echo/good-2"}
                for key, value in garbage.items():
                    await client.put(key, value, lease=None)
                # A valid record overwritten with garbage leaves the topology.
                good_2 = layout.instance("echo", "good-2")
                await client.put(good_2, b"garbage", lease=None)
                last_revision = await client.put(
                    layout.instance("echo", "last"), record("last").to_json(), lease=None
                )
                await eventually(
                    lambda: "echo/last" in ids(watch.topology),
                    within=5,
                    what="a valid record after the garbage",
                    task=task,
                )
                assert ids(watch.topology) == {"echo/good-1", "echo/last"}
                assert skipped_keys(caplog) == {*garbage, good_2}
                assert watch.revision == last_revision

    asyncio.run(scenario())


# Values that once made the parser raise something other than RecordError
# (RecursionError, ValueError, OverflowError), which killed the watch task.
_CRASHING = {
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "unicode-digit-port": json.dumps(
        {"id": "bad", "service": "echo", "address": "127.0.0.1:\u00b2"}
    ).encode(),
    "huge-started-at": json.dumps(
        {"id": "bad", "service": "echo", "address": "127.0.0.1:1", "started_at": 10**400}
    ).encode(),
    # int() of more than 4300 digits raises ValueError (Python's max-str-digits limit)
    "huge-digit-port": json.dumps(
        {"id": "bad", "service": "echo", "address": "127.0.0.1:" + "1" * 5000}
    ).encode(),
}


@pytest.mark.parametrize("value", list(_CRASHING.values()), ids=list(_CRASHING))
def test_garbage_that_breaks_the_parser_is_skipped(
    shared_etcd: EmbeddedEtcd, prefix: str, value: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry")
    layout = KeyLayout(prefix)
    bad = layout.instance("echo", "bad")

    async def scenario() -> None:
        async with EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as client:
            await client.put(layout.instance("echo", "good"), record("good").to_json(), lease=None)
            watch = TopologyWatch(client, layout)
            async with running(watch.run()) as task:
                await asyncio.wait_for(watch.ready.wait(), 5)
                await client.put(bad, value, lease=None)
                await client.put(
                    layout.instance("echo", "last"), record("last").to_json(), lease=None
                )
                await eventually(
                    lambda: "echo/last" in ids(watch.topology),
                    within=5,
                    what="a valid record after the garbage",
                    task=task,
                )
                assert ids(watch.topology) == {"echo/good", "echo/last"}
            topology = await read_topology(client, layout)
            assert ids(topology) == {"echo/good", "echo/last"}
            assert bad in skipped_keys(caplog)

    asyncio.run(scenario())


def test_a_watch_of_an_unreachable_etcd_backs_off_to_2_s_between_tries() -> None:
    """Nothing listens at the address: every try fails at once, and the waits between
    them double from 0.25 s up to the 2 s cap (full jitter: here its longest draw),
    instead of a fixed 0.5 s that a whole fleet would repeat in step."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 7:
            raise asyncio.CancelledError

    async def scenario() -> None:
        url = f"http://127.0.0.1:{free_port()}"
        async with EtcdClient(EtcdConfig.from_urls(url, timeout=1.0)) as client:
            watch = TopologyWatch(
                client,
                KeyLayout("/ringmesh/v1"),
                sleep=sleep,
                backoff=lambda: Backoff(base=0.25, cap=2.0, random_source=lambda: 1.0),
            )
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(watch.run(), 30)

    asyncio.run(scenario())
    assert waits == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
