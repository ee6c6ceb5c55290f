"""/metrics and the load/ record, after real calls through real sidecars."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import grpc
import pytest

from proto import demo_pb2
from registry.etcd import EtcdClient, EtcdConfig
from registry.scaling import LoadReport
from ringmesh import cli
from tests.load import Load
from tests.mesh import Mesh, stats
from tests.waiting import until

pytestmark = pytest.mark.integration


def scrape(admin: str) -> dict[str, float]:
    """Prometheus text as {series line without value: value}."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def total(series: dict[str, float], prefix: str, *labels: str) -> float:
    return sum(
        v for k, v in series.items() if k.startswith(prefix) and all(lbl in k for lbl in labels)
    )


def test_metrics_and_load_record_reflect_real_calls(mesh: Mesh) -> None:
    echo = mesh.add("echo", None, "--report-interval", "0.5")
    client = mesh.add("client")
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        md = (("ringmesh-service", "echo"), ("ringmesh-hash-key", "k"))
        for _ in range(40):
            stub.Echo(demo_pb2.EchoRequest(text="x", delay_ms=5), metadata=md, timeout=5)
        with pytest.raises(grpc.RpcError):
            stub.Echo(
                demo_pb2.EchoRequest(text="x"),
                metadata=(("ringmesh-service", "nosuch"),),
                timeout=5,
            )

    server = scrape(echo.admin)
    ok = (
        'rpc_grpc_status_code="0"',
        'rpc_method="Echo"',
        'rpc_service="ringmesh.demo.v1.Demo"',
        'rpc_system="grpc"',
    )
    assert total(server, "rpc_server_duration_milliseconds_count", *ok) == 40
    assert total(server, "rpc_server_duration_milliseconds_sum", *ok) >= 40 * 5
    assert (
        total(server, 'rpc_server_duration_milliseconds_bucket{le="2"', *ok) == 0
    )  # each took >= 5 ms
    assert "ringmesh_inflight" in "".join(server)

    caller = scrape(client.admin)
    assert total(caller, "rpc_client_duration_milliseconds_count", 'rpc_grpc_status_code="0"') == 40
    assert (
        total(caller, "rpc_client_duration_milliseconds_count", 'rpc_grpc_status_code="12"') == 1
    )  # UNIMPLEMENTED
    assert "ringmesh_ejections_total" in "".join(caller)
    assert "ringmesh_retry_budget_exhausted_total" in "".join(caller)
    assert "ringmesh_retry_budget_waits_total" in "".join(caller)

    async def load_record() -> dict[str, float]:
        async with EtcdClient(EtcdConfig.from_urls(mesh.etcd.url)) as etcd:
            deadline = time.monotonic() + 5
            while True:
                kv = await etcd.get(mesh.layout.load("echo", echo.name))
                assert kv is not None and kv.lease != 0, "load/ lives under the instance's lease"
                doc: dict[str, float] = json.loads(kv.value)
                if doc["rps"] > 0 or time.monotonic() > deadline:
                    return doc
                await asyncio.sleep(0.1)

    # Calls flow while the record is read, so the window it covers has them.
    stop = threading.Event()

    def keep_calling() -> None:
        with mesh.channel(client.outbound) as channel:
            stub = mesh.stub(channel)
            while not stop.is_set():
                stub.Echo(demo_pb2.EchoRequest(text="x", delay_ms=5), metadata=md, timeout=5)

    caller_thread = threading.Thread(target=keep_calling)
    caller_thread.start()
    try:
        time.sleep(1.0)  # a whole report window of calls
        doc = asyncio.run(load_record())
    finally:
        stop.set()
        caller_thread.join()
    assert set(doc) == {"ts", "window_s", "rps", "inflight", "error_rate", "p50_ms", "p99_ms"}
    assert doc["rps"] > 10
    assert 5.0 <= doc["p50_ms"] <= doc["p99_ms"] < 1000  # milliseconds; each call >= 5 ms
    assert doc["error_rate"] == 0.0


def test_the_load_record_is_rewritten_at_once_for_the_metric_its_policy_scales_on(
    mesh: Mesh,
) -> None:
    """Without a policy a sidecar writes early on rps; `ringmesh policy set` reaches it
    through its own watch, and a move of the policy's metric is written within seconds,
    not at the 30 s max interval."""
    echo = mesh.add("echo", None, "--report-interval", "0.2")
    client = mesh.add("client")
    common = ["--etcd", mesh.etcd.url, "--prefix", mesh.prefix]
    scaled_on = lambda: stats(echo)["load_scaled_on"]  # noqa: E731
    assert scaled_on() == "rps"

    async def record() -> LoadReport:
        async with EtcdClient(EtcdConfig.from_urls(mesh.etcd.url)) as etcd:
            kv = await etcd.get(mesh.layout.load("echo", echo.name))
            assert kv is not None
            return LoadReport.from_json(kv.value)

    set_ = ["policy", "set", "echo", "--min", "1", "--max", "3", "--metric", "inflight"]
    assert cli.main([*set_, "--target", "2", *common]) == 0
    until(lambda: scaled_on() == "inflight", within=10, what="the sidecar on the new policy")
    idle = asyncio.run(record())
    with Load(client.outbound, callers=4, idempotent=True, delay_ms=300, keys=20):
        # Four callers of 300 ms calls hold ~4 in flight: written as soon as it shows.
        until(
            lambda: asyncio.run(record()).inflight > 2.0,
            within=10,
            what=f"an in-flight record above 2 (it was {idle.inflight} when idle)",
        )
    assert cli.main(["policy", "delete", "echo", *common]) == 0
    until(lambda: scaled_on() == "rps", within=10, what="the sidecar back on rps")
