"""deploy/ against real sidecars: every metric (and label) the Grafana dashboard queries
is one a running sidecar's /metrics serves, and the compose file's health check asks the
sidecar's grpc.health.v1 the right question."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from proto import demo_pb2
from registry.embedded import EmbeddedEtcd
from sidecar.routing import RoutingTable
from tests.mesh import Instance, Mesh
from tests.unit.test_deploy import compose, dashboard_problems, load_dashboard, served_series

pytestmark = pytest.mark.integration


def metrics(admin: str) -> str:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


@dataclass
class Scene:
    """Two instances of orders, one whose app died (a call to it was retried), and a
    client, all with real sidecars."""

    healthy: Instance
    victim: Instance
    client: Instance


@pytest.fixture(scope="module")
def scene(shared_etcd: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    with Mesh(
        shared_etcd, prefix="/ringmesh-test/deploy", logs=tmp_path_factory.mktemp("logs")
    ) as mesh:
        healthy = mesh.add("orders")
        victim = mesh.add("orders")
        client = mesh.add("client")
        mesh.seen_by(client)
        victim.app.kill()  # its sidecar answers ringmesh-not-processed: the call is retried
        table = RoutingTable.build(mesh.topology())
        key = next(
            f"key-{i}" for i in range(500) if table.route("orders", f"key-{i}")[0].id == victim.name
        )
        with mesh.channel(client.outbound) as channel:
            stub = mesh.stub(channel)
            for hash_key in (key, "other"):
                reply = stub.Echo(
                    demo_pb2.EchoRequest(text="x"),
                    metadata=(("ringmesh-service", "orders"), ("ringmesh-hash-key", hash_key)),
                    timeout=5,
                )
                assert reply.instance == healthy.name
        yield Scene(healthy, victim, client)


def test_every_metric_the_dashboard_queries_is_served_by_a_live_sidecar(scene: Scene) -> None:
    served: dict[str, set[str]] = {}
    for instance in (scene.healthy, scene.victim, scene.client):
        for name, labels in served_series(metrics(instance.admin)).items():
            served.setdefault(name, set()).update(labels)
    assert "ringmesh_retries_total" in served, "the retry shows"
    assert dashboard_problems(load_dashboard(), served) == []


def sidecar_healthcheck(inbound: str) -> tuple[int, str]:
    """The compose file's sidecar health check, run against ``inbound``: (exit, stderr)."""
    test = compose()["x-sidecar-healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    script = test[3]
    assert "127.0.0.1:15002" in script
    result = subprocess.run(
        [sys.executable, "-c", script.replace("127.0.0.1:15002", inbound)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return result.returncode, result.stderr


def test_the_compose_health_check_asks_the_sidecars_grpc_health(scene: Scene) -> None:
    assert sidecar_healthcheck(scene.healthy.address) == (0, "")
    # NOT_SERVING (its app is gone): a clean exit 1, not a failure to ask.
    assert sidecar_healthcheck(scene.victim.address) == (1, "")
