"""The story `ringmesh up` tells, step by step, and the summary it ends with.

Paced over ``duration`` seconds (60 by default): a baseline load; load
rises and the cache service scales out; one instance is SIGKILLed and its
keys fail over (0 failed calls); the leading scaler is stopped and the
standby takes over; load falls and the service scales in, draining (0
failed calls). Each step starts at its point of the pace or when the step
before it has finished, whichever is later, and waits for the state it
expects (never a fixed sleep), up to its own bound: on a slow machine the
story takes longer, it does not fail for it. A step that does not see its
state in time fails and names what it saw.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ringmesh.loadgen import KEYED, UNKEYED
from ringmesh.observe import MeshObserver, ServiceRow

SERVICE = "cache"
MIN_REPLICAS = 2
MAX_REPLICAS = 5
TARGET_RPS = 40.0  # calls/s per instance the scaler aims at
BASE_RPS = 60.0  # total calls/s: 2 instances at 30 each
PEAK_RPS = 180.0  # 4.5 instances' worth: scale out to 5
STEP_TIMEOUT_S = 45.0
DEFAULT_DURATION_S = 60.0
MIN_DURATION_S = 30.0


class StoryMesh(Protocol):
    """What the story acts on (ringmesh.up's running mesh)."""

    observer: MeshObserver

    def set_rate(self, calls_per_s: float) -> None: ...

    async def probe(self) -> bool:
        """One call through the client's sidecar: answered?"""

    def kill(self, instance_id: str) -> None:
        """SIGKILL the instance's sidecar and app."""

    async def stop_scaler(self, scaler_id: str) -> None: ...

    async def start_scaler(self, scaler_id: str) -> None: ...


@dataclass
class StepResult:
    name: str
    ok: bool
    detail: str
    started_s: float
    took_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "started_s": round(self.started_s, 2),
            "took_s": round(self.took_s, 2),
        }


class StepFailed(Exception):
    """A step did not see the state it waited for."""


@dataclass
class Story:
    mesh: StoryMesh
    duration: float = DEFAULT_DURATION_S
    step: str = "starting"
    results: list[StepResult] = field(default_factory=list)
    _t0: float = 0.0

    @property
    def observer(self) -> MeshObserver:
        return self.mesh.observer

    def _service(self) -> ServiceRow | None:
        reading = self.observer.reading
        return None if reading is None else reading.services.get(SERVICE)

    async def _until(
        self,
        what: str,
        condition: Callable[[], bool | Awaitable[bool]],
        within: float = STEP_TIMEOUT_S,
    ) -> None:
        """Wait until ``condition()`` (a check, or a probe to await) holds; StepFailed
        naming what was seen after ``within`` s."""
        deadline = time.monotonic() + within
        while True:
            held = condition()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            if time.monotonic() > deadline:
                raise StepFailed(f"{what}: not seen within {within:g} s ({self._now_seen()})")
            await asyncio.sleep(0.1)

    def _now_seen(self) -> str:
        service = self._service()
        if service is None:
            return f"no {SERVICE} instance registered"
        target = "none" if service.target is None else str(service.target.replicas)
        states = ", ".join(f"{row.id} {row.state}" for row in service.instances)
        return f"target {target}; {states or 'no instances'}"

    async def _at(self, fraction: float) -> None:
        """Wait for this point of the pace (at once if the story is behind it)."""
        left = self._t0 + fraction * self.duration - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)

    async def _step(self, name: str, fraction: float, body: Callable[[], Any]) -> bool:
        await self._at(fraction)
        self.step = name
        started = time.monotonic()
        at = self.observer.now()
        self.observer.note("step", name)
        try:
            detail = await body()
            ok = True
        except StepFailed as exc:
            detail, ok = str(exc), False
        self.results.append(StepResult(name, ok, detail, at, time.monotonic() - started))
        if not ok:
            self.observer.note("failed", f"step {name!r} did not behave: {detail}")
        return ok

    def _settled(self, replicas: int) -> bool:
        """The service runs exactly ``replicas`` serving instances, none draining, on target."""
        service = self._service()
        return (
            service is not None
            and service.target is not None
            and service.target.replicas == replicas
            and len(service.instances) == replicas
            and service.live == replicas
        )

    async def run(self) -> bool:
        """Every step in order; False once one fails (the rest are skipped)."""
        self._t0 = time.monotonic()
        steps = (
            ("baseline", 0.0, self._baseline),
            ("scale-out", 0.15, self._scale_out),
            ("failover", 0.45, self._failover),
            ("leader-change", 0.6, self._leader_change),
            ("scale-in", 0.7, self._scale_in),
        )
        for name, fraction, body in steps:
            if not await self._step(name, fraction, body):
                return False
        return await self._step("totals", 1.0, self._totals)

    async def _baseline(self) -> str:
        await self._until(
            f"{MIN_REPLICAS} {SERVICE} instances serving", lambda: self._settled(MIN_REPLICAS)
        )
        # The client's sidecar has seen them too: a call through it is answered.
        await self._until("a call through the client's sidecar answered", self.mesh.probe)
        self.mesh.set_rate(BASE_RPS)
        self.observer.note("load", f"load starts: {BASE_RPS:g} calls/s")
        tally = self.observer.tally
        await self._until("calls answered", lambda: tally.modes[KEYED].ok > 0)
        return f"{MIN_REPLICAS} instances serve {BASE_RPS:g} calls/s"

    async def _scale_out(self) -> str:
        self.mesh.set_rate(PEAK_RPS)
        self.observer.note("load", f"load rises to {PEAK_RPS:g} calls/s")
        failed = self.observer.tally.failed
        since = self.observer.now()

        def scaled() -> bool:
            service = self._service()
            return (
                service is not None
                and service.target is not None
                and service.target.replicas > MIN_REPLICAS
                and self._settled(service.target.replicas)
            )

        await self._until("a scale-out, every new instance serving", scaled)
        service = self._service()
        assert service is not None and service.target is not None
        self._no_failures_since(failed, "during the scale-out")
        return self._decisions("scale-out", since) or f"-> {service.target.replicas}"

    async def _failover(self) -> str:
        service = self._service()
        assert service is not None and service.target is not None
        replicas = service.target.replicas
        # The instance owning the most keys: its keys must move, and scale-in
        # (newest first) would not have picked it.
        victim = max(service.instances, key=lambda row: row.share).id
        tally = self.observer.tally
        failed, failovers = tally.failed, tally.failovers
        self.mesh.kill(victim)
        self.observer.note("killed", f"SIGKILL {victim} (sidecar and app)")
        await self._until("calls failing over", lambda: tally.failovers > failovers)

        def healed() -> bool:
            current = self._service()
            return (
                current is not None
                and all(row.id != victim for row in current.instances)
                and self._settled(replicas)
            )

        await self._until(f"{victim}'s lease expired and a replacement serving", healed)
        self._no_failures_since(failed, f"after {victim} was killed")
        moved = tally.failovers - failovers
        return f"{victim} killed: {moved} call(s) failed over, 0 failed, replaced"

    async def _leader_change(self) -> str:
        reading = self.observer.reading
        assert reading is not None
        await self._until("a leading scaler", lambda: self._leader() is not None)
        leader = self._leader()
        assert leader is not None
        changes = len(self.observer.leaders)
        await self.mesh.stop_scaler(leader)
        self.observer.note("stopped", f"stopped the leading scaler {leader}")
        await self._until(
            "the standby scaler leading", lambda: self._leader() not in (None, leader)
        )
        new = self._leader()
        # The stopped scaler comes back as the standby; it must not take over again.
        await self.mesh.start_scaler(leader)
        self.observer.note("started", f"{leader} restarted as the standby")
        return f"{leader} -> {new} ({len(self.observer.leaders) - changes} change(s))"

    def _leader(self) -> str | None:
        reading = self.observer.reading
        return None if reading is None else reading.leader

    async def _scale_in(self) -> str:
        self.mesh.set_rate(BASE_RPS)
        self.observer.note("load", f"load falls to {BASE_RPS:g} calls/s")
        failed = self.observer.tally.failed
        since = self.observer.now()
        drains = self.observer.count("drained")
        service = self._service()
        leaving = (0 if service is None else len(service.instances)) - MIN_REPLICAS

        def drained() -> bool:
            if self.observer.count("drain-failed"):
                raise StepFailed("an instance did not drain cleanly (see the events)")
            gone = self.observer.count("drained") - drains >= leaving
            return gone and self._settled(MIN_REPLICAS)

        await self._until(
            f"a scale-in to {MIN_REPLICAS}, the {leaving} others drained and gone",
            drained,
            within=STEP_TIMEOUT_S + 30,
        )
        self._no_failures_since(failed, "during the scale-in")
        decisions = self._decisions("scale-in", since) or f"-> {MIN_REPLICAS}"
        return f"{decisions}; {leaving} drained, 0 failed"

    async def _totals(self) -> str:
        """After the last step's pace: no call failed at all, and keys paid off."""
        await self._at(1.0)
        tally = self.observer.tally
        self._no_failures_since(0, "in the whole story")
        modes = tally.modes
        keyed, unkeyed = modes[KEYED].hit_rate, modes[UNKEYED].hit_rate
        text = f"{tally.calls} calls, 0 failed; hit rate keyed {keyed:.1%} vs unkeyed {unkeyed:.1%}"
        if keyed <= unkeyed:
            raise StepFailed(f"the keyed hit rate is not above the unkeyed one: {text}")
        return text

    def _decisions(self, kind: str, since: float) -> str:
        """The scaler's decisions of ``kind`` since ``since`` (s), each with its reason."""
        events = self.observer.events
        return "; ".join(e.text for e in events if e.kind == kind and e.at_s >= since)

    def _no_failures_since(self, failed: int, when: str) -> None:
        now = self.observer.tally.failed
        if now > failed:
            first = self.observer.tally.failures[:3]
            raise StepFailed(f"{now - failed} call(s) failed {when}: {first}")

    def summary(self, *, ok: bool, failed_step: str | None) -> dict[str, Any]:
        observer = self.observer
        scale = [e.as_dict() for e in observer.events if e.kind in ("scale-out", "scale-in")]
        return {
            "ok": ok,
            "failed_step": failed_step,
            "duration_s": round(observer.now(), 2),
            "service": SERVICE,
            "calls": observer.summary_calls(),
            "hit_rate": {
                KEYED: round(observer.tally.modes[KEYED].hit_rate, 4),
                UNKEYED: round(observer.tally.modes[UNKEYED].hit_rate, 4),
            },
            "scale_events": scale,
            "failovers": observer.tally.failovers,
            "ejections": observer.count("ejection"),
            "leader_changes": [e.as_dict() for e in observer.leaders[1:]],
            "drains": observer.count("drained"),
            "steps": [r.as_dict() for r in self.results],
        }


def summary_text(doc: dict[str, Any]) -> str:
    """The summary as plain lines (what `ringmesh up --for` prints)."""
    calls = doc["calls"]
    lines = [
        f"story {'behaved' if doc['ok'] else 'FAILED at step ' + repr(doc['failed_step'])}"
        f" in {doc['duration_s']:.0f} s",
        f"calls: {calls['total']}, failed {calls['failed']}, failed over {doc['failovers']}",
        f"hit rate: keyed {doc['hit_rate'][KEYED]:.1%}, unkeyed {doc['hit_rate'][UNKEYED]:.1%}",
    ]
    for event in doc["scale_events"]:
        lines.append(f"{event['kind']} at {event['at_s']:.0f} s: {event['text']}")
    for event in doc["leader_changes"]:
        lines.append(f"leader change at {event['at_s']:.0f} s: {event['text']}")
    for step in doc["steps"]:
        mark = "ok  " if step["ok"] else "FAIL"
        lines.append(f"{mark} {step['name']:<13} {step['took_s']:5.1f} s  {step['detail']}")
    return "\n".join(lines)
