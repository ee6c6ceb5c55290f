"""The fleet simulation's child processes and its pure models (bench/bench_fleet.py runs them).

Each role runs in a process of its own (multiprocessing, spawn), on uvloop like
``ringmesh sidecar``, and answers its parent's commands over a Pipe:

* ``registrar``: a shard of the fleet, every instance registered under a lease of
  its own and kept alive by registry/lease.py's LeaseKeeper (the sidecar's own code:
  one keep-alive every TTL/3). It can also hold bare leases (the TTL probe), churn its
  instances (revoke one lease, register a new instance) and write ``load/`` records
  as sidecar/load.py's ``worth_writing`` decides.
* ``watchers``: N real etcd watches on ``instances/`` (the adapter's ``watch_prefix``, a
  stream per watch as every sidecar has) over a few client connections; each event is
  decoded as the topology's PrefixWatch does (``registry.topology.parse_entry``) and
  the moment each watcher saw each change is kept.
* ``sidecar``: a fresh process that resyncs with TopologyWatch itself, builds the
  routing table of the whole fleet (every ring) and installs it in a native data
  plane (not started), reading its RSS at each step.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import random
import statistics
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from registry.errors import EtcdError, EtcdUnavailable, InvalidName, RecordError, RevisionCompacted
from registry.etcd import EtcdClient, EtcdConfig
from registry.keys import KeyLayout
from registry.lease import LeaseKeeper
from registry.records import SERVING, InstanceRecord
from registry.scaling import METRICS, LoadReport
from registry.topology import Registered, Topology, TopologyWatch, parse_entry
from sidecar.load import (
    DEFAULT_THRESHOLDS,
    RewriteThresholds,
    Written,
    changed_fields,
    worth_writing,
)
from sidecar.routing import RoutingTable

PREFIX = "/ringmesh-bench/fleet/v1"
LAYOUT = KeyLayout(PREFIX)
SYNC_SERVICE = "fleet-sync"  # the parent's marker records: every watch is live once seen
WALL0 = 1_700_000_000.0
MAX_REWATCH = 20  # a watch broken more often than this in one phase gives up


def service_name(index: int) -> str:
    return f"svc-{index:03d}"


def instance_record(service: str, instance_id: str, n: int) -> InstanceRecord:
    """A realistic record (about 300 bytes of JSON); the address is loopback and never dialled."""
    api = f"bench.{service.replace('-', '_')}.Api"
    return InstanceRecord(
        id=instance_id,
        service=service,
        address=f"127.{1 + n // 65536 % 254}.{n // 256 % 256}.{n % 256}:50051",
        zone=f"zone-{n % 3}",
        weight=1,
        state=SERVING,
        grpc_services=(api,),
        version="1.4.2",
        started_at=WALL0 + n,
        unary_methods=(f"/{api}/Get", f"/{api}/Put", f"/{api}/List"),
    )


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def quantiles(values: Iterable[float]) -> dict[str, float | int | None]:
    data = sorted(values)
    if not data:
        return {"n": 0, "p50": None, "p99": None, "max": None}

    def at(q: float) -> float:
        return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))]

    return {"n": len(data), "p50": at(0.50), "p99": at(0.99), "max": data[-1]}


# -- steady load readings (shared by the pure simulation and the live load/ phase) ----------


@dataclass(frozen=True)
class Profile:
    """One instance's steady load: its mean rate and latencies."""

    rps: float
    p50_ms: float
    p99_ms: float


def profiles(instances: int, services: int, seed: int) -> list[Profile]:
    """Per service, a rate log-uniform over 5-500 rps per instance and a p50 over 2-20 ms."""
    rng = random.Random(seed)
    per_service = [
        Profile(rps=math.exp(rng.uniform(math.log(5), math.log(500))), p50_ms=p50, p99_ms=p50 * 2.5)
        for p50 in (rng.uniform(2.0, 20.0) for _ in range(max(1, services)))
    ]
    return [per_service[i % len(per_service)] for i in range(instances)]


class SteadyReadings:
    """Each instance's 1 s load reading under a steady load, with the noise of a real one.

    ``quiet``: the noise of tests/unit/test_load_rewrite.py (rps Poisson-like, in-flight
    2%, p50 fixed, p99 18%). ``noisy``: in-flight follows the window's call count
    (Little's law: its Poisson noise, plus 5% of latency jitter), p50 moves 8% and p99
    25% (bucketed percentiles move 15-20% between steady windows, README "Load records").
    """

    MODELS = ("quiet", "noisy")

    def __init__(self, load: list[Profile], model: str, seed: int) -> None:
        if model not in self.MODELS:
            raise ValueError(f"model must be one of {self.MODELS}, got {model!r}")
        self._load = load
        self._noisy = model == "noisy"
        self._rng = random.Random(seed)

    def reading(self, i: int, second: float) -> LoadReport:
        g = self._rng.gauss
        p = self._load[i]
        calls = max(0.0, g(p.rps, math.sqrt(p.rps)))
        little = p.rps * p.p50_ms * 1.3 / 1000.0  # mean in flight: rate x mean latency
        if self._noisy:
            inflight = little * (calls / p.rps) * max(0.0, g(1.0, 0.05))
            p50 = max(0.1, g(p.p50_ms, 0.08 * p.p50_ms))
            p99 = max(p50, g(p.p99_ms, 0.25 * p.p99_ms))
        else:
            inflight = max(0.0, g(little, 0.02 * little))
            p50 = p.p50_ms
            p99 = max(0.1, g(p.p99_ms, 0.18 * p.p99_ms))
        return LoadReport(
            ts=round(WALL0 + second, 3),
            window_s=1.0,
            rps=round(calls, 3),
            inflight=round(inflight, 3),
            error_rate=0.0,
            p50_ms=round(p50, 3),
            p99_ms=round(p99, 3),
        )


MIXED = "mixed"
SCALED_ON = (*METRICS, MIXED)  # every service scaling on one metric, or a third on each


def metric_of(i: int, services: int, scaled_on: str) -> str:
    """The metric instance ``i``'s service scales on (``profiles`` puts i in service
    i % services)."""
    if scaled_on != MIXED:
        return scaled_on
    return METRICS[(i % max(1, services)) % len(METRICS)]


def simulate_load_writes(
    *,
    instances: int,
    services: int,
    seconds: int,
    model: str,
    seed: int,
    scaled_on: str,
    thresholds: RewriteThresholds = DEFAULT_THRESHOLDS,
) -> dict[str, Any]:
    """Every instance reads its load once a second for ``seconds`` (after a warm-up of
    ``max_interval_s`` + 10 s, uncounted); ``worth_writing`` decides each write, every
    service scaling on ``scaled_on`` (``metric_of``). Each
    instance starts at a random second, as a fleet's sidecars do. Instances are
    independent: a sample of a fleet gives its rate per instance."""
    readings = SteadyReadings(profiles(instances, services, seed), model, seed + 1)
    rng = random.Random(seed + 2)
    warmup = math.ceil(thresholds.max_interval_s) + 10
    start = [
        rng.randrange(0, max(1, math.ceil(thresholds.max_interval_s))) for _ in range(instances)
    ]
    written: list[Written | None] = [None] * instances
    metrics = [metric_of(i, services, scaled_on) for i in range(instances)]
    writes = 0
    causes: Counter[str] = Counter()
    started = time.perf_counter()
    for second in range(warmup + seconds):
        counted = second >= warmup
        now = float(second)
        for i in range(instances):
            if second < start[i]:
                continue
            reading = readings.reading(i, now)
            last = written[i]
            metric = metrics[i]
            if not worth_writing(reading, last, now=now, scaled_on=metric, thresholds=thresholds):
                continue
            written[i] = Written(reading, now)
            if counted:
                writes += 1
                if last is None:
                    causes["first"] += 1
                elif now - last.at >= thresholds.max_interval_s:
                    causes["max_interval"] += 1
                else:
                    causes.update(changed_fields(last.report, reading, thresholds, among=(metric,)))
    per_instance_s = writes / instances / seconds if instances and seconds else 0.0
    return {
        "model": model,
        "scaled_on": scaled_on,
        "instances": instances,
        "seconds_simulated": seconds,
        "warmup_s": warmup,
        "writes": writes,
        "writes_per_s": round(per_instance_s * instances, 1),
        "per_instance_s": round(per_instance_s, 4),
        "per_1000_instances_s": round(per_instance_s * 1000, 1),
        "causes": dict(causes.most_common()),
        "max_interval_s": thresholds.max_interval_s,
        "cpu_s": round(time.perf_counter() - started, 2),
    }


# -- the processes ----------------------------------------------------------------------------


class TimedClient(EtcdClient):
    """The adapter, counting lease keep-alives and each lease's gap between two of them."""

    def __init__(self, config: EtcdConfig) -> None:
        super().__init__(config)
        self.refreshes = 0
        self.refresh_failures = 0
        self.puts = 0
        self._last_refresh: dict[int, float] = {}
        # seconds between the sends of a lease's grant or successful refresh and the next
        self.gaps = array("d")

    async def refresh_lease(self, lease_id: int) -> int:
        sent = time.monotonic()
        try:
            ttl = await super().refresh_lease(lease_id)
        except (EtcdUnavailable, EtcdError):
            self.refresh_failures += 1
            raise
        self.refreshes += 1
        last = self._last_refresh.get(lease_id)
        if last is not None and len(self.gaps) < 2_000_000:
            self.gaps.append(sent - last)
        self._last_refresh[lease_id] = sent
        return ttl

    async def grant_lease(self, ttl: int) -> int:
        sent = time.monotonic()
        lease_id = await super().grant_lease(ttl)
        self._last_refresh[lease_id] = sent  # the first refresh's gap counts from the grant
        return lease_id

    async def put(self, key: str, value: bytes, *, lease: int | None) -> int:
        revision = await super().put(key, value, lease=lease)
        self.puts += 1
        return revision

    def forget(self, lease_id: int | None) -> None:
        if lease_id is not None:
            self._last_refresh.pop(lease_id, None)


@dataclass
class Held:
    """One instance (or bare lease) this process keeps alive."""

    key: str
    service: str
    n: int
    keeper: LeaseKeeper
    task: asyncio.Task[None]


class Registrar:
    """A shard of the fleet under LeaseKeepers; churns it and writes load/ records on demand."""

    def __init__(self, url: str, slots: list[tuple[str, int]], concurrency: int) -> None:
        self._client = TimedClient(EtcdConfig.from_urls(url))
        self._slots = slots
        self._ttl = 10
        self._concurrency = max(1, concurrency)
        self._held: dict[str, Held] = {}
        self._bare: list[Held] = []
        self._generation = 0
        self._turn = 0
        self._background: set[asyncio.Task[Any]] = set()

    async def _keep(
        self, key: str | None, value: bytes, ttl: int, wait_s: float
    ) -> tuple[LeaseKeeper, asyncio.Task[None], bool]:
        keeper = LeaseKeeper(self._client, ttl=ttl)
        if key is not None:
            await keeper.put(key, value)  # stored; the grant puts it under the new lease
        task = asyncio.create_task(keeper.run())
        try:
            await asyncio.wait_for(keeper.granted.wait(), wait_s)
        except TimeoutError:
            return keeper, task, False
        return keeper, task, True

    async def _bounded(
        self, count: int, start: Callable[[int], Awaitable[bool]], deadline: float
    ) -> tuple[list[float], int]:
        """Run ``start(i)`` for i < count, ``concurrency`` at a time; (latencies, failures)."""
        latencies: list[float] = []
        failures = 0
        queue = iter(range(count))

        async def worker() -> None:
            nonlocal failures
            for i in queue:
                if time.monotonic() > deadline:
                    failures += 1
                    continue
                t0 = time.monotonic()
                if await start(i):
                    latencies.append(time.monotonic() - t0)
                else:
                    failures += 1

        await asyncio.gather(*(worker() for _ in range(self._concurrency)))
        return latencies, failures

    async def register(self, ttl: int, limit_s: float) -> dict[str, Any]:
        """Register every slot's instance under a lease of its own (grant + put), kept alive."""
        self._ttl = ttl
        started = time.monotonic()
        deadline = started + limit_s

        async def start(i: int) -> bool:
            service, n = self._slots[i]
            instance_id = f"{service}-{n:05d}"
            key = LAYOUT.instance(service, instance_id)
            value = instance_record(service, instance_id, n).to_json()
            keeper, task, ok = await self._keep(key, value, self._ttl, 20.0)
            self._held[key] = Held(key, service, n, keeper, task)
            return ok

        latencies, failures = await self._bounded(len(self._slots), start, deadline)
        seconds = time.monotonic() - started
        return {
            "instances": len(self._slots),
            "registered": len(latencies),
            "failed": failures,
            "seconds": round(seconds, 2),
            "per_s": round(len(latencies) / seconds, 1) if seconds else None,
            "latency_s": quantiles(latencies),
        }

    async def hold_bare(self, count: int, ttl: int, limit_s: float) -> dict[str, Any]:
        """Grant ``count`` leases with no key (the TTL probe) and keep each with a LeaseKeeper."""
        started = time.monotonic()
        give_up = max(5, count // 200)  # leases lost while granting: this TTL does not hold
        aborted = False

        async def start(i: int) -> bool:
            nonlocal aborted
            if aborted:
                return False
            if i % 100 == 99 and self.lost()["lost"] >= give_up:
                aborted = True
                return False
            keeper, task, ok = await self._keep(None, b"", ttl, 20.0)
            self._bare.append(Held("", "", i, keeper, task))
            return ok

        latencies, failures = await self._bounded(count, start, started + limit_s)
        seconds = time.monotonic() - started
        return {
            "granted": len(latencies),
            "failed": failures,
            "aborted": aborted,
            "seconds": round(seconds, 2),
            "per_s": round(len(latencies) / seconds, 1) if seconds else None,
        }

    def lost(self) -> dict[str, int]:
        """Leases lost so far (re-granted by their keeper) and keepers holding none now."""
        keepers = [h.keeper for h in (*self._held.values(), *self._bare)]
        return {
            "lost": sum(max(0, k.grants - 1) for k in keepers),
            "no_lease": sum(1 for k in keepers if k.lease_id is None),
            "keepers": len(keepers),
        }

    async def drop_bare(self, limit_s: float) -> dict[str, Any]:
        """Revoke every bare lease (``concurrency`` at a time)."""
        bare, self._bare = self._bare, []
        started = time.monotonic()

        async def stop(i: int) -> bool:
            held = bare[i]
            held.task.cancel()
            self._client.forget(held.keeper.lease_id)
            await held.keeper.revoke()
            return True

        _, failures = await self._bounded(len(bare), stop, started + limit_s)
        for held in bare:
            held.task.cancel()
        return {"revoked": len(bare) - failures, "seconds": round(time.monotonic() - started, 2)}

    def stats(self, reset: bool) -> dict[str, Any]:
        keepers = [h.keeper for h in (*self._held.values(), *self._bare)]
        gaps = self._client.gaps
        client = self._client
        out = {
            **self.lost(),  # so far, of the keepers held now
            "granted_now": sum(1 for k in keepers if k.granted.is_set()),
            # since the last reset:
            "refreshes": client.refreshes,
            "refresh_failures": client.refresh_failures,
            "puts": client.puts,
            "gap_s": quantiles(gaps),
        }
        if reset:
            client.gaps = array("d")
            client.refreshes = client.refresh_failures = client.puts = 0
        return out

    async def churn(self, seconds: float, interval: float, max_changes: int) -> list[Any]:
        """Every ``interval`` s: revoke one instance's lease (its record goes), then register
        a new instance of the same service. Returns (kind, key, when it completed)."""
        events: list[tuple[str, str, float]] = []
        deadline = time.monotonic() + seconds
        next_at = time.monotonic()
        while time.monotonic() < deadline and len(events) < max_changes and self._held:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            keys = list(self._held)
            old = self._held.pop(keys[self._turn % len(keys)])
            self._turn += 1
            lease_id = old.keeper.lease_id
            await old.keeper.revoke()
            events.append(("delete", old.key, time.monotonic()))
            old.task.cancel()
            self._client.forget(lease_id)
            self._generation += 1
            instance_id = f"{old.service}-c{self._generation:05d}"
            key = LAYOUT.instance(old.service, instance_id)
            value = instance_record(old.service, instance_id, old.n).to_json()
            keeper, task, ok = await self._keep(key, value, self._ttl, 10.0)
            if ok:
                events.append(("put", key, time.monotonic()))
            self._held[key] = Held(key, old.service, old.n, keeper, task)
        return events

    async def write_loads(
        self,
        seconds: float,
        services: int,
        model: str,
        scaled_on: str,
        seed: int,
        max_inflight: int,
    ) -> dict[str, Any]:
        """Each instance reads a simulated steady load every second; a reading
        ``worth_writing`` (on its service's metric, ``metric_of``) is put as its ``load/``
        record under the instance's lease (what a sidecar's reporter does). Instances are
        spread over the second."""
        held = list(self._held.values())
        n = len(held)
        metrics = [metric_of(i, services, scaled_on) for i in range(n)]
        readings = SteadyReadings(profiles(n, services, seed), model, seed + 1)
        # Steady from the first second: every instance wrote its last record some time
        # in the last max interval (as a fleet that has been running has).
        rng = random.Random(seed + 3)
        interval = DEFAULT_THRESHOLDS.max_interval_s
        written: list[Written | None] = [
            Written(readings.reading(i, 0.0), -rng.uniform(0.0, interval)) for i in range(n)
        ]
        gate = asyncio.Semaphore(max(1, max_inflight))
        latencies = array("d")
        wanted = failed = skipped = 0
        slices = 10
        started = time.monotonic()
        deadline = started + seconds

        async def put(key: str, value: bytes, lease: int) -> None:
            nonlocal failed
            async with gate:
                t0 = time.monotonic()
                try:
                    await self._client.put(key, value, lease=lease)
                except (EtcdUnavailable, EtcdError):
                    failed += 1
                    return
                latencies.append(time.monotonic() - t0)

        tick = 0
        while time.monotonic() < deadline and tick < int(seconds * slices) + 1:
            slot = tick % slices
            now = time.monotonic() - started
            for i in range(slot, n, slices):
                reading = readings.reading(i, now)
                if not worth_writing(reading, written[i], now=now, scaled_on=metrics[i]):
                    continue
                lease = held[i].keeper.lease_id
                if lease is None:
                    skipped += 1
                    continue
                written[i] = Written(reading, now)
                wanted += 1
                key = LAYOUT.load(held[i].service, held[i].key.rsplit("/", 1)[1])
                task = asyncio.create_task(put(key, reading.to_json(), lease))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            tick += 1
            await asyncio.sleep(max(0.0, started + tick / slices - time.monotonic()))
        ended = time.monotonic()
        if self._background:
            await asyncio.wait(set(self._background), timeout=10)
        return {
            "instances": n,
            "seconds": round(ended - started, 2),
            "wanted": wanted,
            "written": len(latencies),
            "failed": failed,
            "no_lease": skipped,
            "put_latency_s": quantiles(latencies),
        }

    async def close(self) -> None:
        for held in (*self._held.values(), *self._bare):
            held.task.cancel()
        for task in list(self._background):
            task.cancel()
        # No revoke: the cluster is removed next, and 10,000 revokes would take a while.
        await self._client.aclose()


class Watchers:
    """``count`` watches on instances/, over ``connections`` clients; each sighting timed."""

    def __init__(self, url: str, count: int, connections: int, start_revision: int) -> None:
        self._clients = [EtcdClient(EtcdConfig.from_urls(url)) for _ in range(max(1, connections))]
        self._count = count
        self._start_revision = start_revision
        # (deleted, key) -> the moment each watcher saw it (monotonic; one clock per host)
        self.seen: dict[tuple[bool, str], array[float]] = {}
        self.deliveries = 0
        self.bad_records = 0
        self.rewatches = 0
        self.gave_up = 0
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for i in range(self._count):
            client = self._clients[i % len(self._clients)]
            self._tasks.append(asyncio.create_task(self._watch(client)))

    async def _watch(self, client: EtcdClient) -> None:
        revision = self._start_revision - 1
        for _attempt in range(MAX_REWATCH):
            try:
                async for event in client.watch_prefix(
                    LAYOUT.instances, start_revision=revision + 1
                ):
                    revision = max(revision, event.revision)
                    deleted = event.value is None
                    if event.value is not None:
                        try:  # what the topology's PrefixWatch does with each event
                            parse_entry(
                                LAYOUT,
                                event.key,
                                event.value,
                                lease=event.lease,
                                mod_revision=event.revision,
                            )
                        except (RecordError, InvalidName):
                            self.bad_records += 1
                    now = time.monotonic()
                    self.deliveries += 1
                    times = self.seen.get((deleted, event.key))
                    if times is None:
                        times = self.seen[(deleted, event.key)] = array("d")
                    times.append(now)
            except EtcdUnavailable:
                self.rewatches += 1
                await asyncio.sleep(0.2)
            except RevisionCompacted:
                break
        self.gave_up += 1

    def sightings(self, key: str) -> int:
        return len(self.seen.get((False, key), ()))

    def collect(self) -> dict[str, Any]:
        seen, self.seen = self.seen, {}
        deliveries, self.deliveries = self.deliveries, 0
        return {
            "seen": {f"{'delete' if d else 'put'}|{k}": v.tobytes() for (d, k), v in seen.items()},
            "deliveries": deliveries,  # since the last collect
            "bad_records": self.bad_records,
            "rewatches": self.rewatches,
            "gave_up": self.gave_up,
        }

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 5)


async def sidecar_probe(url: str, resyncs: int, events: int) -> dict[str, Any]:
    """A fresh sidecar-like process: resync with TopologyWatch, build and install the routing."""
    from sidecar.config import SidecarConfig
    from sidecar.plane import NativePlane

    gc.collect()
    rss = {"start": rss_bytes()}
    out: dict[str, Any] = {"rss_bytes": rss}
    async with EtcdClient(EtcdConfig.from_urls(url)) as client:
        await client.get(f"{PREFIX}/nothing")  # connected: the resync below is the listing only
        gc.collect()
        rss["connected"] = rss_bytes()
        times: list[float] = []
        topology = Topology()
        for _ in range(max(1, resyncs)):
            watch = TopologyWatch(client, LAYOUT)
            t0 = time.perf_counter()
            task = asyncio.create_task(watch.run())
            try:
                await asyncio.wait_for(watch.ready.wait(), 60)
                times.append(time.perf_counter() - t0)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            topology = watch.topology
            del watch
        out["resync_s"] = times
        out["instances"] = sum(len(ids) for ids in topology.services.values())
        out["services"] = len(topology.services)
        # The same resync in its three steps.
        t0 = time.perf_counter()
        kvs, revision = await client.get_prefix(LAYOUT.instances)
        t1 = time.perf_counter()
        entries = [
            parse_entry(LAYOUT, kv.key, kv.value, lease=kv.lease, mod_revision=kv.mod_revision)
            for kv in kvs
        ]
        t2 = time.perf_counter()
        Topology.build(revision, entries)
        t3 = time.perf_counter()
        out["resync_steps_s"] = {"list": t1 - t0, "parse": t2 - t1, "topology": t3 - t2}
        out["listing_bytes"] = sum(len(kv.key) + len(kv.value) for kv in kvs)
        del kvs, entries
    gc.collect()
    rss["topology"] = rss_bytes()
    t0 = time.perf_counter()
    table = RoutingTable.build(topology)  # every ring built (in the data plane's code)
    out["routing_build_s"] = time.perf_counter() - t0
    gc.collect()
    rss["routing"] = rss_bytes()
    plane = NativePlane(SidecarConfig(service="fleet-bench"), tracing=False)
    t0 = time.perf_counter()
    plane.install(table)
    out["install_s"] = time.perf_counter() - t0
    gc.collect()
    rss["installed"] = rss_bytes()
    out["per_event_s"] = _per_event(topology, table, plane, events)
    return out


def _per_event(
    topology: Topology, table: RoutingTable, plane: Any, events: int
) -> dict[str, list[float]]:
    """What one change costs a sidecar at this size, on its event loop, as TopologyWatch
    and the sidecar take it: the new snapshot (``Topology.changed``: the changed
    service's map, the others shared), RoutingTable.build with the previous table
    (only the changed service's ring is rebuilt), and the install. Each change is a new
    instance in a service (a registration), so the snapshots grow by one each."""
    entries = [e for ids in topology.services.values() for e in ids.values()]
    steps: dict[str, list[float]] = {"topology": [], "routing": [], "install": []}
    for i in range(max(0, min(events, len(entries)))):
        victim = entries[(i * 7919) % len(entries)]
        moved = replace(victim.record, id=f"{victim.record.id}-e{i}")
        revision = topology.revision + 1
        t0 = time.perf_counter()
        topology = topology.changed(
            revision, moved.service, moved.id, Registered(moved, victim.lease, revision)
        )
        t1 = time.perf_counter()
        table = RoutingTable.build(topology, previous=table)
        t2 = time.perf_counter()
        plane.install(table)
        t3 = time.perf_counter()
        for name, value in zip(steps, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            steps[name].append(value)
    return steps


# -- the command loop -----------------------------------------------------------------------


def serve(conn: Connection, role: str, params: dict[str, Any]) -> None:
    """A child process's entry point: build the role, answer commands until ``stop``."""
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    logging.getLogger("registry").setLevel(logging.CRITICAL)  # outage lines, counted instead
    # aetcd's refresh_lease leaves each keep-alive stream's request task pending, and
    # asyncio says so when it is collected: noise, thousands of lines.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        import uvloop

        uvloop.run(_serve(conn, role, params))
    except ImportError:
        asyncio.run(_serve(conn, role, params))


async def _serve(conn: Connection, role: str, params: dict[str, Any]) -> None:
    registrar: Registrar | None = None
    watchers: Watchers | None = None
    try:
        if role == "registrar":
            registrar = Registrar(params["url"], params["slots"], params["concurrency"])
        elif role == "watchers":
            watchers = Watchers(
                params["url"], params["count"], params["connections"], params["start_revision"]
            )
            watchers.start()
        elif role == "sidecar":
            pass
        else:
            raise ValueError(f"unknown role {role!r}")
        conn.send(("ok", "started"))
        for _ in range(1_000_000):
            command, args = await asyncio.to_thread(conn.recv)
            if command == "stop":
                conn.send(("ok", None))
                return
            try:
                result = await _run(command, args, registrar, watchers, params)
            except Exception:
                conn.send(("error", traceback.format_exc()))
                continue
            conn.send(("ok", result))
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the parent went away
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        if registrar is not None:
            await registrar.close()
        if watchers is not None:
            await watchers.close()


async def _run(
    command: str,
    args: dict[str, Any],
    registrar: Registrar | None,
    watchers: Watchers | None,
    params: dict[str, Any],
) -> Any:
    if command == "sidecar_probe":
        return await sidecar_probe(params["url"], args["resyncs"], args["events"])
    if watchers is not None:
        if command == "sightings":
            return watchers.sightings(args["key"])
        if command == "collect":
            return watchers.collect()
    if registrar is not None:
        if command == "register":
            return await registrar.register(args["ttl"], args["limit_s"])
        if command == "hold_bare":
            return await registrar.hold_bare(args["count"], args["ttl"], args["limit_s"])
        if command == "drop_bare":
            return await registrar.drop_bare(args["limit_s"])
        if command == "lost":
            return registrar.lost()
        if command == "stats":
            return registrar.stats(args.get("reset", False))
        if command == "churn":
            return await registrar.churn(args["seconds"], args["interval"], args["max_changes"])
        if command == "write_loads":
            return await registrar.write_loads(
                args["seconds"],
                args["services"],
                args["model"],
                args["scaled_on"],
                args["seed"],
                args["max_inflight"],
            )
    raise ValueError(f"command {command!r} is not for this role")


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
