"""Keyed calls through a sidecar reach the ring owner that `ringmesh route` names."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import grpc
import pytest

from proto import demo_pb2
from ringmesh import cli
from ringmesh.localmesh import LocalMesh
from tests.etcd_proxy import LaggingEtcdProxy
from tests.mesh import Mesh

pytestmark = pytest.mark.integration


def keyed(key: str, service: str = "echo") -> tuple[tuple[str, str], ...]:
    return (("ringmesh-service", service), ("ringmesh-hash-key", key))


def test_keyed_calls_stick_to_the_owner_route_names(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    echoes = [mesh.add("echo") for _ in range(3)]
    client = mesh.add("client")
    keys = [f"user-{i}" for i in range(250)]
    served: dict[str, set[str]] = defaultdict(set)
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        for _ in range(4):  # 1,000 calls
            for key in keys:
                reply = stub.Echo(demo_pb2.EchoRequest(text=key), metadata=keyed(key), timeout=5)
                assert reply.text == key
                served[key].add(reply.instance)
    assert all(len(instances) == 1 for instances in served.values())
    assert {next(iter(s)) for s in served.values()} == {e.name for e in echoes}

    capsys.readouterr()
    for key in keys:
        rc = cli.main(
            ["route", "echo", key, "--json", "--etcd", mesh.etcd.url, "--prefix", mesh.prefix]
        )
        assert rc == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["owner"] == next(iter(served[key])), key
        assert sorted(p["id"] for p in doc["order"]) == sorted(e.name for e in echoes)


def test_route_command_prints_owner_then_failover(mesh: Mesh) -> None:
    for _ in range(3):
        mesh.add("echo")
    out = subprocess.run(
        [sys.executable, "-m", "ringmesh", "route", "echo", "user-7", "--etcd", mesh.etcd.url,
         "--prefix", mesh.prefix],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert [line.split()[0] for line in out] == ["owner", "failover", "failover"]
    assert len({line.split()[-2] for line in out}) == 3


def test_unkeyed_calls_spread_over_instances(mesh: Mesh) -> None:
    echoes = [mesh.add("echo") for _ in range(3)]
    client = mesh.add("client")
    counts: dict[str, int] = defaultdict(int)
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        for i in range(300):
            reply = stub.Echo(
                demo_pb2.EchoRequest(text=str(i)),
                metadata=(("ringmesh-service", "echo"),),
                timeout=5,
            )
            counts[reply.instance] += 1
    assert set(counts) == {e.name for e in echoes}


def test_a_sidecar_says_registered_only_once_it_routes(mesh: Mesh, tmp_path: Path) -> None:
    """'registered' (and ready) means its own watch has seen its record, so the
    app's first call through it routes. Its watch lags here by 0.5 s (its etcd
    is a proxy holding back each watch event); its put does not."""
    with (
        LaggingEtcdProxy(f"127.0.0.1:{mesh.etcd.client_port}", watch_delay=0.5) as proxy,
        LocalMesh(proxy.url, prefix=mesh.prefix, logs=tmp_path) as lagging,
    ):
        echo = lagging.add("echo")
        with mesh.channel(echo.outbound) as channel:
            # No ringmesh-service: resolving the method needs the registered records.
            reply = mesh.stub(channel).Echo(demo_pb2.EchoRequest(text="x"), timeout=5)
        assert reply.instance == echo.name


def test_method_path_resolves_the_one_service_declaring_it(mesh: Mesh) -> None:
    echo = mesh.add("echo")
    with mesh.channel(echo.outbound) as channel:
        stub = mesh.stub(channel)
        # No ringmesh-service metadata: only 'echo' declares ringmesh.demo.v1.Demo.
        reply = stub.Echo(demo_pb2.EchoRequest(text="x"), timeout=5)
        assert reply.instance == echo.name
        mesh.add("other")  # a second service declaring the same gRPC service
        mesh.seen_by(echo)
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(demo_pb2.EchoRequest(text="x"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "echo, other" in (err.value.details() or "")


def test_a_sidecar_watching_only_some_services_routes_to_them_and_names_them_for_others(
    mesh: Mesh,
) -> None:
    """--watch: the sidecar lists and watches only the services given (and its own)."""
    echo = mesh.add("echo")
    mesh.add("other")
    client = mesh.add("client", None, "--watch", "echo", "--watch", "later")
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        assert (
            stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=keyed("k"), timeout=5).instance
            == echo.name
        )
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=keyed("k", "other"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert unknown.value.details() == (
            "unknown service 'other': this sidecar watches only 'client', 'echo', 'later' (--watch)"
        )
        # Watched but not (yet) running: no live instance, retryable, not unknown.
        with pytest.raises(grpc.RpcError) as absent:
            stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=keyed("k", "later"), timeout=5)
        assert absent.value.code() == grpc.StatusCode.UNAVAILABLE
        # A watched service that starts later is routed to as soon as it registers.
        later = mesh.add("later")
        mesh.seen_by(client, within=10)
        reply = stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=keyed("k", "later"), timeout=5)
        assert reply.instance == later.name
