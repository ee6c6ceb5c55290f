"""``authz/<service>`` against a real etcd: the CLI, the compare-and-swap, AuthzWatch.

Tests that kill etcd get their own (the ``etcd`` fixture); the others share one
and keep to their own key prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from registry.authz import (
    DENY_ALL,
    AuthzMap,
    AuthzRecord,
    AuthzWatch,
    change_authz,
    read_authz,
)
from registry.embedded import EmbeddedEtcd
from registry.errors import EtcdUnavailable
from registry.etcd import EtcdClient, EtcdConfig
from registry.keys import KeyLayout
from registry.lease import Backoff
from ringmesh import cli
from tests.waiting import eventually

pytestmark = pytest.mark.integration


def ringmesh(etcd: EmbeddedEtcd, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringmesh", *args, "--etcd", etcd.url, "--prefix", prefix],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def authz(
    etcd: EmbeddedEtcd, prefix: str, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """Run `ringmesh authz ARGS` in this process; (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main(["authz", *args, "--etcd", etcd.url, "--prefix", prefix])
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


async def stored(etcd: EmbeddedEtcd, key: str) -> bytes | None:
    async with EtcdClient(EtcdConfig.from_urls(etcd.url)) as client:
        found = await client.get(key)
        return None if found is None else found.value


@contextlib.asynccontextmanager
async def running(coro: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- the CLI ------------------------------------------------------------------------------


def test_allow_deny_show_round_trip(
    shared_etcd: EmbeddedEtcd, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = KeyLayout(prefix).authorization("payments")
    code, out, _ = authz(shared_etcd, prefix, capsys, "show", "payments")
    assert code == 0 and "no authz record: every mesh peer may call it" in out
    code, out, _ = authz(shared_etcd, prefix, capsys, "show", "payments", "--json")
    assert code == 0 and json.loads(out) == {"service": "payments", "allow": None}

    code, out, _ = authz(shared_etcd, prefix, capsys, "allow", "payments", "orders")
    assert code == 0 and json.loads(out) == {"allow": ["orders"]}
    assert authz(shared_etcd, prefix, capsys, "allow", "payments", "checkout")[0] == 0
    assert authz(shared_etcd, prefix, capsys, "allow", "payments", "orders")[0] == 0  # again
    assert asyncio.run(stored(shared_etcd, key)) == b'{"allow":["checkout","orders"]}'
    code, out, _ = authz(shared_etcd, prefix, capsys, "show", "payments")
    assert code == 0 and out == "payments: allows checkout, orders\n"
    code, out, _ = authz(shared_etcd, prefix, capsys, "show", "payments", "--json")
    assert json.loads(out) == {"service": "payments", "allow": ["checkout", "orders"]}

    code, out, err = authz(shared_etcd, prefix, capsys, "deny", "payments", "orders")
    assert code == 0 and json.loads(out) == {"allow": ["checkout"]} and err == ""
    assert authz(shared_etcd, prefix, capsys, "deny", "payments", "orders")[0] == 0  # again
    code, out, err = authz(shared_etcd, prefix, capsys, "deny", "payments", "checkout")
    assert code == 0 and json.loads(out) == {"allow": []}
    assert "allows no caller: every call to it is denied" in err  # said out loud
    assert asyncio.run(stored(shared_etcd, key)) == b'{"allow":[]}'
    code, out, _ = authz(shared_etcd, prefix, capsys, "show", "payments")
    assert "allows no caller" in out
    code, out, _ = authz(shared_etcd, prefix, capsys, "show", "payments", "--json")
    assert json.loads(out) == {"service": "payments", "allow": []}


def test_deny_without_a_record_is_refused_and_writes_nothing(
    shared_etcd: EmbeddedEtcd, prefix: str
) -> None:
    done = ringmesh(shared_etcd, prefix, "authz", "deny", "payments", "orders")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "ringmesh authz: no authz record for 'payments': every mesh peer may call it; "
        "`ringmesh authz allow payments CALLER` starts a list of the callers it accepts"
    ]
    key = KeyLayout(prefix).authorization("payments")
    assert asyncio.run(stored(shared_etcd, key)) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["allow", "Payments", "orders"], "invalid service name 'Payments'"),
        (["allow", "payments", "or_ders"], "CALLER: invalid service name 'or_ders'"),
        (["deny", "payments", "x-"], "CALLER: invalid service name 'x-'"),
        (["show", "pay/ments"], "invalid service name 'pay/ments'"),
        (["allow", "payments"], "required: caller"),
        (["grant", "payments", "orders"], "invalid choice: 'grant'"),
    ],
)
def test_bad_names_are_usage_errors_and_change_nothing(
    shared_etcd: EmbeddedEtcd,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    assert authz(shared_etcd, prefix, capsys, "allow", "payments", "search")[0] == 0
    code, _out, err = authz(shared_etcd, prefix, capsys, *args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    key = KeyLayout(prefix).authorization("payments")
    assert asyncio.run(stored(shared_etcd, key)) == b'{"allow":["search"]}'


def test_a_malformed_record_is_reported_and_left_alone(
    shared_etcd: EmbeddedEtcd, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = KeyLayout(prefix).authorization("payments")

    async def put_garbage() -> None:
        async with EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as client:
            await client.put(key, b'{"allow": "orders"}', lease=None)

    asyncio.run(put_garbage())
    for args in (["show", "payments"], ["allow", "payments", "x"], ["deny", "payments", "x"]):
        code, out, err = authz(shared_etcd, prefix, capsys, *args)
        assert code == 1 and out == ""
        assert f"{key} does not parse" in err and "deny every caller" in err
        assert len(err.strip().splitlines()) == 1, err
    assert asyncio.run(stored(shared_etcd, key)) == b'{"allow": "orders"}'


# --- compare-and-swap: concurrent writers lose nothing --------------------------------------


class RacingClient(EtcdClient):
    """Holds its first compare-and-swap until every racer has read: the first round collides."""

    def __init__(self, config: EtcdConfig, barrier: asyncio.Barrier, lost: list[str]) -> None:
        super().__init__(config)
        self._barrier: asyncio.Barrier | None = barrier
        self._lost = lost

    async def put_if_unchanged(
        self, key: str, value: bytes, *, lease: int | None, mod_revision: int
    ) -> bool:
        if self._barrier is not None:
            barrier, self._barrier = self._barrier, None
            await barrier.wait()
        swapped = await super().put_if_unchanged(key, value, lease=lease, mod_revision=mod_revision)
        if not swapped:
            self._lost.append(key)
        return swapped


def test_ten_concurrent_allows_all_land(shared_etcd: EmbeddedEtcd, prefix: str) -> None:
    layout = KeyLayout(prefix)
    callers = [f"caller-{i}" for i in range(10)]

    async def scenario() -> None:
        config = EtcdConfig.from_urls(shared_etcd.url, timeout=5.0)
        barrier = asyncio.Barrier(len(callers))
        lost: list[str] = []
        clients = [RacingClient(config, barrier, lost) for _ in callers]
        async with contextlib.AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)

            async def allow(client: EtcdClient, caller: str) -> bool:
                _record, wrote = await change_authz(
                    client, layout, "payments", lambda r: (r or AuthzRecord()).allowing(caller)
                )
                return wrote

            wrote = await asyncio.gather(*map(allow, clients, callers))
            assert all(wrote)
            # All ten read "no record", then raced: one created it, nine had to redo.
            assert len(lost) >= len(callers) - 1
            record = await read_authz(clients[0], layout, "payments")
            assert record is not None and record.allow == set(callers)

    asyncio.run(scenario())


def test_concurrent_allow_commands_all_land(shared_etcd: EmbeddedEtcd, prefix: str) -> None:
    callers = ["a", "b", "c", "d"]
    base = ["--etcd", shared_etcd.url, "--prefix", prefix]
    command = [sys.executable, "-m", "ringmesh", "authz", "allow", "payments"]
    procs = [
        subprocess.Popen(
            [*command, caller, *base], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for caller in callers
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    key = KeyLayout(prefix).authorization("payments")
    assert asyncio.run(stored(shared_etcd, key)) == b'{"allow":["a","b","c","d"]}'


def test_put_if_unchanged_compares_mod_revision(shared_etcd: EmbeddedEtcd, prefix: str) -> None:
    key = f"{prefix}/cas"

    async def scenario() -> None:
        async with EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as client:
            assert await client.put_if_unchanged(key, b"1", lease=None, mod_revision=0)
            assert not await client.put_if_unchanged(key, b"2", lease=None, mod_revision=0)
            first = await client.get(key)
            assert first is not None and first.value == b"1"
            assert await client.put_if_unchanged(
                key, b"3", lease=None, mod_revision=first.mod_revision
            )
            assert not await client.put_if_unchanged(
                key, b"4", lease=None, mod_revision=first.mod_revision
            )
            now = await client.get(key)
            assert now is not None and now.value == b"3" and now.lease == 0
            with pytest.raises(ValueError):
                await client.put_if_unchanged(key, b"5", lease=None, mod_revision=-1)

    asyncio.run(scenario())


# --- AuthzWatch -----------------------------------------------------------------------------


def test_watch_delivers_changes_within_a_second(
    shared_etcd: EmbeddedEtcd, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry")
    layout = KeyLayout(prefix)

    async def scenario() -> None:
        async with EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as client:
            await client.put(layout.authorization("vault"), b'{"allow":["admin"]}', lease=None)
            seen: list[tuple[float, dict[str, frozenset[str]]]] = []

            def on_change(rules: AuthzMap) -> None:
                seen.append((time.monotonic(), dict(rules)))

            watch = AuthzWatch(client, layout, on_change)
            async with running(watch.run()) as task:
                await asyncio.wait_for(watch.ready.wait(), 5)
                assert seen[-1][1] == {"vault": frozenset({"admin"})}

                async def change(key: str, value: bytes | None) -> dict[str, frozenset[str]]:
                    count = len(seen)
                    start = time.monotonic()
                    if value is None:
                        await client.delete(key)
                    else:
                        await client.put(key, value, lease=None)
                    await eventually(
                        lambda: len(seen) > count, within=1.0, what=f"{key} seen", task=task
                    )
                    assert seen[-1][0] - start < 1.0
                    return seen[-1][1]

                payments = layout.authorization("payments")
                got = await change(payments, b'{"allow":["orders"]}')
                assert got == {"payments": {"orders"}, "vault": {"admin"}}
                got = await change(payments, b'{"allow":["checkout","orders"]}')
                assert got["payments"] == {"checkout", "orders"}
                # Garbage fails closed: its service allows nobody, never everybody.
                got = await change(payments, b'{"allow":"orders"}')
                assert got == {"payments": DENY_ALL, "vault": {"admin"}}
                assert f"{payments} does not parse" in caplog.text
                got = await change(payments, None)
                assert got == {"vault": {"admin"}}  # no record: every peer again
                got = await change(payments, b'{"allow":[]}')
                assert got["payments"] == DENY_ALL

                # A key that names no valid service is skipped; an unchanged map is not resent.
                count = len(seen)
                await client.put(f"{layout.authorizations}Bad_Name", b'{"allow":[]}', lease=None)
                await client.put(layout.authorization("vault"), b'{"allow":["admin"]}', lease=None)
                last = await client.put(layout.authorization("zz"), b'{"allow":[]}', lease=None)
                await eventually(lambda: watch.revision >= last, within=1, what="caught up")
                assert len(seen) == count + 1 and seen[-1][1]["zz"] == DENY_ALL
                assert "Bad_Name" not in watch.rules
                assert f"skipping {layout.authorizations}Bad_Name" in caplog.text

    asyncio.run(scenario())


def test_watch_keeps_the_rules_while_etcd_is_down_and_resumes(
    etcd: EmbeddedEtcd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry")
    layout = KeyLayout()

    async def scenario() -> None:
        config = EtcdConfig.from_urls(etcd.url, timeout=1.0)
        async with EtcdClient(config) as client, EtcdClient(config) as other:
            await other.put(layout.authorization("payments"), b'{"allow":["orders"]}', lease=None)
            seen: list[AuthzMap] = []
            watch = AuthzWatch(
                client, layout, seen.append, backoff=lambda: Backoff(base=0.1, cap=0.1)
            )
            async with running(watch.run()) as task:
                await asyncio.wait_for(watch.ready.wait(), 5)
                assert watch.rules == {"payments": {"orders"}}

                etcd.kill()
                await eventually(
                    lambda: "authz watch broken" in caplog.text,
                    within=10,
                    what="the watch to break",
                    task=task,
                )
                during, delivered = watch.rules, len(seen)
                outage_end = time.monotonic() + 2
                while time.monotonic() < outage_end:
                    assert watch.rules is during and not task.done()
                    await asyncio.sleep(0.1)
                assert len(seen) == delivered  # nothing delivered while etcd was down
                assert during == {"payments": {"orders"}}

                etcd.start()
                deadline = time.monotonic() + 10
                while True:
                    try:
                        await other.put(
                            layout.authorization("payments"),
                            b'{"allow":["checkout","orders"]}',
                            lease=None,
                        )
                        break
                    except EtcdUnavailable:
                        assert time.monotonic() < deadline, "etcd did not come back"
                        await asyncio.sleep(0.1)
                await eventually(
                    lambda: watch.rules.get("payments") == frozenset({"checkout", "orders"}),
                    within=10,
                    what="the change after the restart",
                    task=task,
                )
                assert "authz watch resumed" in caplog.text

                # Live again: a change now shows within a second.
                await other.put(layout.authorization("vault"), b'{"allow":[]}', lease=None)
                await eventually(
                    lambda: "vault" in watch.rules, within=1, what="live after restart", task=task
                )
                assert seen[-1] == {"payments": {"checkout", "orders"}, "vault": DENY_ALL}

    asyncio.run(scenario())
