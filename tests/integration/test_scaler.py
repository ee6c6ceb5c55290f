"""The scaler end to end: election between processes, targets from real load, the local actuator."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from registry.election import election_prefix, queue, read_leader
from registry.embedded import EmbeddedEtcd
from registry.errors import MeshError
from registry.etcd import EtcdClient, EtcdConfig
from registry.keys import KeyLayout
from registry.scaling import Target
from ringmesh import cli
from ringmesh.procs import Child, python_module, stop_all
from tests.load import Load
from tests.mesh import Mesh
from tests.waiting import until

pytestmark = pytest.mark.integration

# One demo instance (app + sidecar) per command, as the local actuator runs it.
INSTANCE_TEMPLATE = f"{sys.executable} -m ringmesh.instance --service {{service}} --index {{index}} --etcd {{etcd}} --prefix {{prefix}}"


class Scalers:
    """Scaler processes started through the CLI; all stopped at the end."""

    def __init__(self, etcd: EmbeddedEtcd, prefix: str) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.children: list[Child] = []

    def start(self, scaler_id: str, *extra: str) -> Child:
        child = Child(
            f"scaler {scaler_id}",
            python_module("ringmesh", "scaler", "--etcd", self.etcd.url, "--prefix", self.prefix,
                          "--id", scaler_id, *extra),
        )  # fmt: skip
        self.children.append(child)
        child.wait_event("candidate")
        return child

    def close(self) -> None:
        for child in self.children:
            child.signal(signal.SIGCONT)
        stop_all(self.children, timeout=30)


@pytest.fixture
def scalers(mesh: Mesh) -> Iterator[Scalers]:
    group = Scalers(mesh.etcd, mesh.prefix)
    yield group
    group.close()


def etcd_read(mesh: Mesh, what: str) -> object:
    async def read() -> object:
        async with EtcdClient(EtcdConfig.from_urls(mesh.etcd.url)) as etcd:
            layout = KeyLayout(mesh.prefix)
            if what == "leader":
                leader = await read_leader(etcd, layout)
                return None if leader is None else leader.id
            kv = await etcd.get(layout.target(what))
            return None if kv is None else Target.from_json(kv.value)

    return asyncio.run(read())


def election_queue(mesh: Mesh) -> list[str]:
    """The ids of the scaler election's candidates in etcd, the leader first."""

    async def read() -> list[str]:
        async with EtcdClient(EtcdConfig.from_urls(mesh.etcd.url)) as etcd:
            prefix = election_prefix(KeyLayout(mesh.prefix))
            kvs, _ = await etcd.get_prefix_by_create(prefix)
            return [c.id for c in queue(kvs)]

    return asyncio.run(read())


def target(mesh: Mesh, service: str) -> Target | None:
    found = etcd_read(mesh, service)
    assert found is None or isinstance(found, Target)
    return found


def set_policy(mesh: Mesh, service: str, *args: str) -> None:
    assert (
        cli.main(
            ["policy", "set", service, *args, "--etcd", mesh.etcd.url, "--prefix", mesh.prefix]
        )
        == 0
    )


def wait_for(condition: Callable[[], object], within: float, what: str) -> float:
    """until(), polling every 0.1 s: each poll here is a new etcd client."""
    return until(condition, within=within, what=what, interval=0.1)


def test_one_scaler_leads_and_another_takes_over_after_sigkill(
    mesh: Mesh, scalers: Scalers
) -> None:
    a = scalers.start("scaler-a", "--ttl", "3", "--interval", "0.5")
    b = scalers.start("scaler-b", "--ttl", "3", "--interval", "0.5")
    a.wait_event("leading", timeout=10)
    # b stands in the election, behind a: from here on it must not lead. It would say so
    # at once if it did; a second of its events is read (wait_event consumes them) to see.
    until(
        lambda: election_queue(mesh) == ["scaler-a", "scaler-b"],
        within=10,
        what="scaler-b queued behind scaler-a in etcd",
    )
    with pytest.raises(MeshError, match="no 'leading' event"):
        b.wait_event("leading", timeout=1)
    assert b.alive()
    assert etcd_read(mesh, "leader") == "scaler-a", "exactly one leads"

    a.signal(signal.SIGKILL)
    killed = time.monotonic()
    # a's key goes when its lease expires: TTL (3 s) after its last refresh, at etcd's next
    # expiry check; then b's watch sees the delete, b lists, leads and says so. 4 s over
    # the TTL for that on a busy machine; without a takeover it would never come.
    b.wait_event("leading", timeout=3 + 4)
    assert time.monotonic() - killed < 3 + 4
    assert etcd_read(mesh, "leader") == "scaler-b"


def test_a_paused_leader_writes_nothing_after_it_resumes(mesh: Mesh, scalers: Scalers) -> None:
    mesh.add("echo")
    set_policy(mesh, "echo", "--min", "1", "--max", "5", "--metric", "inflight", "--target", "5")
    a = scalers.start("scaler-a", "--ttl", "3", "--interval", "0.3")
    a.wait_event("leading", timeout=10)
    wait_for(lambda: target(mesh, "echo") is not None, 5, "a first target")
    first = target(mesh, "echo")
    assert first is not None and first.leader == "scaler-a"
    b = scalers.start("scaler-b", "--ttl", "3", "--interval", "0.3")

    a.signal(signal.SIGSTOP)  # longer than its TTL
    b.wait_event("leading", timeout=3 + 3)
    set_policy(mesh, "echo", "--min", "2", "--max", "5", "--metric", "inflight", "--target", "5")
    wait_for(
        lambda: (t := target(mesh, "echo")) is not None and t.replicas == 2,
        5,
        "the new leader's target",
    )
    by_b = target(mesh, "echo")
    assert by_b is not None and by_b.leader == "scaler-b" and by_b.term > first.term

    # The old leader wakes up believing nothing happened; the policy changes again so
    # it would write if it could.
    set_policy(mesh, "echo", "--min", "3", "--max", "5", "--metric", "inflight", "--target", "5")
    a.signal(signal.SIGCONT)
    a.wait_event("following", timeout=10)
    time.sleep(1.5)
    latest = target(mesh, "echo")
    assert latest is not None and latest.leader == "scaler-b", (
        "a deposed leader's fenced write must fail"
    )
    assert latest.term == by_b.term
    assert latest.replicas == 3


def test_targets_follow_a_load_step_and_fall_only_after_the_window(
    mesh: Mesh, scalers: Scalers
) -> None:
    mesh.add("echo", None, "--report-interval", "0.5")
    client = mesh.add("client")
    set_policy(mesh, "echo", "--min", "1", "--max", "6", "--metric", "inflight", "--target", "2",
               "--scale-down-window", "6")  # fmt: skip
    interval = 2.0  # the issue: the target rises within two intervals of the step
    scalers.start("scaler-a", "--interval", str(interval))
    wait_for(
        lambda: (t := target(mesh, "echo")) is not None and t.replicas == 1,
        10,
        "the initial target",
    )

    with Load(client.outbound, callers=8, idempotent=True, delay_ms=300, keys=50):
        started = time.monotonic()
        took = wait_for(
            lambda: (t := target(mesh, "echo")) is not None and t.replicas > 1,
            8,
            "a higher target",
        )
        raised = target(mesh, "echo")
    assert raised is not None and "inflight" in raised.reason
    # A report (every 0.5 s) reaches the next decision: 2.5 s at most when idle.
    assert took < 2 * interval, f"the target rose {took:.1f} s after the load step"
    stopped = time.monotonic()
    # Inside the 6 s scale-down window the target never falls (it may still
    # rise on reports that lag the load's end).
    seen = []
    while time.monotonic() - stopped < 6 - 0.7:
        now = target(mesh, "echo")
        assert now is not None
        seen.append(now.replicas)
        time.sleep(0.2)
    assert min(seen) >= raised.replicas, seen
    peak = max(seen)
    wait_for(
        lambda: (t := target(mesh, "echo")) is not None and t.replicas < peak,
        15,
        "the target to fall",
    )
    assert time.monotonic() - stopped >= 6 - 0.5, "not before the scale-down window has passed"
    assert started < stopped


def test_noise_within_the_tolerance_changes_nothing(mesh: Mesh, scalers: Scalers) -> None:
    for _ in range(2):
        mesh.add("echo", None, "--report-interval", "0.5")
    client = mesh.add("client")
    # 8 callers over 2 instances = 4 in flight each; target 4 with a 0.25 tolerance.
    set_policy(mesh, "echo", "--min", "1", "--max", "8", "--metric", "inflight", "--target", "4",
               "--tolerance", "0.25", "--scale-down-window", "0")  # fmt: skip
    with Load(client.outbound, callers=8, idempotent=True, delay_ms=200, keys=400, max_seconds=120):
        time.sleep(2)
        scalers.start("scaler-a", "--interval", "0.5")
        wait_for(lambda: target(mesh, "echo") is not None, 5, "a target")
        first = target(mesh, "echo")
        seen = set()
        end = time.monotonic() + 30  # 60 decisions on noise
        while time.monotonic() < end:
            t = target(mesh, "echo")
            assert t is not None
            seen.add((t.replicas, t.decided_at))
            time.sleep(0.5)
    assert first is not None and first.replicas == 2
    assert len(seen) == 1, f"the target flapped: {sorted(seen)}"


def test_the_local_actuator_follows_targets_without_failing_a_call(
    mesh: Mesh, scalers: Scalers
) -> None:
    client = mesh.add("client")
    set_policy(mesh, "demo", "--min", "1", "--max", "4", "--metric", "inflight", "--target", "2",
               "--scale-down-window", "3")  # fmt: skip
    scalers.start(
        "scaler-a", "--interval", "0.5", "--actuator", "local", "--command",
        f"demo={INSTANCE_TEMPLATE} -- --report-interval 0.5",
    )  # fmt: skip
    serving = lambda: len([r for r in mesh.topology().instances("demo") if r.serving])  # noqa: E731
    wait_for(lambda: serving() == 1, 20, "the first instance")
    with Load(
        client.outbound, callers=6, idempotent=False, delay_ms=300, keys=60, service="demo"
    ) as heavy:
        wait_for(lambda: serving() >= 3, 20, "scale-up to 3 or more instances")
    with Load(
        client.outbound, callers=1, idempotent=False, delay_ms=20, keys=60, service="demo"
    ) as light:
        wait_for(lambda: serving() == 1, 30, "scale-down back to one instance")
        time.sleep(1)
    assert heavy.failures() == []
    assert len(light.results) > 50
    assert light.failures() == [], "scale-down drains instances: no call fails"
    remaining = [r.id for r in mesh.topology().instances("demo")]
    assert remaining == ["demo-1"], "newest first on the way down"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))


def test_topology_shows_target_live_and_leader(
    mesh: Mesh, scalers: Scalers, capsys: pytest.CaptureFixture[str]
) -> None:
    mesh.add("echo")
    set_policy(mesh, "echo", "--min", "2", "--max", "4", "--metric", "rps", "--target", "100")
    scalers.start("scaler-a", "--interval", "0.5").wait_event("leading", timeout=10)
    wait_for(lambda: target(mesh, "echo") is not None, 5, "a target")
    base = ["--etcd", mesh.etcd.url, "--prefix", mesh.prefix]
    capsys.readouterr()
    assert cli.main(["topology", "--json", *base]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["leader"]["id"] == "scaler-a" and doc["leader"]["term"] > 0
    assert (doc["services"]["echo"]["live"], doc["services"]["echo"]["target"]) == (1, 2)
    assert "min_replicas 2" in doc["services"]["echo"]["target_reason"]
    assert cli.main(["topology", *base]) == 0
    text = capsys.readouterr().out
    assert "echo: 1 live, target 2" in text
    assert "scaler leader scaler-a" in text


def test_an_actuator_failure_does_not_stop_the_scaler(mesh: Mesh, scalers: Scalers) -> None:
    set_policy(mesh, "ghost", "--min", "1", "--max", "2", "--metric", "rps", "--target", "10")
    set_policy(mesh, "other", "--min", "2", "--max", "3", "--metric", "rps", "--target", "10")
    scaler = scalers.start("scaler-a", "--interval", "0.3", "--actuator", "local",
                           "--command", "ghost=/nonexistent/bin/instance --index {index}")  # fmt: skip
    scaler.wait_event("leading", timeout=10)
    # 'ghost' cannot start (no such binary), 'other' has no command template: both
    # targets are still decided and written, and the scaler keeps running.
    wait_for(
        lambda: target(mesh, "ghost") is not None and target(mesh, "other") is not None,
        5,
        "both targets",
    )
    time.sleep(1)
    assert scaler.alive()
    assert (target(mesh, "ghost").replicas, target(mesh, "other").replicas) == (1, 2)  # type: ignore[union-attr]
