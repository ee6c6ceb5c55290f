"""The sidecar end to end: real etcd, real demo apps, real sidecar processes."""

from __future__ import annotations

import asyncio
import json
import math
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from proto import demo_pb2
from registry.etcd import EtcdClient, EtcdConfig
from registry.keys import KeyLayout
from registry.records import InstanceRecord
from registry.scaling import Target
from registry.watch import watch_backoff
from ringmesh import cli
from sidecar.routing import RoutingTable
from tests.mesh import Instance, Mesh, stats
from tests.waiting import until

pytestmark = pytest.mark.integration


def keyed(key: str, service: str = "echo") -> tuple[tuple[str, str], ...]:
    return (("ringmesh-service", service), ("ringmesh-hash-key", key))


def owners(mesh: Mesh, keys: list[str], service: str = "echo") -> dict[str, str]:
    table = RoutingTable.build(mesh.topology())
    return {key: table.route(service, key)[0].id for key in keys}


def test_streaming_kinds_pass_through_intact(mesh: Mesh) -> None:
    echo = mesh.add("echo")
    client = mesh.add("client")
    md = keyed("stream-key")
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        replies = list(stub.Count(demo_pb2.CountRequest(n=50), metadata=md, timeout=10))
        assert [r.text for r in replies] == [str(i) for i in range(50)]
        assert {r.instance for r in replies} == {echo.name}

        big = b"x" * 100_000
        requests = (demo_pb2.CountRequest(n=i, payload=big) for i in range(1, 21))
        total = stub.Sum(requests, metadata=md, timeout=10)
        assert (total.total, total.messages, total.instance) == (210, 20, echo.name)

        chat = stub.Chat(
            (demo_pb2.EchoRequest(text=f"m{i}") for i in range(30)), metadata=md, timeout=10
        )
        assert [r.text for r in chat] == [f"m{i}" for i in range(30)]


def test_metadata_and_deadline_pass_through(mesh: Mesh) -> None:
    mesh.add("echo")
    client = mesh.add("client")
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        _reply, call = stub.Echo.with_call(
            demo_pb2.EchoRequest(text="hi"),
            metadata=(*keyed("k"), ("x-echo", "round-trip")),
            timeout=5,
        )
        assert ("x-echo", "round-trip") in tuple(call.trailing_metadata())

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(
                demo_pb2.EchoRequest(text="slow", delay_ms=3000), metadata=keyed("k"), timeout=0.3
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5


def test_ring_changes_move_only_the_keys_they_must(mesh: Mesh) -> None:
    for _ in range(3):
        mesh.add("echo")
    keys = [f"key-{i}" for i in range(10_000)]
    before = owners(mesh, keys)
    fourth = mesh.add("echo")
    after = owners(mesh, keys)
    moved = [k for k in keys if before[k] != after[k]]
    assert moved, "a new instance must take some keys"
    assert all(after[k] == fourth.name for k in moved)

    client = mesh.add("client")
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        for key in moved[:50]:
            assert (
                stub.Echo(demo_pb2.EchoRequest(text=key), metadata=keyed(key), timeout=5).instance
                == fourth.name
            )

    leaving = next(
        name for name in mesh.instances if name != fourth.name and name.startswith("echo")
    )
    mesh.instances[leaving].sidecar.stop()
    final = owners(mesh, keys)
    changed = [k for k in keys if final[k] != after[k]]
    assert changed and all(after[k] == leaving for k in changed)


def test_hot_keys_never_exceed_the_load_bound(mesh: Mesh) -> None:
    n_instances, concurrency, calls_per_worker = 3, 24, 25
    for _ in range(n_instances):
        mesh.add("echo")
    client = mesh.add("client")
    bound = math.ceil(1.25 * concurrency / n_instances)
    rng = random.Random(7)
    weights = [1 / (rank**1.1) for rank in range(1, 201)]
    plan = [rng.choices(range(200), weights, k=calls_per_worker) for _ in range(concurrency)]
    peak: dict[str, int] = defaultdict(int)
    lock = threading.Lock()

    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        start = threading.Barrier(concurrency)

        def worker(keys: list[int]) -> None:
            start.wait()
            for k in keys:
                reply = stub.Echo(
                    demo_pb2.EchoRequest(text="z", delay_ms=40),
                    metadata=keyed(f"hot-{k}"),
                    timeout=10,
                )
                with lock:
                    peak[reply.instance] = max(peak[reply.instance], reply.inflight)

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(worker, plan))
    # Zipf(1.1) keys put most calls on one owner; the bound spreads them.
    assert len(peak) == n_instances
    assert max(peak.values()) <= bound, (peak, bound)


def test_sigterm_deregisters_at_once_sigkill_within_ttl(mesh: Mesh) -> None:
    graceful = mesh.add("echo", None, "--ttl", "3")
    killed = mesh.add("echo", None, "--ttl", "3")
    assert set(mesh.topology().services["echo"]) == {graceful.name, killed.name}

    graceful.sidecar.signal(signal.SIGTERM)
    assert graceful.sidecar.proc.wait(timeout=15) == 0
    assert graceful.name not in mesh.topology().services["echo"]

    killed.sidecar.signal(signal.SIGKILL)
    killed.sidecar.proc.wait(timeout=5)
    # TTL, plus etcd's expiry check and the revoke's raft round on a busy machine.
    gone_at = time.monotonic() + 3 + 4
    while killed.name in mesh.topology().services.get("echo", {}):
        assert time.monotonic() < gone_at, "a SIGKILLed instance must leave within its TTL"
        time.sleep(0.2)


def test_a_new_instance_is_routed_to_within_a_second(mesh: Mesh) -> None:
    mesh.add("echo")
    client = mesh.add("client")
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        new = mesh.add("echo")
        registered = time.monotonic()
        keys = [
            k
            for k, owner in owners(mesh, [f"n-{i}" for i in range(200)]).items()
            if owner == new.name
        ]
        assert keys
        while True:
            reply = stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=keyed(keys[0]), timeout=5)
            if reply.instance == new.name:
                break
            assert time.monotonic() - registered < 1.0, "new instance not routed to within 1 s"
            time.sleep(0.01)


def test_errors_follow_the_contract(mesh: Mesh) -> None:
    echo = mesh.add("echo", None, "--ttl", "3")
    client = mesh.add("client")
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)

        def fail(md: tuple[tuple[str, str], ...]) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as err:
                stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=md, timeout=5)
            return err.value

        unknown = fail(keyed("k", service="nosuch"))
        assert unknown.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "nosuch" in unknown.details()

        bad = fail(keyed("k", service="Bad_Name"))
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Bad_Name" in bad.details()

        # Garbage under instances/ is skipped, never fatal: routing goes on.
        async def put_garbage() -> None:
            async with EtcdClient(EtcdConfig.from_urls(mesh.etcd.url)) as c:
                await c.put(mesh.layout.instance("echo", "garbage-1"), b"{not json", lease=None)
                wrong = InstanceRecord(id="other", service="echo", address="127.0.0.1:1").to_json()
                await c.put(mesh.layout.instance("echo", "garbage-2"), wrong, lease=None)

        asyncio.run(put_garbage())
        log_name = f"sidecar-{client.name}"
        deadline = time.monotonic() + 5
        while not all(f"skipping {mesh.layout.instance('echo', g)}" in mesh.log_text(log_name)
                      for g in ("garbage-1", "garbage-2")):  # fmt: skip
            assert time.monotonic() < deadline, "garbage records must be skipped with a log line"
            time.sleep(0.1)
        for i in range(20):
            reply = stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=keyed(f"g{i}"), timeout=5)
            assert reply.instance == echo.name

        # The app behind an inbound sidecar is down: UNAVAILABLE, not processed.
        echo.app.kill()
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=keyed("k"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ("ringmesh-not-processed", "1") in tuple(err.value.trailing_metadata())

        # Its sidecar too: once the lease is gone there is no live instance.
        echo.sidecar.kill()
        deadline = time.monotonic() + 6
        while True:
            err_value = fail(keyed("k"))
            if err_value.details() == "no live instance of service 'echo'":
                assert err_value.code() == grpc.StatusCode.UNAVAILABLE
                break
            assert time.monotonic() < deadline, err_value.details()
            time.sleep(0.2)


def test_topology_command_shows_instances_shares_and_ttl(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    a = mesh.add("echo", None, "--weight", "3")
    b = mesh.add("echo")
    capsys.readouterr()
    assert cli.main(["topology", "--json", "--etcd", mesh.etcd.url, "--prefix", mesh.prefix]) == 0
    doc = json.loads(capsys.readouterr().out)
    instances = {i["id"]: i for i in doc["services"]["echo"]["instances"]}
    assert set(instances) == {a.name, b.name}
    assert instances[a.name]["weight"] == 3
    assert instances[a.name]["ring_share"] > instances[b.name]["ring_share"] > 0.1
    assert abs(sum(i["ring_share"] for i in instances.values()) - 1.0) < 0.01
    assert all(0 < i["lease_ttl"] <= 10 for i in instances.values())
    assert instances[b.name]["address"] == b.address
    assert instances[b.name]["grpc_services"] == ["ringmesh.demo.v1.Demo"]

    text = subprocess.run(
        [sys.executable, "-m", "ringmesh", "topology", "--etcd", mesh.etcd.url, "--prefix", mesh.prefix],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "SERVICE" in text and a.name in text and b.address in text


def test_etcd_outage_does_not_stop_routing(own_mesh: Mesh) -> None:
    mesh = own_mesh
    echoes = [mesh.add("echo") for _ in range(3)]
    client = mesh.add("client")
    failures: list[str] = []
    calls = 0
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)

        def call_for(seconds: float) -> None:
            nonlocal calls
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                key = f"o-{calls % 100}"
                try:
                    stub.Echo(demo_pb2.EchoRequest(text=key), metadata=keyed(key), timeout=5)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")
                calls += 1

        call_for(0.5)
        mesh.etcd.kill()
        call_for(5.0)
        mesh.etcd.start()
        call_for(1.0)
        assert failures == []
        assert calls > 100

        # Everyone is registered again, and the watch sees changes made now.
        deadline = time.monotonic() + 10
        while set(mesh.topology().services.get("echo", {})) != {e.name for e in echoes}:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        late = mesh.add("echo")
        keys = [
            k for k, o in owners(mesh, [f"l-{i}" for i in range(300)]).items() if o == late.name
        ]
        # The client's watch may still be waiting out its retry backoff (at most its cap).
        deadline = time.monotonic() + 2 + watch_backoff().cap
        while (
            stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=keyed(keys[0]), timeout=5).instance
            != late.name
        ):
            assert time.monotonic() < deadline, "the client sidecar's watch did not resume"
            time.sleep(0.05)


@pytest.mark.parametrize("delay_ms", [1500, 7000])
def test_sigterm_finishes_in_flight_calls(mesh: Mesh, delay_ms: int) -> None:
    """Short calls, and calls longer than a channel's close grace (5 s) within --drain-grace."""
    echo = mesh.add("echo")
    client = mesh.add("client")
    with mesh.channel(client.outbound) as channel, ThreadPoolExecutor(4) as pool:
        stub = mesh.stub(channel)
        slow = [
            pool.submit(
                stub.Echo,
                demo_pb2.EchoRequest(text=str(i), delay_ms=delay_ms),
                metadata=keyed(f"s{i}"),
                timeout=12,
            )
            for i in range(4)
        ]
        until(
            lambda: stats(echo)["inflight"]["inbound"] == 4,
            within=5,
            what="the calls in flight at the echo instance",
        )
        echo.sidecar.signal(signal.SIGTERM)
        assert [f.result().text for f in slow] == ["0", "1", "2", "3"]
        assert echo.sidecar.proc.wait(timeout=15) == 0


def test_a_draining_instance_serves_peers_that_have_not_seen_the_drain(mesh: Mesh) -> None:
    """A peer whose watch lags (modelled: a client calling the inbound port
    directly, which never reads etcd) keeps sending after the drain began; the
    drain lasts while calls keep arriving, within --drain-grace."""
    echo = mesh.add("echo", None, "--drain-grace", "5")
    outcomes: list[str] = []
    readiness: list[int] = []
    with grpc.insecure_channel(echo.address) as channel:
        stub = mesh.stub(channel)
        stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=keyed("k"), timeout=5)
        echo.sidecar.signal(signal.SIGTERM)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            try:
                stub.Echo(
                    demo_pb2.EchoRequest(text="x", delay_ms=20), metadata=keyed("k"), timeout=5
                )
                outcomes.append("ok")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
            if len(outcomes) == 3:  # mid-drain
                readiness.append(ready_status(echo))
            time.sleep(0.05)  # gaps in which nothing is in flight
    assert outcomes and set(outcomes) == {"ok"}, outcomes
    assert readiness == [503], "not ready while draining: no new traffic, please"
    assert echo.sidecar.proc.wait(timeout=10) == 0


def ready_status(instance: Instance) -> int:
    try:
        with urllib.request.urlopen(f"http://{instance.admin}/ready", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_topology_watch_prints_each_change(mesh: Mesh) -> None:
    first = mesh.add("echo")
    watcher = subprocess.Popen(
        [sys.executable, "-m", "ringmesh", "topology", "--watch", "--json", "--etcd", mesh.etcd.url, "--prefix", mesh.prefix],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    guard = threading.Timer(30, watcher.kill)  # never hang the suite on a silent watcher
    guard.start()
    try:
        assert watcher.stdout is not None
        doc = json.loads(watcher.stdout.readline())
        assert [i["id"] for i in doc["services"]["echo"]["instances"]] == [first.name]
        second = mesh.add("echo")
        while True:  # one document per change; the new instance shows up
            doc = json.loads(watcher.stdout.readline())
            ids = {i["id"] for i in doc["services"]["echo"]["instances"]}
            if second.name in ids:
                assert ids == {first.name, second.name}
                break
        assert doc["services"]["echo"]["target"] is None

        async def decide() -> None:  # what a leading scaler writes
            target = Target(
                replicas=5,
                previous=2,
                reason="test",
                metric=1.0,
                decided_at=0.0,
                term=1,
                leader="s",
            )
            async with EtcdClient(EtcdConfig.from_urls(mesh.etcd.url)) as client:
                await client.put(
                    KeyLayout(mesh.prefix).target("echo"), target.to_json(), lease=None
                )

        asyncio.run(decide())
        doc = json.loads(watcher.stdout.readline())  # a new target prints too
        assert doc["services"]["echo"]["target"] == 5
    finally:
        guard.cancel()
        watcher.terminate()
        watcher.wait(timeout=10)


@pytest.mark.parametrize("flag", ["--outbound", "--inbound", "--admin"])
def test_a_port_in_use_is_a_clear_usage_error(flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--outbound": "127.0.0.1:0", "--inbound": "127.0.0.1:0", "--admin": "127.0.0.1:0"}
        ports[flag] = f"127.0.0.1:{port}"
        args = [arg for pair in ports.items() for arg in pair]
        done = subprocess.run(
            [sys.executable, "-m", "ringmesh", "sidecar", "--service", "echo", "--app", "127.0.0.1:1",
             "--etcd", "http://127.0.0.1:1", *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert done.returncode == 2
    assert (
        f"cannot listen on {'--admin ' if flag == '--admin' else ''}127.0.0.1:{port}" in done.stderr
    )
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
