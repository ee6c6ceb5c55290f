"""What `ringmesh up` shows: the mesh as etcd and the client's sidecar see it, and its events.

A ``MeshObserver`` reads, every half second, what an operator would read:
the topology (instances, their state and ring share), the ``load/`` records
the sidecars write, the scaler's ``targets/`` and the election, plus the
calling sidecar's ``/stats`` (ejections) and the load generator's tally
(failovers, failed calls, hit rates). It turns differences between two
readings into events (scale-out, a drain, an instance gone, a new leader,
an ejection, calls that failed over), the story's and the view's one
source: what the view shows is what the summary counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from registry.election import read_leader
from registry.errors import EtcdUnavailable
from registry.etcd import EtcdClient
from registry.keys import KeyLayout
from registry.records import parse_or_skip
from registry.scaling import LoadReport, Target
from registry.topology import read_topology
from ringmesh.loadgen import KEYED, UNKEYED, Tally
from scaler.leader import read_targets
from sidecar.routing import RoutingTable

log = logging.getLogger(__name__)

POLL_S = 0.5
EVENTS_KEPT = 500


@dataclass(frozen=True)
class Event:
    at_s: float  # seconds since the mesh came up
    kind: str  # scale-out, scale-in, target, registered, draining, gone, leader, ejection, ...
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"at_s": round(self.at_s, 2), "kind": self.kind, "text": self.text}


@dataclass(frozen=True)
class InstanceRow:
    id: str
    state: str
    share: float
    rps: float | None
    inflight: float | None
    p99_ms: float | None
    error_rate: float | None
    hit_rate: float | None
    # How old its load/ record is: a sidecar rewrites it when the policy's metric moves or
    # every 30 s (sidecar/load.py), so the other columns are as of then.
    report_age_s: float | None = None


@dataclass(frozen=True)
class ServiceRow:
    name: str
    instances: tuple[InstanceRow, ...]
    target: Target | None

    @property
    def live(self) -> int:
        return sum(1 for row in self.instances if row.state == "serving")


@dataclass(frozen=True)
class Reading:
    """One look at the whole mesh."""

    at_s: float
    services: dict[str, ServiceRow]
    leader: str | None
    term: int | None
    ejections: int


@dataclass
class MeshObserver:
    client: EtcdClient
    layout: KeyLayout
    tally: Tally
    stats: Callable[[], dict[str, Any]]  # the calling sidecar's /stats (blocking; run in a thread)
    started: float = field(default_factory=time.monotonic)
    events: list[Event] = field(default_factory=list)
    reading: Reading | None = None
    on_event: Callable[[Event], None] = lambda event: None
    leaders: list[Event] = field(default_factory=list)  # each time a different scaler led
    _last_leader: str | None = None
    _seen_failovers: int = 0
    _seen_failed: int = 0

    def now(self) -> float:
        return time.monotonic() - self.started

    def note(self, kind: str, text: str) -> Event:
        """Record an event (the story's own actions come here too)."""
        event = Event(self.now(), kind, text)
        self.events.append(event)
        del self.events[:-EVENTS_KEPT]
        self.on_event(event)
        return event

    def count(self, kind: str) -> int:
        return sum(1 for event in self.events if event.kind == kind)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(EtcdUnavailable):  # keep showing the last reading
                self.update(await self.read())
            await asyncio.sleep(POLL_S)

    async def read(self) -> Reading:
        topology = await read_topology(self.client, self.layout)
        load_kvs, _ = await self.client.get_prefix(self.layout.loads)
        loads: dict[tuple[str, str], LoadReport] = dict(
            parse_or_skip(
                load_kvs,
                lambda kv: (self.layout.parse_load(kv.key), LoadReport.from_json(kv.value)),
                log,
            )
        )
        targets = await read_targets(self.client, self.layout)
        leader = await read_leader(self.client, self.layout)
        try:
            stats = await asyncio.to_thread(self.stats)
        except OSError:
            stats = {}
        table = RoutingTable.build(topology)
        wall = time.time()
        services: dict[str, ServiceRow] = {}
        for service in sorted(set(topology.services) | set(targets)):
            ring = table.rings.get(service)
            shares = ring.shares() if ring is not None else {}
            rows = []
            for record in sorted(topology.instances(service), key=lambda r: _index(r.id)):
                load = loads.get((service, record.id))
                rows.append(
                    InstanceRow(
                        id=record.id,
                        state=record.state,
                        share=shares.get(record.id, 0.0),
                        rps=None if load is None else load.rps,
                        inflight=None if load is None else load.inflight,
                        p99_ms=None if load is None else load.p99_ms,
                        error_rate=None if load is None else load.error_rate,
                        hit_rate=self.tally.hit_rate(record.id),
                        report_age_s=None if load is None else max(0.0, wall - load.ts),
                    )
                )
            services[service] = ServiceRow(service, tuple(rows), targets.get(service))
        return Reading(
            at_s=self.now(),
            services=services,
            leader=None if leader is None else leader.id,
            term=None if leader is None else leader.term,
            ejections=int(stats.get("ejections", 0) or 0),
        )

    def update(self, new: Reading) -> None:
        """Events for what changed since the last reading."""
        old = self.reading
        self.reading = new
        if new.leader is not None and new.leader != self._last_leader:
            self._last_leader = new.leader
            self.leaders.append(
                self.note("leader", f"{new.leader} leads the scalers (term {new.term})")
            )
        if old is None:
            for service in new.services.values():
                for row in service.instances:
                    self.note("registered", f"{row.id} registered")
            return
        for name, service in new.services.items():
            before = old.services.get(name)
            self._instance_events(before, service)
            self._target_events(before, service)
        if new.leader is None and old.leader is not None:
            self.note("leader", f"{old.leader} stopped leading; no scaler leads")
        if new.ejections > old.ejections:
            count = new.ejections - old.ejections
            self.note("ejection", f"the client's sidecar ejected {count} peer(s)")
        failovers = self.tally.failovers
        if failovers > self._seen_failovers:
            count = failovers - self._seen_failovers
            self.note("failover", f"{count} call(s) answered by the next instance on the ring")
        self._seen_failovers = failovers
        failed = self.tally.failed
        if failed > self._seen_failed:
            self.note("failed", f"{failed - self._seen_failed} call(s) failed")
        self._seen_failed = failed

    def _instance_events(self, before: ServiceRow | None, after: ServiceRow) -> None:
        old = {row.id: row for row in before.instances} if before is not None else {}
        new = {row.id: row for row in after.instances}
        for id_, row in new.items():
            if id_ not in old:
                self.note("registered", f"{id_} registered")
            elif row.state != old[id_].state:
                self.note(row.state, f"{id_} is {row.state}")
        for id_ in old.keys() - new.keys():
            self.note("gone", f"{id_} deregistered")

    def _target_events(self, before: ServiceRow | None, after: ServiceRow) -> None:
        target = after.target
        if target is None:
            return
        previous = before.target if before is not None else None
        if previous is not None and previous.replicas == target.replicas:
            return
        if previous is None and target.replicas == target.previous:
            self.note("target", f"{after.name}: target {target.replicas} ({target.reason})")
            return
        kind = "scale-out" if target.replicas > target.previous else "scale-in"
        self.note(
            kind,
            f"{after.name}: {target.previous} -> {target.replicas} replicas ({target.reason})",
        )

    def summary_calls(self) -> dict[str, Any]:
        modes = self.tally.modes
        return {
            "total": self.tally.calls,
            "failed": self.tally.failed,
            "failovers": self.tally.failovers,
            KEYED: modes[KEYED].as_dict(),
            UNKEYED: modes[UNKEYED].as_dict(),
            "first_failures": list(self.tally.failures),
        }


def _index(instance_id: str) -> tuple[int, str]:
    """cache-2 before cache-10."""
    head, _, tail = instance_id.rpartition("-")
    return (int(tail), head) if tail.isdigit() else (0, instance_id)


def read_stats(admin: str) -> dict[str, Any]:
    """GET http://<admin>/stats of a sidecar (blocking, 1 s timeout)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{admin}/stats", timeout=1) as response:
        doc = json.loads(response.read())
    return doc if isinstance(doc, dict) else {}
