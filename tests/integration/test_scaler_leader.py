"""scaler/leader.py in one process against a real etcd: what a leader does at a takeover,
when it stalls past its term, and when it crashes.

Each Scaler runs with its own EtcdClient and Election (``Scaler.run``), as in the
``ringmesh scaler`` process; the actuators are test doubles that record what they were
asked, except where a test needs real instances to see that none is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from registry.embedded import EmbeddedEtcd
from registry.etcd import EtcdClient, EtcdConfig
from registry.keys import KeyLayout
from registry.records import InstanceRecord
from registry.scaling import INFLIGHT, RPS, LoadReport, Policy, Target
from scaler.actuators import CommandLauncher, LocalActuator
from scaler.leader import Scaler, ScalerConfig
from tests.waiting import eventually

pytestmark = pytest.mark.integration

INTERVAL = 0.2


@dataclass
class Deployments:
    """The one outside system every scaler's actuator acts on (as a Deployment is)."""

    replicas: dict[str, int] = field(default_factory=dict)
    history: list[tuple[str, str, int]] = field(default_factory=list)  # (scaler, service, n)


class SharedActuator:
    """Records what it is asked; ``hold(service)`` makes its next apply of that service
    wait until released, as a slow drain or a slow API server would."""

    def __init__(self, name: str, deployments: Deployments) -> None:
        self.name = name
        self.deployments = deployments
        self.terms = 0
        self.closed = False
        self._holds: dict[str, asyncio.Event] = {}
        self.held = asyncio.Event()

    def hold(self, service: str) -> asyncio.Event:
        self._holds[service] = release = asyncio.Event()
        return release

    def replicas(self, service: str) -> int | None:
        return None

    async def apply(self, service: str, replicas: int) -> None:
        release = self._holds.pop(service, None)
        if release is not None:
            self.held.set()
            await release.wait()
        self.deployments.replicas[service] = replicas
        self.deployments.history.append((self.name, service, replicas))

    def new_term(self) -> None:
        self.terms += 1

    async def aclose(self) -> None:
        self.closed = True


@contextlib.asynccontextmanager
async def running(scaler: Scaler) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(scaler.run(stop))
    try:
        yield task
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)


def config(etcd: EmbeddedEtcd, prefix: str, scaler_id: str) -> ScalerConfig:
    return ScalerConfig(
        scaler_id=scaler_id, etcd=EtcdConfig.from_urls(etcd.url), prefix=prefix, interval=INTERVAL
    )


def rps_policy(min_replicas: int) -> bytes:
    return Policy(min_replicas=min_replicas, max_replicas=10, metric=RPS, target=10.0).to_json()


async def read_target(client: EtcdClient, layout: KeyLayout, service: str) -> Target | None:
    kv = await client.get(layout.target(service))
    return None if kv is None else Target.from_json(kv.value)


def test_a_stalled_leader_does_not_act_after_its_term(
    shared_etcd: EmbeddedEtcd, prefix: str
) -> None:
    layout = KeyLayout(prefix)
    deployments = Deployments()

    async def scenario() -> None:
        a = SharedActuator("a", deployments)
        b = SharedActuator("b", deployments)
        async with EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as client:
            await client.put(layout.policy("alpha"), rps_policy(1), lease=None)
            await client.put(layout.policy("beta"), rps_policy(3), lease=None)
            async with running(Scaler(config(shared_etcd, prefix, "scaler-a"), a)):
                await eventually(
                    lambda: deployments.replicas.get("beta") == 3, within=10, what="a scales beta"
                )
                async with running(Scaler(config(shared_etcd, prefix, "scaler-b"), b)):
                    election = layout.election()
                    await eventually(
                        lambda: _count(client.get_prefix(election), 2), within=5, what="b queues"
                    )
                    # A stalls applying alpha, with beta's decision (3, unchanged: no target
                    # write, so no fence) still to apply. Meanwhile its lease ends, B takes
                    # over and scales beta to 5.
                    release = a.hold("alpha")
                    await asyncio.wait_for(a.held.wait(), 5)
                    kvs, _ = await client.get_prefix_by_create(election)
                    await client.revoke_lease(kvs[0].lease)
                    await client.put(layout.policy("beta"), rps_policy(5), lease=None)
                    await eventually(
                        lambda: ("b", "beta", 5) in deployments.history,
                        within=10,
                        what="b scales beta to 5",
                    )
                    target = await read_target(client, layout, "beta")
                    assert target is not None and target.leader == "scaler-b"
                    assert b.terms == 1, "a new leader forgets what its actuator cached"

                    seen = len(deployments.history)
                    release.set()
                    await eventually(
                        lambda: ("a", "alpha", 1) in deployments.history[seen:],
                        within=5,
                        what="a's stalled apply to finish",
                    )
                    await asyncio.sleep(3 * INTERVAL)
                    late = [h for h in deployments.history[seen:] if h[0] == "a"]
                    assert late == [("a", "alpha", 1)], "a deposed leader applies nothing more"

    asyncio.run(scenario())


async def _count(listing: Any, n: int) -> bool:
    kvs, _ = await listing
    return len(kvs) == n


def test_a_new_leader_holds_an_old_target_for_the_scale_down_window(
    shared_etcd: EmbeddedEtcd, prefix: str
) -> None:
    # The previous leader decided 10 twenty minutes ago; load is now 0.4 of the target.
    # The HPA seeds its history with (now, current replicas): no scale-down for 300 s.
    layout = KeyLayout(prefix)
    deployments = Deployments()

    async def scenario() -> None:
        actuator = SharedActuator("a", deployments)
        now = time.time()
        async with EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as client:
            policy = Policy(
                min_replicas=1,
                max_replicas=20,
                metric=INFLIGHT,
                target=10.0,
                scale_down_window_s=300.0,
            )
            await client.put(layout.policy("echo"), policy.to_json(), lease=None)
            old = Target(
                replicas=10,
                previous=8,
                reason="earlier",
                metric=12.0,
                decided_at=round(now - 1200, 3),
                term=1,
                leader="scaler-old",
            )
            await client.put(layout.target("echo"), old.to_json(), lease=None)
            for n in range(1, 11):
                instance = InstanceRecord(
                    id=f"echo-{n}", service="echo", address=f"127.0.0.1:{20000 + n}"
                )
                await client.put(
                    layout.instance("echo", instance.id), instance.to_json(), lease=None
                )
                report = LoadReport(ts=now, window_s=1.0, inflight=4.0)
                await client.put(layout.load("echo", instance.id), report.to_json(), lease=None)

            async with running(Scaler(config(shared_etcd, prefix, "scaler-a"), actuator)):
                await eventually(
                    lambda: len(deployments.history) >= 2, within=10, what="two evaluations"
                )
            assert deployments.history[:2] == [("a", "echo", 10), ("a", "echo", 10)]
            assert await read_target(client, layout, "echo") == old

    asyncio.run(scenario())


class RecordingLauncher(CommandLauncher):
    """Starts real processes; refuses (as a bug would) to start any for ``crash_on``."""

    crash_on = "zulu"
    started: list[subprocess.Popen[bytes]]

    def start(self, service: str, index: int) -> subprocess.Popen[bytes]:
        if service == self.crash_on:
            raise RuntimeError("a bug in the actuator")
        proc = super().start(service, index)
        self.started.append(proc)
        return proc


@pytest.fixture
def launcher(shared_etcd: EmbeddedEtcd, prefix: str) -> Iterator[RecordingLauncher]:
    launcher = RecordingLauncher(
        {"alpha": "sleep 60", "zulu": "sleep 60"},
        etcd=shared_etcd.url,
        prefix=prefix,
        drain_timeout=5,
    )
    launcher.started = []
    yield launcher
    for proc in launcher.started:  # whatever the scaler left behind
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_crashing_scaler_stops_its_local_instances(
    shared_etcd: EmbeddedEtcd, prefix: str, launcher: RecordingLauncher
) -> None:
    layout = KeyLayout(prefix)

    async def scenario() -> None:
        async with EtcdClient(EtcdConfig.from_urls(shared_etcd.url)) as client:
            await client.put(layout.policy("alpha"), rps_policy(1), lease=None)
            await client.put(layout.policy("zulu"), rps_policy(1), lease=None)
        scaler = Scaler(config(shared_etcd, prefix, "scaler-a"), LocalActuator(launcher))
        with pytest.raises(RuntimeError, match="a bug in the actuator"):
            await asyncio.wait_for(scaler.run(asyncio.Event()), 15)

    asyncio.run(scenario())
    assert len(launcher.started) == 1, "alpha's instance started before zulu's crashed"
    assert launcher.started[0].poll() is not None, "the crash left an instance running"
