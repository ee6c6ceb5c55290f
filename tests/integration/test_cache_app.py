"""The cache demo app (ringmesh/cache.py) as a real process on 127.0.0.1, and behind sidecars."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from proto import cache_pb2, cache_pb2_grpc
from ringmesh.cache import backend_value
from ringmesh.procs import Child, cache_app, python_module, sidecar
from sidecar.routing import RoutingTable
from tests.mesh import Mesh

pytestmark = pytest.mark.integration

Start = Callable[..., str]  # start(name, *flags) -> the app's address


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Start cache apps (each waited for until it listens); all are stopped at the end."""
    children: list[Child] = []
    logs: list[IO[bytes]] = []

    def start(name: str, *flags: str) -> str:
        log = open(tmp_path / f"cache-{name}.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log)
        child = cache_app(name, stderr=log, extra=flags)
        children.append(child)
        event = child.wait_event("listening")
        assert event["instance"] == name
        return f"127.0.0.1:{event['port']}"

    try:
        yield start
    finally:
        for child in children:
            child.stop()
        for log in logs:
            log.close()


def stub(channel: grpc.Channel) -> cache_pb2_grpc.CacheStub:
    return cache_pb2_grpc.CacheStub(channel)


def timed_get(
    cache: cache_pb2_grpc.CacheStub, key: str, **kwargs: object
) -> tuple[cache_pb2.GetReply, float]:
    started = time.monotonic()
    reply = cache.Get(cache_pb2.GetRequest(key=key), timeout=10, **kwargs)
    return reply, time.monotonic() - started


def test_a_miss_waits_for_the_backend_and_the_next_get_hits(start: Start) -> None:
    address = start("c1", "--miss-ms", "400")
    with grpc.insecure_channel(address) as channel:
        cache = stub(channel)
        miss, miss_s = timed_get(cache, "k")
        assert (miss.key, miss.value, miss.hit, miss.instance, miss.version) == (
            "k",
            backend_value("k"),
            False,
            "c1",
            0,
        )
        assert miss_s >= 0.4
        hit, hit_s = timed_get(cache, "k")
        assert (hit.value, hit.hit, hit.instance, hit.version) == (
            backend_value("k"),
            True,
            "c1",
            0,
        )
        assert hit_s < 0.4, "a hit does not wait for the backend"


def test_concurrent_misses_wait_for_the_backend_together(start: Start) -> None:
    address = start("c1", "--miss-ms", "400")
    with grpc.insecure_channel(address) as channel:
        cache = stub(channel)
        cache.Get(cache_pb2.GetRequest(key="warm-up"), timeout=10)  # connected before timing
        started = time.monotonic()
        calls = [cache.Get.future(cache_pb2.GetRequest(key=f"k{i}"), timeout=10) for i in range(10)]
        replies = [call.result() for call in calls]
        elapsed = time.monotonic() - started
    assert [r.value for r in replies] == [backend_value(f"k{i}") for i in range(10)]
    assert not any(r.hit for r in replies)
    assert 0.4 <= elapsed < 2.0, f"10 misses of 0.4 s took {elapsed:.2f} s: not overlapped"


def test_put_writes_a_new_version_that_get_serves(start: Start) -> None:
    address = start("c1")
    with grpc.insecure_channel(address) as channel:
        cache = stub(channel)
        first = cache.Put(cache_pb2.PutRequest(key="k", value="one"), timeout=10)
        assert (first.instance, first.version) == ("c1", 1)
        reply = cache.Get(cache_pb2.GetRequest(key="k"), timeout=10)
        assert (reply.value, reply.version, reply.hit) == ("one", 1, True)
        assert cache.Put(cache_pb2.PutRequest(key="k", value="two"), timeout=10).version == 2
        assert cache.Get(cache_pb2.GetRequest(key="k"), timeout=10).value == "two"
        other = cache.Get(cache_pb2.GetRequest(key="other"), timeout=10)
        assert (other.value, other.version) == (backend_value("other"), 0)


def test_an_entry_expires_ttl_seconds_after_it_was_filled(start: Start) -> None:
    ttl = 1.0
    address = start("c1", "--ttl", str(ttl))
    with grpc.insecure_channel(address) as channel:
        cache = stub(channel)
        cache.Get(cache_pb2.GetRequest(key="warm-up"), timeout=10)  # connected before timing
        before_fill = time.monotonic()
        assert not cache.Get(cache_pb2.GetRequest(key="k"), timeout=10).hit
        after_fill = time.monotonic()
        assert cache.Get(cache_pb2.GetRequest(key="k"), timeout=10).hit
        assert time.monotonic() - before_fill < ttl, "the hit above was not within the TTL"
        # The entry was filled by after_fill at the latest: wait (by the clock) until it is old.
        time.sleep(max(0.0, after_fill + ttl - time.monotonic()))
        assert not cache.Get(cache_pb2.GetRequest(key="k"), timeout=10).hit
        assert cache.Get(cache_pb2.GetRequest(key="k"), timeout=10).hit, "and is filled again"


def test_watch_sends_the_current_value_then_every_put_of_its_key(start: Start) -> None:
    address = start("c1")
    with grpc.insecure_channel(address) as channel:
        cache = stub(channel)
        watch = cache.Watch(cache_pb2.WatchRequest(key="k"), timeout=20)
        other = cache.Watch(cache_pb2.WatchRequest(key="other"), timeout=20)
        try:
            first = next(watch)
            assert (first.key, first.value, first.version, first.instance) == (
                "k",
                backend_value("k"),
                0,
                "c1",
            )
            assert next(other).version == 0
            cache.Put(cache_pb2.PutRequest(key="k", value="one"), timeout=10)
            cache.Put(cache_pb2.PutRequest(key="k", value="two"), timeout=10)
            cache.Put(cache_pb2.PutRequest(key="other", value="x"), timeout=10)
            assert [(e.value, e.version) for e in (next(watch), next(watch))] == [
                ("one", 1),
                ("two", 2),
            ]
            event = next(other)
            assert (event.key, event.value, event.version) == ("other", "x", 1)
        finally:
            watch.cancel()
            other.cancel()
        with pytest.raises(grpc.RpcError) as err:
            next(watch)
        assert err.value.code() == grpc.StatusCode.CANCELLED


def test_a_put_during_the_watch_s_first_read_is_sent_once(start: Start) -> None:
    address = start("c1", "--miss-ms", "1000")
    with grpc.insecure_channel(address) as channel:
        cache = stub(channel)
        watch = cache.Watch(cache_pb2.WatchRequest(key="k"), timeout=20)
        try:
            # The Put writes 0.3 s after it arrives: by then the watch has subscribed and
            # its first read waits for the backend (1 s), which then returns the Put's value
            # while the Put is also queued for the watcher. (A watch that arrived after the
            # Put reads the same value as a hit.)
            put = cache.Put(
                cache_pb2.PutRequest(key="k", value="one"),
                metadata=(("x-delay-ms", "300"),),
                timeout=10,
            )
            first = next(watch)
            assert (put.version, first.value, first.version) == (1, "one", 1)
            cache.Put(cache_pb2.PutRequest(key="k", value="two"), timeout=10)
            event = next(watch)
            assert (event.value, event.version) == ("two", 2), "version 1 is sent once"
        finally:
            watch.cancel()


def test_metadata_makes_a_call_slow_or_fail_as_asked(start: Start) -> None:
    address = start("c1")
    with grpc.insecure_channel(address) as channel:
        cache = stub(channel)
        cache.Get(cache_pb2.GetRequest(key="k"), timeout=10)
        _reply, slow_s = timed_get(cache, "k", metadata=(("x-delay-ms", "300"),))
        assert slow_s >= 0.3

        with pytest.raises(grpc.RpcError) as err:
            cache.Put(
                cache_pb2.PutRequest(key="k", value="v"),
                metadata=(("x-abort", "NOT_FOUND"),),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert cache.Get(cache_pb2.GetRequest(key="k"), timeout=10).version == 0, (
            "an aborted Put writes nothing"
        )

        with pytest.raises(grpc.RpcError) as err:
            next(
                cache.Watch(
                    cache_pb2.WatchRequest(key="k"), metadata=(("x-abort", "ABORTED"),), timeout=10
                )
            )
        assert err.value.code() == grpc.StatusCode.ABORTED

        for bad in ("soon", "-5", "1.5"):
            with pytest.raises(grpc.RpcError) as err:
                timed_get(cache, "k", metadata=(("x-delay-ms", bad),))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "x-delay-ms" in (err.value.details() or "")


def test_slow_ms_delays_every_call_even_a_hit(start: Start) -> None:
    address = start("c1", "--slow-ms", "300", "--miss-ms", "0")
    with grpc.insecure_channel(address) as channel:
        cache = stub(channel)
        timed_get(cache, "k")
        reply, elapsed = timed_get(cache, "k")
        assert reply.hit
        assert elapsed >= 0.3


def test_fail_rate_fails_that_share_of_calls_with_unavailable(start: Start) -> None:
    always = start("always", "--fail-rate", "1")
    half = start("half", "--fail-rate", "0.5")
    with grpc.insecure_channel(always) as channel:
        cache = stub(channel)
        calls: list[Callable[[], object]] = [
            lambda: cache.Get(cache_pb2.GetRequest(key="k"), timeout=10),
            lambda: cache.Put(cache_pb2.PutRequest(key="k", value="v"), timeout=10),
            lambda: next(cache.Watch(cache_pb2.WatchRequest(key="k"), timeout=10)),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "--fail-rate" in (err.value.details() or "")
    with grpc.insecure_channel(half) as channel:
        cache = stub(channel)
        failed = 0
        for i in range(200):
            try:
                cache.Get(cache_pb2.GetRequest(key=f"k{i}"), timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                failed += 1
    # Binomial(200, 0.5): 100 +- 7; outside 50..150 is beyond 7 standard deviations.
    assert 50 < failed < 150


def test_health_is_serving_and_reflection_names_the_cache_service(start: Start) -> None:
    address = start("c1")
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = reflection.ServerReflectionInfo(iter([request]), timeout=10)
        names = {s.name for s in response.list_services_response.service}
        assert "ringmesh.cache.v1.Cache" in names


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_open_watches_and_exits_0_with_its_counters(
    sig: signal.Signals, tmp_path: Path
) -> None:
    with open(tmp_path / "cache.log", "wb") as log:
        proc = subprocess.Popen(
            python_module("ringmesh.cache", "--port", "0", "--instance", "c1"),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            assert proc.stdout is not None
            listening = json.loads(proc.stdout.readline())
            assert listening == {"event": "listening", "port": listening["port"], "instance": "c1"}
            with grpc.insecure_channel(f"127.0.0.1:{listening['port']}") as channel:
                cache = stub(channel)
                cache.Get(cache_pb2.GetRequest(key="k"), timeout=10)  # a miss
                watch = cache.Watch(cache_pb2.WatchRequest(key="k"), timeout=20)
                assert next(watch).version == 0  # a hit
                signalled = time.monotonic()
                proc.send_signal(sig)
                with pytest.raises(grpc.RpcError) as err:
                    next(watch)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "stopping" in (err.value.details() or "")
            rest, _ = proc.communicate(timeout=10)
            # Well within the server's 5 s grace: the open watch did not hold the stop up.
            assert time.monotonic() - signalled < 4
            assert proc.returncode == 0
            (stopped,) = [json.loads(line) for line in rest.splitlines()]
            assert stopped == {
                "event": "stopped",
                "instance": "c1",
                "hits": 1,
                "misses": 1,
                "evictions": 0,
                "expirations": 0,
                "entries": 1,
            }
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--instance", "c1", "--ttl", "0"], "argument --ttl: expected a number of seconds > 0"),
        (["--instance", "c1", "--capacity", "0"], "argument --capacity: expected a whole number"),
        (["--instance", "c1", "--fail-rate", "1.5"], "argument --fail-rate: expected a fraction"),
        (["--instance", "c1", "--miss-ms", "-1"], "argument --miss-ms: expected a number of"),
        (["--instance", "c1", "--slow-ms", "nan"], "argument --slow-ms: expected a number of"),
        (["--instance", "c1", "--port", "65536"], "argument --port: expected a port"),
        (["--instance", " "], "argument --instance: expected a non-empty name"),
        ([], "the following arguments are required: --instance"),
    ],
)
def test_bad_flags_exit_2_saying_which(flags: list[str], complaint: str) -> None:
    done = subprocess.run(
        python_module("ringmesh.cache", *flags), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert complaint in done.stderr
    assert done.stdout == ""


def test_behind_sidecars_each_key_misses_once_at_its_owner_then_hits(mesh: Mesh) -> None:
    names = ["cache-1", "cache-2"]
    apps: dict[str, str] = {}  # instance -> the app's own address
    for name in names:
        app = cache_app(name, stderr=mesh._log(f"app-{name}"), extra=("--miss-ms", "50"))
        mesh.children.append(app)
        apps[name] = f"127.0.0.1:{app.wait_event('listening')['port']}"
        side = sidecar(
            "cache", apps[name], mesh.etcd_url, "--prefix", mesh.prefix,
            "--instance-id", name, name=f"sidecar {name}", stderr=mesh._log(f"sidecar-{name}"),
        )  # fmt: skip
        mesh.children.append(side)
        side.wait_event("registered")
    # Started after both registered, so its first routing snapshot has them both.
    client = sidecar(
        "caller", None, mesh.etcd_url, "--prefix", mesh.prefix,
        name="sidecar caller", stderr=mesh._log("sidecar-caller"),
    )  # fmt: skip
    mesh.children.append(client)
    outbound = client.wait_event("ready")["outbound"]

    table = RoutingTable.build(mesh.topology())
    keys = [f"user-{i}" for i in range(20)]
    owners = {key: table.route("cache", key)[0].id for key in keys}
    assert set(owners.values()) == set(names), "20 keys on 2 instances: both own some"

    def keyed(key: str) -> tuple[tuple[str, str], ...]:
        return (("ringmesh-service", "cache"), ("ringmesh-hash-key", key))

    with grpc.insecure_channel(outbound) as channel:
        cache = stub(channel)
        for key in keys:
            replies = [
                cache.Get(cache_pb2.GetRequest(key=key), metadata=keyed(key), timeout=10)
                for _ in range(3)
            ]
            assert [(r.instance, r.hit) for r in replies] == [
                (owners[key], False),
                (owners[key], True),
                (owners[key], True),
            ], key

        # A Watch streams through the hop. The Put goes to the owner's app directly: at one
        # call in flight, bounded loads give one of the two instances a single slot, which
        # the open watch may hold, and a keyed Put through the sidecar would then spill to
        # the other instance (whose watchers are not this one).
        key = keys[0]
        watch = cache.Watch(cache_pb2.WatchRequest(key=key), metadata=keyed(key), timeout=20)
        try:
            assert next(watch).instance == owners[key]
            with grpc.insecure_channel(apps[owners[key]]) as direct:
                put = stub(direct).Put(cache_pb2.PutRequest(key=key, value="new"), timeout=10)
            event = next(watch)
            assert (put.version, event.value, event.version, event.instance) == (
                1,
                "new",
                1,
                owners[key],
            )
        finally:
            watch.cancel()
