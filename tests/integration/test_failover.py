"""Failover that loses nothing: kills, drains, etcd outages and black holes under load."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from proto import demo_pb2
from registry.etcd import EtcdClient, EtcdConfig
from registry.records import InstanceRecord
from ringmesh.procs import Child, python_module
from sidecar.routing import RoutingTable
from tests.load import Load
from tests.mesh import Instance, Mesh, stats
from tests.waiting import until

pytestmark = pytest.mark.integration


def three_and_a_client(mesh: Mesh, *extra: str) -> tuple[list[Instance], Instance]:
    echoes = [mesh.add("echo", None, *extra) for _ in range(3)]
    return echoes, mesh.add("client")


def victim_with_keys(mesh: Mesh, echoes: list[Instance], keys: int = 200) -> Instance:
    """The echo instance owning the most of the load's keys (so the kill matters)."""
    table = RoutingTable.build(mesh.topology())
    owned = {e.name: 0 for e in echoes}
    for i in range(keys):
        owned[table.route("echo", f"key-{i}")[0].id] += 1
    name = max(owned, key=lambda n: owned[n])
    return next(e for e in echoes if e.name == name)


def run_with(load: Load, action: Any, before: float = 1.0, after: float = 2.5) -> float:
    """Run ``action`` under load; returns the moment it had taken effect."""
    with load:
        time.sleep(before)
        action()
        moment = time.monotonic()
        time.sleep(after)
    return moment


def assert_busy(load: Load, moment: float, victim: Instance) -> None:
    """The load really ran through the event: the victim served calls before it."""
    assert len(load.results) > 100
    assert any(r.ok and r.instance == victim.name and r.ended < moment for r in load.results)
    assert any(r.started > moment + 0.5 and r.ok for r in load.results)


def sigkill(victim: Instance, what: str) -> None:
    victim.app.kill()
    if what == "app-and-sidecar":
        victim.sidecar.kill()


@pytest.mark.parametrize("what", ["app", "app-and-sidecar"])
def test_sigkill_loses_no_idempotent_call(mesh: Mesh, what: str) -> None:
    echoes, client = three_and_a_client(mesh)
    victim = victim_with_keys(mesh, echoes)

    load = Load(client.outbound, callers=4, idempotent=True)
    moment = run_with(load, lambda: sigkill(victim, what))
    assert load.failures() == []
    assert_busy(load, moment, victim)
    assert any(r.attempts > 1 for r in load.results), "some calls must have failed over"
    retries = stats(client)["retries"]
    assert sum(retries.values()) > 0


def test_more_calls_in_flight_than_the_budget_all_fail_over(mesh: Mesh) -> None:
    """Six calls die with their instance at once; three may retry at a time.

    The budget (max(3, 20% of active)) lets three retry at once; the other
    three wait their turn (up to 1 s) instead of failing, since the first
    three take 400 ms. The victim's weight lets it hold all six (bounded loads).
    """
    victim = mesh.add("echo", None, "--weight", "20")
    for _ in range(2):
        mesh.add("echo")
    client = mesh.add("client")
    table = RoutingTable.build(mesh.topology())
    keys = (f"key-{i}" for i in range(1000))
    mine = [k for k in keys if table.route("echo", k)[0].id == victim.name][:6]
    with mesh.channel(client.outbound) as channel, ThreadPoolExecutor(len(mine)) as pool:
        stub = mesh.stub(channel)
        calls = [
            pool.submit(
                stub.Echo.with_call,
                demo_pb2.EchoRequest(text=key, delay_ms=400),
                metadata=(("ringmesh-service", "echo"), ("ringmesh-hash-key", key), ("ringmesh-idempotent", "1")),
                timeout=5,
            )
            for key in mine
        ]  # fmt: skip
        until(
            lambda: stats(victim)["inflight"]["inbound"] == len(mine),
            within=5,
            what="all six calls in flight at the victim",
        )
        sigkill(victim, "app-and-sidecar")  # all six are at the victim's app
        for future in calls:
            reply, call = future.result()
            assert reply.instance != victim.name
            assert ("ringmesh-attempts", "2") in tuple(call.trailing_metadata())
    doc = stats(client)
    assert doc["retries_in_flight_peak"] == 3 and doc["retry_budget_waits"] == 3
    assert doc["retry_budget_exhausted"] == 0


@pytest.mark.parametrize("what", ["app", "app-and-sidecar"])
def test_sigkill_fails_only_non_idempotent_calls_in_flight(mesh: Mesh, what: str) -> None:
    echoes, client = three_and_a_client(mesh)
    victim = victim_with_keys(mesh, echoes)

    load = Load(client.outbound, callers=4, idempotent=False, delay_ms=20)
    moment = run_with(load, lambda: sigkill(victim, what))
    assert_busy(load, moment, victim)
    late = [r for r in load.failures() if r.started > moment]
    assert late == [], ([(r.code, r.details) for r in late], stats(client))
    # The ones that may fail were in flight at the victim when it died.
    assert len(load.failures()) <= 4


def test_sigterm_drain_loses_no_call(mesh: Mesh) -> None:
    echoes, client = three_and_a_client(mesh)
    victim = victim_with_keys(mesh, echoes)

    def drain() -> None:
        victim.sidecar.signal(signal.SIGTERM)

    load = Load(client.outbound, callers=4, idempotent=False, delay_ms=20)
    moment = run_with(load, drain)
    assert victim.sidecar.proc.wait(timeout=15) == 0
    assert load.failures() == []
    assert_busy(load, moment, victim)
    assert victim.name not in mesh.topology().services["echo"]


def test_etcd_outage_loses_no_call_and_heals(own_mesh: Mesh) -> None:
    mesh = own_mesh
    echoes, client = three_and_a_client(mesh, "--ttl", "4")
    dead = echoes[0]
    # Idempotent: an instance also dies during the outage, with calls in flight on it.
    with Load(client.outbound, callers=4, idempotent=True) as load:
        time.sleep(0.5)
        mesh.etcd.kill()
        time.sleep(1.0)
        dead.sidecar.kill()  # dies while etcd is away: its lease must still end
        dead.app.kill()
        time.sleep(4.0)
        mesh.etcd.start()
        time.sleep(1.0)
    assert load.failures() == []
    assert len(load.results) > 100
    live = {e.name for e in echoes[1:]}
    deadline = time.monotonic() + 4 + 6  # TTL plus etcd's post-restart lease grace
    while set(mesh.topology().services.get("echo", {})) != live:
        assert time.monotonic() < deadline, mesh.topology().services.get("echo")
        time.sleep(0.2)


@pytest.fixture
def black_hole() -> Iterator[socket.socket]:
    """A peer that accepts TCP connections and never reads a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock
    sock.close()


def test_a_black_hole_peer_is_failed_over_and_ejected(
    mesh: Mesh, black_hole: socket.socket
) -> None:
    echoes, client = three_and_a_client(mesh)
    port = black_hole.getsockname()[1]
    record = InstanceRecord(id="black-hole", service="echo", address=f"127.0.0.1:{port}")

    async def register() -> int:
        async with EtcdClient(EtcdConfig.from_urls(mesh.etcd.url)) as etcd:
            lease = await etcd.grant_lease(60)
            await etcd.put(
                mesh.layout.instance("echo", "black-hole"), record.to_json(), lease=lease
            )
            return lease

    lease = asyncio.run(register())
    mesh.seen_by(client)
    table = RoutingTable.build(mesh.topology())
    keys = [f"bh-{i}" for i in range(400) if table.route("echo", f"bh-{i}")[0].id == "black-hole"]
    assert keys
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        for key in keys[:20]:
            started = time.monotonic()
            reply = stub.Echo(
                demo_pb2.EchoRequest(text=key),
                metadata=(("ringmesh-service", "echo"), ("ringmesh-hash-key", key)),
                timeout=3,
            )
            assert reply.instance in {e.name for e in echoes}
            assert time.monotonic() - started < 3
    doc = stats(client)
    assert "black-hole" in doc["ejected"]["echo"]
    assert doc["ejections"] >= 1

    async def revoke() -> None:
        async with EtcdClient(EtcdConfig.from_urls(mesh.etcd.url)) as etcd:
            await etcd.revoke_lease(lease)

    asyncio.run(revoke())


def test_all_instances_down_fails_fast_within_the_budget(mesh: Mesh) -> None:
    echoes, client = three_and_a_client(mesh, "--ttl", "30")
    for echo in echoes:  # registrations stay (long TTL) but nothing answers
        echo.sidecar.kill()
        echo.app.kill()
    load = Load(client.outbound, callers=16, idempotent=True, timeout=5)
    with load:
        time.sleep(2.0)
    failures = load.failures()
    assert failures and len(failures) == len(load.results)
    assert all(r.code == "UNAVAILABLE" and "service 'echo'" in r.details for r in failures)
    assert max(r.ended - r.started for r in failures) < 1.0
    doc = stats(client)
    # 16 callers: at most max(3, 20% of 16) = 3 retrying calls at once; the
    # others wait their turn (at most 1 s) instead of hammering.
    assert doc["retries_in_flight_peak"] == 3
    assert doc["retry_budget_waits"] > 0
    assert doc["attempts"] <= 3 * doc["calls"]


def test_not_processed_calls_are_retried_even_when_not_idempotent(mesh: Mesh) -> None:
    echoes, client = three_and_a_client(mesh)
    victim = victim_with_keys(mesh, echoes)
    victim.app.kill()  # its sidecar answers ringmesh-not-processed
    table = RoutingTable.build(mesh.topology())
    key = next(
        f"key-{i}" for i in range(200) if table.route("echo", f"key-{i}")[0].id == victim.name
    )
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        reply, call = stub.Echo.with_call(
            demo_pb2.EchoRequest(text="x"),
            metadata=(("ringmesh-service", "echo"), ("ringmesh-hash-key", key)),
            timeout=5,
        )
        assert reply.instance == table.route("echo", key)[1].id, (
            "failover goes to the next ring instance"
        )
        assert ("ringmesh-attempts", "2") in tuple(call.trailing_metadata())


@pytest.mark.parametrize("kind", ["client-stream", "server-stream", "bidi"])
def test_streaming_calls_are_retried_before_their_first_response(mesh: Mesh, kind: str) -> None:
    echoes, client = three_and_a_client(mesh)
    victim = victim_with_keys(mesh, echoes)
    victim.app.kill()  # its sidecar answers ringmesh-not-processed
    table = RoutingTable.build(mesh.topology())
    key = next(
        f"key-{i}" for i in range(200) if table.route("echo", f"key-{i}")[0].id == victim.name
    )
    fallback = table.route("echo", key)[1].id
    md = (("ringmesh-service", "echo"), ("ringmesh-hash-key", key))
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        if kind == "client-stream":
            # Every buffered request message reaches the next instance.
            requests = (demo_pb2.CountRequest(n=i, payload=b"p" * 1000) for i in range(1, 11))
            total, call = stub.Sum.with_call(requests, metadata=md, timeout=5)
            assert (total.total, total.messages, total.instance) == (55, 10, fallback)
            trailing = call.trailing_metadata()
        elif kind == "server-stream":
            replies = stub.Count(demo_pb2.CountRequest(n=5), metadata=md, timeout=5)
            assert [r.instance for r in replies] == [fallback] * 5
            trailing = replies.trailing_metadata()
        else:
            chat = stub.Chat((demo_pb2.EchoRequest(text=t) for t in "abc"), metadata=md, timeout=5)
            assert [(r.text, r.instance) for r in chat] == [
                ("a", fallback),
                ("b", fallback),
                ("c", fallback),
            ]
            trailing = chat.trailing_metadata()
    assert ("ringmesh-attempts", "2") in tuple(trailing)


def test_a_fast_client_stream_to_an_instance_whose_app_died_fails_over(mesh: Mesh) -> None:
    """The inbound sidecar lets the caller finish sending before it answers
    not-processed; answering mid-send made gRPC report INTERNAL instead."""
    echoes, client = three_and_a_client(mesh)
    victim = victim_with_keys(mesh, echoes)
    victim.app.kill()
    table = RoutingTable.build(mesh.topology())
    keys = [f"key-{i}" for i in range(400) if table.route("echo", f"key-{i}")[0].id == victim.name]
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        for key in keys[:10]:
            md = (("ringmesh-service", "echo"), ("ringmesh-hash-key", key))
            requests = (demo_pb2.CountRequest(n=1, payload=b"p" * 1000) for _ in range(60))
            reply = stub.Sum(requests, metadata=md, timeout=5)
            assert (reply.messages, reply.instance) == (60, table.route("echo", key)[1].id)


def test_a_slow_client_stream_to_an_instance_whose_app_died_fails_over(mesh: Mesh) -> None:
    """The caller sends for longer than the inbound sidecar waits before answering
    not-processed: its answer arrives mid-send and must still be read as such."""
    echoes, client = three_and_a_client(mesh)
    victim = victim_with_keys(mesh, echoes)
    victim.app.kill()
    table = RoutingTable.build(mesh.topology())
    key = next(
        f"key-{i}" for i in range(200) if table.route("echo", f"key-{i}")[0].id == victim.name
    )

    def slowly() -> Iterator[demo_pb2.CountRequest]:
        for i in range(1, 9):  # 8 messages over ~0.5 s
            yield demo_pb2.CountRequest(n=i, payload=b"p" * 1000)
            time.sleep(0.06)

    md = (("ringmesh-service", "echo"), ("ringmesh-hash-key", key))
    with mesh.channel(client.outbound) as channel:
        reply, call = mesh.stub(channel).Sum.with_call(slowly(), metadata=md, timeout=5)
    assert (reply.total, reply.messages) == (36, 8)
    assert reply.instance == table.route("echo", key)[1].id
    assert ("ringmesh-attempts", "2") in tuple(call.trailing_metadata())


def test_a_restarted_app_is_back_in_rotation_within_seconds(mesh: Mesh) -> None:
    echoes, client = three_and_a_client(mesh)
    victim = victim_with_keys(mesh, echoes)
    table = RoutingTable.build(mesh.topology())
    key = next(
        f"key-{i}" for i in range(200) if table.route("echo", f"key-{i}")[0].id == victim.name
    )
    md = (("ringmesh-service", "echo"), ("ringmesh-hash-key", key))
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        victim.app.kill()
        assert (
            stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=md, timeout=5).instance
            != victim.name
        )
        # The same app comes back on the same port; its sidecar never went away.
        app = Child(
            "app again",
            python_module(
                "ringmesh.demo", "--port", str(victim.app_port), "--instance", victim.name
            ),
        )
        mesh.children.append(app)
        app.wait_event("listening")
        # Its sidecar's app probe (every 1 s) sees it, then the caller's probe of
        # the ejected peer (every 1 s) passes: ~2 s idle, bounded at 8 s busy.
        back = wait_for_instance(stub, md, victim.name, within=8.0)
    assert back < 8.0


def wait_for_instance(
    stub: Any, md: tuple[tuple[str, str], ...], name: str, *, within: float
) -> float:
    start = time.monotonic()
    while stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=md, timeout=5).instance != name:
        assert time.monotonic() - start < within, f"{name} not routed to again within {within} s"
        time.sleep(0.1)
    return time.monotonic() - start
