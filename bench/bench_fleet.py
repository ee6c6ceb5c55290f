"""The fleet simulation (issue 10): 10,000 instances in 100 services on a 3-member etcd.

On a real 3-member cluster on loopback (``EmbeddedEtcd(members=3)``):

1. Pure, in this process, before anything else loads the machine: the ``load/`` write
   rate of the whole fleet (sidecar/load.py's ``worth_writing`` over simulated steady
   1 s readings of every instance), and a ring rebuild for a 1,000-instance service
   (``RoutingTable.build``, its ring built in Rust, and its install in a native plane).
2. The lease probe (``--probe-ttls``, smallest first, up to the first that holds):
   ``--instances`` bare leases (no key) kept by LeaseKeeper at each TTL for at least
   ``--probe-hold`` s and one TTL, stopped at the first lost lease: lost leases, the
   refresh gaps, the CPU per keep-alive of the keepers and of etcd.
3. The fleet: every instance registered under a lease of its own (grant + put) by
   ``--registrars`` processes, kept by LeaseKeeper at ``--ttl`` (``auto``: the smallest
   probed TTL that held with room); one more process owns one instance per service and
   churns: ``--churn`` of the fleet a minute is replaced (its lease revoked, a new
   instance registered). Then ``--hold`` s (at least 2/3 TTL) of leases alone.
4. A fresh sidecar-like process: resync with TopologyWatch (list every record, parse,
   build the Topology), then RoutingTable (every ring) + install for the whole
   fleet, RSS at each step, and what one change costs it at this size.
5. For each count in ``--watchers``: that many real etcd watches on ``instances/`` in
   ``--watcher-procs`` processes over ``--connections`` clients each, each event decoded
   as the topology's watch does, for ``--phase-seconds`` of churn: the time from each
   put/revoke completing to the LAST watcher seeing it.
6. ``--load-seconds`` of live ``load/`` writes: every instance's simulated reading each
   second, put under its lease when ``worth_writing`` says so (etcd's put rate with them).

etcd's write rate and database size come from each member's ``/metrics``; CPU from
``/proc``. Prints a table, writes ``bench/results/fleet.json``.
Run: ``./dev bench fleet`` (7-8 min); smoke (~1 min): ``./dev bench fleet --instances 1000
--services 10 --watchers 20,50 --phase-seconds 10 --churn 0.1 --hold 5 --probe-ttls 3,5
--probe-hold 8 --load-seconds 5 --load-sim-instances 500 --load-sim-seconds 20``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from array import array
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import fleet_workers as fw
from registry.embedded import EmbeddedEtcd, EtcdMember
from registry.topology import Registered, Topology
from sidecar.ring import DEFAULT_VNODES
from sidecar.routing import RoutingTable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "fleet.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGET_WATCH_P99_S = 0.100
TARGET_RESYNC_S = 1.0
TARGET_RING_S = 0.200
TARGET_LOAD_WRITES_S = 1000.0

METRICS = (
    "etcd_mvcc_put_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_txn_total",
    "etcd_debugging_mvcc_put_total",
    "etcd_debugging_mvcc_delete_total",
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes",
    "etcd_debugging_mvcc_keys_total",
    "etcd_debugging_mvcc_watcher_total",
    "etcd_debugging_mvcc_slow_watcher_total",
    "etcd_debugging_mvcc_events_total",
    "etcd_server_proposals_committed_total",
    "etcd_server_is_leader",
    "etcd_debugging_lease_granted_total",
    "etcd_debugging_lease_revoked_total",
    "etcd_debugging_lease_renewed_total",
    "etcd_disk_wal_fsync_duration_seconds_count",
    "etcd_network_client_grpc_sent_bytes_total",
)


# -- small helpers ----------------------------------------------------------------------------


class Budget:
    """The whole run's time limit: a phase that would not fit is skipped, and says so."""

    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Worker:
    """A child process (bench/fleet_workers.py) and the Pipe its commands go through."""

    def __init__(self, name: str, role: str, params: dict[str, Any], start_s: float = 60) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=fw.serve, args=(child, role, params), name=name, daemon=True
        )
        self.process.start()
        child.close()
        self.expect(start_s)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def send(self, command: str, **args: Any) -> None:
        self._conn.send((command, args))

    def expect(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no answer within {timeout:g} s")
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.name} failed:\n{value}")
        return value

    def call(self, command: str, timeout: float, **args: Any) -> Any:
        self.send(command, **args)
        return self.expect(timeout)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.process.is_alive():
                self.call("stop", 20)
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()


def call_all(workers: Sequence[Worker], command: str, timeout: float, **args: Any) -> list[Any]:
    """The same command to every worker at once; every answer."""
    for worker in workers:
        worker.send(command, **args)
    deadline = time.monotonic() + timeout
    return [w.expect(max(1.0, deadline - time.monotonic())) for w in workers]


def cpu_s(pid: int | None) -> float:
    """utime + stime of a whole process, in seconds (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Meter:
    """CPU seconds of each group of processes, etcd's counters of each member, wall time."""

    def __init__(self, etcd: EmbeddedEtcd, groups: dict[str, Callable[[], list[int | None]]]):
        self._etcd = etcd
        self._groups = groups

    def read(self) -> dict[str, Any]:
        cpu = {name: sum(cpu_s(pid) for pid in pids()) for name, pids in self._groups.items()}
        for member in self._etcd.members:
            cpu[member.name] = cpu_s(member.pid)
        cpu["etcd"] = sum(cpu_s(m.pid) for m in self._etcd.members)
        cpu["bench"] = sum(os.times()[:2])
        with open("/proc/stat") as f:
            jiffies = [int(v) for v in f.readline().split()[1:8]]
        return {
            "host": (sum(jiffies) - jiffies[3] - jiffies[4], sum(jiffies)),  # (busy, all)
            "at": time.monotonic(),
            "cpu": cpu,
            "metrics": [scrape(m) for m in self._etcd.members],
        }


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two Meter readings: CPU % of a core, etcd counter rates."""
    wall = max(1e-6, after["at"] - before["at"])
    cpu = {
        k: round(100 * (after["cpu"][k] - before["cpu"].get(k, 0.0)) / wall, 1)
        for k in after["cpu"]
    }

    def counter(name: str) -> float:
        # Every member applies every write: the largest member's count is the cluster's.
        changes: list[float] = [
            a.get(name, 0.0) - b.get(name, 0.0)
            for a, b in zip(after["metrics"], before["metrics"], strict=True)
        ]
        return max(changes, default=0.0)

    puts = counter("etcd_mvcc_put_total") or counter("etcd_debugging_mvcc_put_total")
    deletes = counter("etcd_mvcc_delete_total") or counter("etcd_debugging_mvcc_delete_total")
    busy = after["host"][0] - before["host"][0]
    total = max(1, after["host"][1] - before["host"][1])
    host = 100 * len(os.sched_getaffinity(0)) * busy / total
    ours = sum(
        v for k, v in cpu.items() if k in ("etcd", "registrars", "churner", "watchers", "bench")
    )
    return {
        "seconds": round(wall, 2),
        # the whole machine, in % of one core (200% = both cores busy), and what of it
        # went to processes this benchmark did not start (a shared machine's noise)
        "host_pct": round(host, 1),
        "other_pct": round(max(0.0, host - ours), 1),
        "cpu_pct": cpu,
        "puts": int(puts),
        "puts_per_s": round(puts / wall, 1),
        "deletes": int(deletes),
        "deletes_per_s": round(deletes / wall, 1),
        "txns_per_s": round(counter("etcd_mvcc_txn_total") / wall, 1),
        "proposals_per_s": round(counter("etcd_server_proposals_committed_total") / wall, 1),
        "lease_renewals_per_s": round(counter("etcd_debugging_lease_renewed_total") / wall, 1),
        "fsyncs_per_s": round(counter("etcd_disk_wal_fsync_duration_seconds_count") / wall, 1),
        "sent_mb_per_s": round(
            counter("etcd_network_client_grpc_sent_bytes_total") / wall / 1e6, 2
        ),
    }


def scrape(member: EtcdMember) -> dict[str, float]:
    """The counters and gauges we want from a member's /metrics (summed over labels)."""
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(member.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in METRICS:
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def gateway(member: EtcdMember, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """One call of etcd's JSON gateway (the parent's few writes need no gRPC client)."""
    request = urllib.request.Request(member.url + path, data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def count_prefix(member: EtcdMember, prefix: str) -> tuple[int, int]:
    """(keys under ``prefix``, store revision)."""
    answer = gateway(
        member,
        "/v3/kv/range",
        {"key": b64(prefix), "range_end": b64(prefix_end(prefix)), "count_only": True},
    )
    return int(answer.get("count", 0)), int(answer["header"]["revision"])


def member_status(member: EtcdMember) -> dict[str, Any]:
    try:
        status = gateway(member, "/v3/maintenance/status", {})
    except OSError:
        return {}
    return {
        "db_size_bytes": int(status.get("dbSize", 0)),
        "db_in_use_bytes": int(status.get("dbSizeInUse", 0)),
        "leader": status.get("leader") == status.get("header", {}).get("member_id"),
        "raft_index": int(status.get("raftIndex", 0)),
    }


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    etcd_version = subprocess.run(
        [fw_etcd(), "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n", 1)[0]
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "etcd": etcd_version,
        "commit": commit or "unknown",
    }


def fw_etcd() -> str:
    from registry.embedded import find_etcd

    return find_etcd()


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def log(message: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- 1. pure measurements ------------------------------------------------------------------------


def ring_rebuild(instances: int, repeats: int) -> dict[str, Any]:
    """RoutingTable.build of one ``instances``-instance service after one change (the previous
    table given, as a sidecar does: its ring is rebuilt in the data plane's code), then the
    install in a native plane (not started). Each repeat replaces one instance."""
    from sidecar.config import SidecarConfig
    from sidecar.plane import NativePlane

    service = "big"
    entries = [
        Registered(fw.instance_record(service, f"{service}-{i:05d}", i), i + 1, i + 1)
        for i in range(instances)
    ]
    table = RoutingTable.build(Topology.build(instances, entries))
    plane = NativePlane(SidecarConfig(service="fleet-bench"), tracing=False)
    build, install = [], []
    for r in range(repeats):
        victim = entries[(r * 131) % len(entries)]
        entries = [e for e in entries if e is not victim]
        entries.append(Registered(replace(victim.record, id=f"{victim.record.id}-r{r}"), 1, 1))
        topology = Topology.build(instances + r + 1, entries)
        t0 = time.perf_counter()
        table = RoutingTable.build(topology, previous=table)
        t1 = time.perf_counter()
        plane.install(table)
        t2 = time.perf_counter()
        build.append(t1 - t0)
        install.append(t2 - t1)
    return {
        "instances": instances,
        "vnodes": DEFAULT_VNODES,
        "points": len(table.rings[service].lookup),
        "repeats": repeats,
        "build_s": build,
        "install_s": install,
        "rebuild_p50_s": statistics.median(build),
        "rebuild_max_s": max(build),
        "install_p50_s": statistics.median(install),
    }


# -- the run ------------------------------------------------------------------------------------


def slots(instances: int, services: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(the churner's pool: instance 0 of every service, everything else)."""
    pool: list[tuple[str, int]] = []
    rest: list[tuple[str, int]] = []
    for n in range(instances):
        slot = (fw.service_name(n % services), n)
        (pool if n < services else rest).append(slot)
    return pool, rest


def shard(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts)]


def lease_row(
    kind: str, ttl: int, leases: int, seconds: float, stats: list[dict[str, Any]], d: dict[str, Any]
) -> dict[str, Any]:
    """One measured point of lease keeping: what it needs, what it got, what it cost."""
    refreshes = sum(s["refreshes"] for s in stats)
    failures = sum(s["refresh_failures"] for s in stats)
    gap_max = max((s["gap_s"]["max"] or 0.0) for s in stats)
    gap_p99 = max((s["gap_s"]["p99"] or 0.0) for s in stats)
    # Lost: re-granted by its keeper after etcd dropped it, or dropped and not back yet.
    no_lease = sum(s["no_lease"] for s in stats)
    lost = sum(s["lost"] for s in stats) + no_lease
    keeper_pct = d["cpu_pct"].get("registrars", 0.0) + d["cpu_pct"].get("churner", 0.0)
    etcd_pct = d["cpu_pct"]["etcd"]
    per_s = refreshes / seconds if seconds else 0.0
    return {
        "kind": kind,
        "ttl_s": ttl,
        "leases": leases,
        "seconds": round(seconds, 1),
        "needed_per_s": round(leases * 3 / ttl, 1),  # LeaseKeeper refreshes every TTL/3
        "refreshes_per_s": round(per_s, 1),
        "refresh_failures": failures,
        "gap_p99_s": round(gap_p99, 2),
        "gap_max_s": round(gap_max, 2),
        "gap_max_over_ttl": round(gap_max / ttl, 2),
        "lost": lost,
        "no_lease_now": no_lease,
        # Held: no lease lost, none missing, no lease a whole TTL without a refresh.
        "held": lost == 0 and no_lease == 0 and gap_max < ttl,
        # Healthy: held, and with room: at most 1% of the keep-alives timed out.
        "healthy": lost == 0 and no_lease == 0 and gap_max < ttl and failures <= refreshes / 100,
        "keeper_cpu_pct": round(keeper_pct, 1),
        "host_cpu_pct": d["host_pct"],
        "other_cpu_pct": d["other_pct"],
        "etcd_cpu_pct": round(etcd_pct, 1),
        "keeper_us_per_refresh": round(keeper_pct * 1e4 / per_s, 1) if per_s else None,
        "etcd_us_per_refresh": round(etcd_pct * 1e4 / per_s, 1) if per_s else None,
        "etcd_lease_renewals_per_s": d["lease_renewals_per_s"],
    }


def analyse_watch(
    watchers: int,
    events: list[tuple[str, str, float]],
    collected: list[dict[str, Any]],
) -> dict[str, Any]:
    """Per change: when the first and the last watcher saw it, from the put/revoke's
    completion; and within each process, how long its last watcher came after its
    first (its watches queue behind each other on one event loop)."""
    per_process: list[dict[str, array[float]]] = []
    for part in collected:
        mine: dict[str, array[float]] = {}
        for name, raw in part["seen"].items():
            times = array("d")
            times.frombytes(raw)
            mine[name] = times
        per_process.append(mine)
    first: list[float] = []
    last: list[float] = []
    every: list[float] = []
    spread: list[float] = []
    missed = 0
    duplicates = 0
    empty = array("d")
    for kind, key, done in events:
        name = f"{kind}|{key}"
        parts = [mine.get(name, empty) for mine in per_process]
        seen = sum(len(times) for times in parts)
        for times in parts:
            every.extend(t - done for t in times)
        if seen >= watchers:
            last.append(max(max(t) for t in parts if t) - done)
            first.append(min(min(t) for t in parts if t) - done)
            spread.append(max(max(t) - min(t) for t in parts if t))
            duplicates += seen - watchers
        else:
            missed += 1
    q_first, q_last = fw.quantiles(first), fw.quantiles(last)
    q_every, q_spread = fw.quantiles(every), fw.quantiles(spread)
    return {
        "changes": len(events),
        "changes_seen_by_all": len(last),
        "missed": missed,
        "duplicates": duplicates,
        "first_p50_s": q_first["p50"],
        "first_p99_s": q_first["p99"],
        "last_p50_s": q_last["p50"],
        "last_p99_s": q_last["p99"],
        "last_max_s": q_last["max"],
        "each_p50_s": q_every["p50"],
        "each_p99_s": q_every["p99"],
        "in_process_spread_p50_s": q_spread["p50"],
        "in_process_spread_p99_s": q_spread["p99"],
        "deliveries": sum(p["deliveries"] for p in collected),
        "rewatches": sum(p["rewatches"] for p in collected),
        "bad_records": sum(p["bad_records"] for p in collected),
    }


def sync_watchers(
    procs: list[Worker], watchers: int, member: EtcdMember, tag: str, limit_s: float
) -> float | None:
    """Put marker records until one is seen by every watcher: every watch is then live."""
    started = time.monotonic()
    try:
        for attempt in range(10_000):
            if time.monotonic() - started > limit_s:
                return None
            key = fw.LAYOUT.instance(fw.SYNC_SERVICE, f"marker-{tag}-{attempt}")
            value = fw.instance_record(fw.SYNC_SERVICE, f"marker-{tag}-{attempt}", 1).to_json()
            gateway(
                member, "/v3/kv/put", {"key": b64(key), "value": base64.b64encode(value).decode()}
            )
            for _ in range(8):  # a new marker every 2 s: a watch made since sees that one
                time.sleep(0.25)
                if sum(p.call("sightings", 30, key=key) for p in procs) >= watchers:
                    return time.monotonic() - started
        return None
    finally:
        sync = fw.LAYOUT.service_instances(fw.SYNC_SERVICE)
        with contextlib.suppress(OSError):
            gateway(
                member, "/v3/kv/deleterange", {"key": b64(sync), "range_end": b64(prefix_end(sync))}
            )


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = a + b x."""
    if len(points) < 2:
        return None
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def run(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    result: dict[str, Any] = {"notices": []}
    notices: list[str] = result["notices"]

    # 1. pure, on a quiet machine.
    log("load/ write simulation")
    sample = min(args.instances, args.load_sim_instances)
    sims = [
        fw.simulate_load_writes(
            instances=sample,
            services=args.services,
            seconds=args.load_sim_seconds,
            model=model,
            scaled_on=scaled_on,
            seed=args.seed,
        )
        for model in fw.SteadyReadings.MODELS
        for scaled_on in fw.SCALED_ON
    ]
    for sim in sims:  # instances are independent: the sample's rate per instance, x the fleet
        sim["fleet"] = args.instances
        sim["writes_per_s"] = round(sim["per_instance_s"] * args.instances, 1)
    result["load_simulation"] = sims
    log("ring rebuild")
    result["ring"] = ring_rebuild(args.ring_instances, args.ring_repeats)

    pool, rest = slots(args.instances, args.services)
    workers: list[Worker] = []
    registrars: list[Worker] = []
    churner: Worker | None = None
    watcher_procs: list[Worker] = []
    with EmbeddedEtcd(members=3) as etcd:
        log(f"etcd up: {etcd.url}")
        member = etcd.members[0]
        meter = Meter(
            etcd,
            {
                "registrars": lambda: [w.pid for w in registrars],
                "churner": lambda: [churner.pid if churner else None],
                "watchers": lambda: [w.pid for w in watcher_procs],
            },
        )
        try:
            for i, part in enumerate(shard(rest, args.registrars)):
                params = {"url": etcd.url, "slots": part, "concurrency": args.register_concurrency}
                registrars.append(Worker(f"registrar-{i}", "registrar", params))
            churner = Worker(
                "churner",
                "registrar",
                {"url": etcd.url, "slots": pool, "concurrency": min(16, args.register_concurrency)},
            )
            workers.extend([*registrars, churner])
            log("pids: " + ", ".join(f"{w.name} {w.pid}" for w in workers))
            keepers = [*registrars, churner]

            # 2. the lease probe: bare leases, each TTL in turn.
            probes: list[dict[str, Any]] = []
            for ttl in sorted(args.probe_ttls):
                hold = max(args.probe_hold, float(ttl))
                if probes and probes[-1]["healthy"]:
                    break  # a larger TTL holds as well
                if budget.left() < hold + 300:
                    notices.append(f"probe at TTL {ttl} s skipped: out of time")
                    continue
                log(f"lease probe: {args.instances} bare leases at TTL {ttl} s")
                counts = [len(p) for p in shard(list(range(args.instances)), len(keepers))]
                for w, count in zip(keepers, counts, strict=True):
                    w.send("hold_bare", count=count, ttl=ttl, limit_s=args.register_limit)
                granted = [w.expect(args.register_limit + 30) for w in keepers]
                call_all(keepers, "stats", 30, reset=True)
                before = meter.read()
                # Hold, and stop at the first lost lease: it does not hold (and a storm of
                # re-grants would only slow what follows).
                aborted = any(g["aborted"] for g in granted)
                hold_until = time.monotonic() + hold
                while not aborted and time.monotonic() < hold_until:
                    time.sleep(min(2.0, max(0.0, hold_until - time.monotonic())))
                    aborted = sum(x["lost"] for x in call_all(keepers, "lost", 30)) > 0
                after = meter.read()
                stats = call_all(keepers, "stats", 30, reset=True)
                row = lease_row(
                    "probe (bare leases)",
                    ttl,
                    args.instances,
                    after["at"] - before["at"],
                    stats,
                    delta(before, after),
                )
                row["grant"] = granted
                row["stopped_early"] = aborted
                probes.append(row)
                call_all(
                    keepers, "drop_bare", args.register_limit + 30, limit_s=args.register_limit
                )
                log(
                    f"  held={row['held']} healthy={row['healthy']} lost={row['lost']} "
                    f"failures={row['refresh_failures']} gap max {row['gap_max_s']} s"
                )
            result["lease_probes"] = probes

            ttl = args.ttl
            if ttl is None:
                held = [p["ttl_s"] for p in probes if p["healthy"]]
                ttl = min(held) if held else args.fallback_ttl
                if not held and probes:
                    notices.append(f"no probed TTL held: the fleet runs at --fallback-ttl {ttl} s")
            result["ttl_s"] = ttl

            # 3. register the fleet.
            log(f"registering {args.instances} instances at TTL {ttl} s")
            before = meter.read()
            for w in keepers:
                w.send("register", ttl=ttl, limit_s=args.register_limit)
            registered = [w.expect(args.register_limit + 60) for w in keepers]
            after = meter.read()
            count, revision = count_prefix(member, fw.LAYOUT.instances)
            reg_wall = after["at"] - before["at"]
            result["registration"] = {
                "instances": args.instances,
                "registered": sum(r["registered"] for r in registered),
                "failed": sum(r["failed"] for r in registered),
                "keys_in_etcd": count,
                "seconds": round(reg_wall, 2),
                "per_s": round(sum(r["registered"] for r in registered) / reg_wall, 1),
                "latency_p99_s": max((r["latency_s"]["p99"] or 0.0) for r in registered),
                "etcd": delta(before, after),
                "parts": registered,
            }
            log(f"  {count} keys in {reg_wall:.1f} s")
            call_all(keepers, "stats", 30, reset=True)
            before = meter.read()
            time.sleep(max(args.hold, ttl * 2 / 3))  # every lease refreshed twice
            after = meter.read()
            stats = call_all(keepers, "stats", 30, reset=True)
            result["lease_hold"] = lease_row(
                "fleet (instances)",
                ttl,
                args.instances,
                after["at"] - before["at"],
                stats,
                delta(before, after),
            )
            result["etcd_steady"] = delta(before, after)
            log(
                f"  hold: {result['lease_hold']['refreshes_per_s']} refreshes/s, lost {result['lease_hold']['lost']}"
            )

            # 4. a fresh sidecar: resync and memory.
            log("fresh sidecar: resync, routing table, memory")
            sidecar = Worker("sidecar", "sidecar", {"url": etcd.url})
            workers.append(sidecar)
            try:
                result["sidecar"] = sidecar.call(
                    "sidecar_probe", 300, resyncs=args.resyncs, events=args.events
                )
            finally:
                sidecar.stop()

            # 5. the watchers, at each count.
            interval = 60.0 / max(1e-9, args.instances * args.churn)
            result["churn"] = {
                "fraction_per_min": args.churn,
                "replacements_per_min": round(args.instances * args.churn, 1),
                "interval_s": round(interval, 3),
                "changes_per_s": round(2 / interval, 2),
            }
            phases = []
            for watchers in args.watchers:
                if budget.left() < args.phase_seconds + 90:
                    notices.append(f"{watchers} watchers skipped: out of time")
                    continue
                keys, revision = count_prefix(member, fw.LAYOUT.instances)
                if keys < 0.98 * args.instances:
                    notices.append(
                        f"{watchers} watchers and up skipped: the fleet has lost its leases "
                        f"({keys} of {args.instances} instance keys left)"
                    )
                    break
                log(f"{watchers} watchers")
                started = time.monotonic()
                watcher_procs[:] = []
                try:
                    for i, part in enumerate(shard(list(range(watchers)), args.watcher_procs)):
                        params = {
                            "url": etcd.url,
                            "count": len(part),
                            "connections": args.connections,
                            "start_revision": revision + 1,
                        }
                        watcher_procs.append(Worker(f"watchers-{i}", "watchers", params))
                    log("  pids: " + ", ".join(f"{w.name} {w.pid}" for w in watcher_procs))
                    synced = sync_watchers(watcher_procs, watchers, member, str(watchers), 120)
                    if synced is None:
                        notices.append(
                            f"{watchers} watchers: not all live after 120 s, phase skipped"
                        )
                        continue
                    time.sleep(1.0)  # the markers' deletes delivered too
                    call_all(watcher_procs, "collect", 60)  # the markers: not counted
                    before = meter.read()
                    events = churner.call(
                        "churn",
                        args.phase_seconds + 60,
                        seconds=args.phase_seconds,
                        interval=interval,
                        max_changes=10_000,
                    )
                    time.sleep(args.drain)
                    after = meter.read()
                    collected = call_all(watcher_procs, "collect", 120)
                    d = delta(before, after)
                    row = {
                        "watchers": watchers,
                        "processes": len(watcher_procs),
                        "connections": len(watcher_procs) * args.connections,
                        "setup_s": round(
                            time.monotonic() - started - (after["at"] - before["at"]), 1
                        ),
                        "sync_s": round(synced, 2),
                    }
                    row.update(analyse_watch(watchers, events, collected))
                    row["instance_keys_after"] = count_prefix(member, fw.LAYOUT.instances)[0]
                    row["leases_lost_so_far"] = sum(
                        x["lost"] for x in call_all(keepers, "lost", 30)
                    )
                    seconds = d["seconds"]
                    row["deliveries_per_s"] = round(row["deliveries"] / seconds, 1)
                    row["watchers_cpu_pct"] = d["cpu_pct"]["watchers"]
                    base_etcd = result["etcd_steady"]["cpu_pct"]["etcd"]
                    row["etcd_cpu_pct"] = d["cpu_pct"]["etcd"]
                    per_s = row["deliveries_per_s"]
                    row["watcher_us_per_delivery"] = (
                        round(row["watchers_cpu_pct"] * 1e4 / per_s, 1) if per_s else None
                    )
                    row["etcd_extra_us_per_delivery"] = (
                        round(max(0.0, d["cpu_pct"]["etcd"] - base_etcd) * 1e4 / per_s, 1)
                        if per_s
                        else None
                    )
                    row["host_cpu_pct"] = d["host_pct"]
                    row["other_cpu_pct"] = d["other_pct"]
                    row["etcd"] = d
                    phases.append(row)
                    log(
                        f"  last watcher p50 {ms(row['last_p50_s'])} p99 {ms(row['last_p99_s'])}, missed {row['missed']}"
                    )
                finally:
                    for w in watcher_procs:
                        w.stop()
                    watcher_procs[:] = []
            result["watch"] = phases
            stats = call_all(keepers, "stats", 30, reset=True)
            result["lease_during_watch"] = {
                "lost": sum(s["lost"] for s in stats),
                "no_lease_now": sum(s["no_lease"] for s in stats),
                "gap_max_s": max((s["gap_s"]["max"] or 0.0) for s in stats),
                "refresh_failures": sum(s["refresh_failures"] for s in stats),
            }

            # 6. live load/ writes.
            if args.load_seconds > 0 and budget.left() > args.load_seconds + 60:
                log(f"live load/ writes for {args.load_seconds} s")
                before = meter.read()
                loads = call_all(
                    keepers,
                    "write_loads",
                    args.load_seconds + 60,
                    seconds=args.load_seconds,
                    services=args.services,
                    model="noisy",
                    scaled_on=fw.MIXED,
                    seed=args.seed,
                    max_inflight=64,
                )
                after = meter.read()
                d = delta(before, after)
                result["load_live"] = {
                    "model": "noisy",
                    "scaled_on": fw.MIXED,
                    "seconds": d["seconds"],
                    "wanted": sum(p["wanted"] for p in loads),
                    "written": sum(p["written"] for p in loads),
                    "failed": sum(p["failed"] for p in loads),
                    "wanted_per_s": round(sum(p["wanted"] for p in loads) / d["seconds"], 1),
                    "written_per_s": round(sum(p["written"] for p in loads) / d["seconds"], 1),
                    "etcd_puts_per_s": d["puts_per_s"],
                    "put_latency_p99_s": max((p["put_latency_s"]["p99"] or 0.0) for p in loads),
                    "etcd": d,
                }
            elif args.load_seconds > 0:
                notices.append("live load/ phase skipped: out of time")

            # The end: every instance still registered, etcd's size.
            count, revision = count_prefix(member, fw.LAYOUT.instances)
            stats = call_all(keepers, "stats", 30, reset=True)
            result["final"] = {
                "instance_keys": count,
                "revision": revision,
                "leases_lost_total": sum(s["lost"] for s in stats),
                "no_lease_now": sum(s["no_lease"] for s in stats),
                "members": {
                    m.name: {
                        **member_status(m),
                        **{
                            k: v
                            for k, v in scrape(m).items()
                            if "size" in k or "keys" in k or "watcher" in k
                        },
                    }
                    for m in etcd.members
                },
            }
        finally:
            for w in reversed(workers):
                w.stop()
            for w in watcher_procs:
                w.stop()
    return result


# -- the report ---------------------------------------------------------------------------------


def extrapolate(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Leases: what keeping the fleet at TTL 10 s would cost, from every measured point
    # that held (a point that did not hold measures a machine in overload).
    points = [
        *result.get("lease_probes", []),
        *([result["lease_hold"]] if "lease_hold" in result else []),
    ]
    costed = [p for p in points if p["keeper_us_per_refresh"] and p["etcd_us_per_refresh"]]
    costed = [p for p in costed if p["held"]] or costed
    if costed:
        keeper_us = statistics.median(p["keeper_us_per_refresh"] for p in costed)
        etcd_us = statistics.median(p["etcd_us_per_refresh"] for p in costed)
        need = args.instances * 3 / 10
        cores = os.cpu_count() or 2
        out["leases_at_ttl_10"] = {
            "leases": args.instances,
            "refreshes_per_s": need,
            "keeper_us_per_refresh": keeper_us,
            "etcd_us_per_refresh": etcd_us,
            "cores": round(need * (keeper_us + etcd_us) / 1e6, 2),
            "etcd_cores": round(need * etcd_us / 1e6, 2),
            # The smallest TTL at which keepers + etcd alone would fill every core here.
            "ttl_filling_this_machine_s": round(
                args.instances * 3 * (keeper_us + etcd_us) / 1e6 / cores, 1
            ),
            "from": [f"{p['kind']} TTL {p['ttl_s']}" for p in costed],
            "how": "refreshes/s LeaseKeeper needs (leases x 3 / TTL) x the median CPU per "
            "refresh (the keepers' and etcd's, measured at each point that held)",
        }
    # Watchers: the last watcher's latency and the CPU at --target-watchers, from the
    # measured counts below it (so a measured target can be checked against the fit).
    phases = [p for p in result.get("watch", []) if p["last_p99_s"] is not None]
    target = args.target_watchers
    if phases:
        below = [p for p in phases if p["watchers"] < target]
        basis = below if len(below) >= 2 else phases
        fit = fit_line([(p["watchers"], p["last_p99_s"]) for p in basis])
        fit50 = fit_line([(p["watchers"], p["last_p50_s"]) for p in basis])
        per = [p for p in basis if p["watcher_us_per_delivery"]]
        rate = result["churn"]["changes_per_s"]
        row: dict[str, Any] = {
            "watchers": target,
            "measured": any(p["watchers"] == target for p in phases),
            "from_watchers": [p["watchers"] for p in basis],
        }
        if fit is not None:
            row["last_p99_s_fit"] = max(0.0, fit[0] + fit[1] * target)
            row["last_p99_fit"] = {"intercept_s": fit[0], "s_per_watcher": fit[1]}
        if fit50 is not None:
            row["last_p50_s_fit"] = max(0.0, fit50[0] + fit50[1] * target)
        if per:
            w_us = statistics.median(p["watcher_us_per_delivery"] for p in per)
            # etcd's cost per delivery: the slope of its CPU over the deliveries/s of the
            # phases (its lease keeping is the same in each), else over its lease-only hold.
            slope = fit_line([(p["deliveries_per_s"], p["etcd_cpu_pct"] * 1e4) for p in phases])
            e_us = (
                max(0.0, slope[1])
                if slope is not None
                else statistics.median(p["etcd_extra_us_per_delivery"] or 0.0 for p in per)
            )
            row["deliveries_per_s"] = round(rate * target, 1)
            row["watcher_us_per_delivery"] = w_us
            row["etcd_us_per_delivery"] = e_us
            row["watcher_cores"] = round(rate * target * w_us / 1e6, 2)
            row["etcd_cores"] = round(rate * target * e_us / 1e6, 2)
        row["how"] = (
            "least squares line of the last watcher's p99 (and p50) over the counts measured "
            "below the target; CPU = changes/s x watchers x the median CPU per delivery"
        )
        out["watchers"] = row
    return out


def targets(result: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    phases = [p for p in result.get("watch", []) if p["last_p99_s"] is not None]
    largest = max(phases, key=lambda p: p["watchers"]) if phases else None
    if largest is not None:
        p99 = largest["last_p99_s"]
        ok = p99 <= TARGET_WATCH_P99_S and largest["missed"] == 0
        how = f"measured at {largest['watchers']} watchers"
        extra = result.get("extrapolated", {}).get("watchers", {})
        if largest["watchers"] < args.target_watchers and "last_p99_s_fit" in extra:
            p99 = extra["last_p99_s_fit"]
            ok = ok and p99 <= TARGET_WATCH_P99_S
            how = f"extrapolated to {args.target_watchers} from {extra['from_watchers']}"
        elif "last_p99_s_fit" in extra:
            how += f"; the fit from {extra['from_watchers']} says {ms(extra['last_p99_s_fit'])}"
        rows.append(
            {
                "target": "change seen by every watcher",
                "goal": "p99 <= 100 ms",
                "value": ms(p99),
                "met": ok,
                "how": how,
            }
        )
    else:
        rows.append(
            {
                "target": "change seen by every watcher",
                "goal": "p99 <= 100 ms",
                "value": "-",
                "met": None,
                "how": "not measured",
            }
        )
    sidecar = result.get("sidecar")
    if sidecar:
        cold = sidecar["resync_s"][0]
        mid = statistics.median(sidecar["resync_s"])
        worst = max(sidecar["resync_s"])
        rows.append(
            {
                "target": f"full resync ({sidecar['instances']} records)",
                "goal": "<= 1 s",
                "value": f"{cold * 1000:.0f} first, {mid * 1000:.0f} median, {worst * 1000:.0f} max ms",
                "met": worst <= TARGET_RESYNC_S,
                "how": "TopologyWatch to ready, fresh process",
            }
        )
    ring = result["ring"]
    rows.append(
        {
            "target": f"ring rebuild ({ring['instances']} instances)",
            "goal": "<= 200 ms",
            "value": f"{ring['rebuild_p50_s'] * 1000:.0f} ms p50, {ring['rebuild_max_s'] * 1000:.0f} ms max",
            "met": ring["rebuild_max_s"] <= TARGET_RING_S,
            "how": "RoutingTable.build after one change; off the data plane's threads",
        }
    )
    for scaled_on in fw.SCALED_ON:
        sims = [s for s in result["load_simulation"] if s["scaled_on"] == scaled_on]
        worst = max(sims, key=lambda s: s["writes_per_s"])
        rows.append(
            {
                "target": f"load/ writes ({args.instances}, on {scaled_on})",
                "goal": "< 1,000/s",
                "value": f"{worst['writes_per_s']:,.0f}/s ({worst['model']})",
                "met": all(s["writes_per_s"] < TARGET_LOAD_WRITES_S for s in sims),
                "how": "worth_writing over simulated readings, both models",
            }
        )
    return rows


def render(result: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    cfg = result["config"]
    add(
        f"fleet: {cfg['instances']:,} instances in {cfg['services']} services, 3-member etcd on loopback, "
        f"{result['machine']['nproc']} cores ({result['machine']['cpu_model']}), {result['machine']['etcd']}"
    )
    reg = result.get("registration")
    if reg:
        add(
            f"registration: {reg['registered']:,} under {reg['registered']:,} leases (TTL {result['ttl_s']} s) in "
            f"{reg['seconds']} s = {reg['per_s']:,.0f}/s (grant + put each; p99 {ms(reg['latency_p99_s'])}); "
            f"etcd {reg['etcd']['puts_per_s']:,.0f} puts/s, {reg['etcd']['proposals_per_s']:,.0f} proposals/s; {reg['keys_in_etcd']:,} keys"
        )
    add("")
    add("leases kept by LeaseKeeper (a keep-alive every TTL/3)")
    add(
        f"{'what':<22}{'TTL':>5}{'leases':>8}{'need/s':>8}{'got/s':>8}{'lost':>6}{'fail':>6}{'gap p99':>9}{'gap max':>9}{'held':>8}{'keeper%':>9}{'etcd%':>7}{'host%':>7}{'other%':>7}{'µs/refresh k+e':>16}"
    )
    for p in [
        *result.get("lease_probes", []),
        *([result["lease_hold"]] if "lease_hold" in result else []),
    ]:
        per = f"{p['keeper_us_per_refresh'] or 0:.0f}+{p['etcd_us_per_refresh'] or 0:.0f}"
        per = per if p["held"] else "- (lost)"  # a storm of re-grants, not keep-alives
        add(
            f"{p['kind']:<22}{p['ttl_s']:>5}{p['leases']:>8}{p['needed_per_s']:>8.0f}{p['refreshes_per_s']:>8.0f}"
            f"{p['lost']:>6}{p['refresh_failures']:>6}{p['gap_p99_s']:>8.1f}s{p['gap_max_s']:>8.1f}s{('yes' if p['healthy'] else 'barely') if p['held'] else 'NO':>8}"
            f"{p['keeper_cpu_pct']:>9.0f}{p['etcd_cpu_pct']:>7.0f}{p['host_cpu_pct']:>7.0f}{p['other_cpu_pct']:>7.0f}{per:>16}"
        )
    ex = result.get("extrapolated", {})
    if "leases_at_ttl_10" in ex:
        e = ex["leases_at_ttl_10"]
        add(
            f"  extrapolated to TTL 10 s: {e['refreshes_per_s']:,.0f} refreshes/s x ({e['keeper_us_per_refresh']:.0f} keeper + "
            f"{e['etcd_us_per_refresh']:.0f} etcd) µs = {e['cores']:.2f} cores ({e['etcd_cores']:.2f} of them etcd's); "
            f"keepers + etcd alone fill this machine's cores at TTL {e['ttl_filling_this_machine_s']:g} s"
        )
    if "lease_during_watch" in result:
        w = result["lease_during_watch"]
        add(
            f"  during the watch phases: {w['lost']} leases lost, {w['no_lease_now']} keepers without a lease at the end, "
            f"largest refresh gap {w['gap_max_s']:.1f} s, {w['refresh_failures']} failed refreshes"
        )
    add("")
    churn = result.get("churn")
    if churn:
        add(
            f"watch fan-out: churn {churn['fraction_per_min']:.1%} of the fleet a minute = {churn['replacements_per_min']:g} replacements "
            f"(revoke + register) = {churn['changes_per_s']} changes/s; time from the put/revoke completing"
        )
        add(
            f"{'watchers':>9}{'conns':>6}{'changes':>8}{'missed':>7}{'first p50':>10}{'first p99':>10}{'last p50':>10}{'last p99':>10}{'last max':>10}{'spread p99':>11}"
            f"{'deliv/s':>9}{'watch%':>7}{'etcd%':>7}{'host%':>7}{'other%':>7}{'µs/deliv':>9}"
        )
        for p in result.get("watch", []):
            per = f"{p['watcher_us_per_delivery'] or 0:.0f}"
            add(
                f"{p['watchers']:>9}{p['connections']:>6}{p['changes']:>8}{p['missed']:>7}{ms(p['first_p50_s']):>10}{ms(p['first_p99_s']):>10}"
                f"{ms(p['last_p50_s']):>10}{ms(p['last_p99_s']):>10}{ms(p['last_max_s']):>10}{ms(p['in_process_spread_p99_s']):>11}{p['deliveries_per_s']:>9.0f}"
                f"{p['watchers_cpu_pct']:>7.0f}{p['etcd_cpu_pct']:>7.0f}{p['host_cpu_pct']:>7.0f}{p['other_cpu_pct']:>7.0f}{per:>9}"
            )
        if "watchers" in ex:
            e = ex["watchers"]
            add(
                f"  extrapolated to {e['watchers']} watchers from {e['from_watchers']} (least squares): last p50 "
                f"{ms(e.get('last_p50_s_fit'))}, p99 {ms(e.get('last_p99_s_fit'))}; {e.get('deliveries_per_s', 0):,.0f} "
                f"deliveries/s x ({e.get('watcher_us_per_delivery', 0):.0f} + {e.get('etcd_us_per_delivery', 0):.0f}) µs = "
                f"{e.get('watcher_cores', 0):.2f} cores of watchers + {e.get('etcd_cores', 0):.2f} of etcd"
                + (" (also measured above)" if e["measured"] else "")
            )
            add(
                "  (first/last: the first and the last watcher to see a change; spread: the last after the "
                "first within one process, whose watches decode one after the other on one event loop; "
                "µs/deliv: the watcher processes' CPU per event delivered; etcd µs per delivery: the slope "
                "of etcd's CPU over the phases' deliveries/s, 0 when it did not grow; host%: the machine's "
                "busy time in % of a core, other%: the part not spent by this benchmark's processes)"
            )
        add("")
    sc = result.get("sidecar")
    if sc:
        rss = sc["rss_bytes"]
        steps = sc["resync_steps_s"]
        add(
            f"fresh sidecar, {sc['instances']:,} instances ({sc['listing_bytes'] / 1e6:.1f} MB listed): resync (TopologyWatch to ready) "
            f"{', '.join(f'{t * 1000:.0f}' for t in sc['resync_s'])} ms = list {steps['list'] * 1000:.0f} + parse {steps['parse'] * 1000:.0f} "
            f"+ Topology {steps['topology'] * 1000:.0f} ms"
        )
        add(
            f"  RoutingTable.build (every ring) {sc['routing_build_s'] * 1000:.0f} ms, "
            f"install in the data plane {sc['install_s'] * 1000:.0f} ms"
        )
        add(
            f"  RSS +{(rss['topology'] - rss['connected']) / 1e6:.1f} MB topology, +{(rss['routing'] - rss['topology']) / 1e6:.1f} MB routing table "
            f"and rings, +{(rss['installed'] - rss['routing']) / 1e6:.1f} MB in the data plane = "
            f"+{(rss['installed'] - rss['connected']) / 1e6:.1f} MB (from {rss['connected'] / 1e6:.0f} MB)"
        )
        ev = sc["per_event_s"]
        if ev["topology"]:
            med = {k: statistics.median(v) * 1000 for k, v in ev.items()}
            add(
                f"  one change at this size, on the sidecar's event loop: Topology.build {med['topology']:.0f} + RoutingTable.build "
                f"{med['routing']:.0f} + install {med['install']:.0f} = {sum(med.values()):.0f} ms (median)"
            )
    ring = result["ring"]
    add(
        f"ring rebuild, one {ring['instances']}-instance service ({ring['points']:,} points) after one change: RoutingTable.build "
        f"{ring['rebuild_p50_s'] * 1000:.0f} ms p50, {ring['rebuild_max_s'] * 1000:.0f} ms max; install {ring['install_p50_s'] * 1000:.1f} ms. "
        "Built on the control plane's loop; the data plane serves on the old snapshot until install swaps it whole"
    )
    add("")
    steady = result.get("etcd_steady")
    if steady:
        add(
            f"etcd steady (leases only): {steady['puts_per_s']} puts/s, {steady['lease_renewals_per_s']:,.0f} lease renewals/s, etcd CPU {steady['cpu_pct']['etcd']:.0f}%"
        )
    for p in result.get("watch", []):
        d = p["etcd"]
        add(
            f"etcd with {p['watchers']} watchers + churn: {d['puts_per_s']} puts/s, {d['deletes_per_s']} deletes/s, "
            f"{d['sent_mb_per_s']} MB/s sent to clients; {p['instance_keys_after']:,} instance keys after, "
            f"{p['leases_lost_so_far']} leases lost so far, {p['rewatches']} watches re-made"
        )
    final = result.get("final")
    if final:
        sizes = ", ".join(
            f"{name} {m.get('db_size_bytes', 0) / 1e6:.1f} MB ({m.get('db_in_use_bytes', 0) / 1e6:.1f} in use)"
            for name, m in final["members"].items()
        )
        add(
            f"etcd database at the end: {sizes}; {final['instance_keys']:,} instance keys at revision {final['revision']:,}, {final['leases_lost_total']} leases lost"
        )
    add("")
    add("load/ writes (worth_writing over simulated steady 1 s readings of every instance)")
    for s in result["load_simulation"]:
        label = f"{s['model']}, every service scaling on {s['scaled_on']}"
        causes = ", ".join(f"{k} {v}" for k, v in list(s["causes"].items())[:4])
        add(
            f"  {label:<45} {s['writes_per_s']:>8,.0f}/s = {s['per_1000_instances_s']:>6.1f} per 1,000 instances/s  ({causes})"
        )
    live = result.get("load_live")
    if live:
        add(
            f"  live ({live['model']}, {live['scaled_on']}, {live['seconds']} s): {live['wanted_per_s']:,.0f} writes/s wanted, {live['written_per_s']:,.0f}/s done, etcd saw {live['etcd_puts_per_s']:,.0f} puts/s, "
            f"{live['failed']} failed, put p99 {ms(live['put_latency_p99_s'])}, etcd CPU {live['etcd']['cpu_pct']['etcd']:.0f}%"
        )
    add("")
    add("targets")
    for t in result["targets"]:
        add(
            f"  {t['target']:<38} {t['goal']:<16} {t['value']:<30} {verdict(t['met']):<8} ({t['how']})"
        )
    for n in result["notices"]:
        add(f"NOTE: {n}")
    add(f"run time {result['run_s']:.0f} s")
    return "\n".join(lines)


def counts(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("counts must be positive")
    return values


def ttl_arg(text: str) -> int | None:
    if text == "auto":
        return None
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("a lease TTL is at least 2 s")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument(
        "--watchers",
        type=counts,
        default=[100, 250, 500, 1000],
        help="watch counts, one phase each",
    )
    parser.add_argument(
        "--target-watchers", type=int, default=1000, help="the count to extrapolate to"
    )
    parser.add_argument("--watcher-procs", type=int, default=2)
    parser.add_argument(
        "--connections", type=int, default=4, help="etcd clients per watcher process"
    )
    parser.add_argument("--phase-seconds", type=float, default=45.0, help="churn per watcher phase")
    parser.add_argument(
        "--churn", type=float, default=0.01, help="fraction of the fleet replaced a minute"
    )
    parser.add_argument(
        "--drain", type=float, default=3.0, help="s after the last change before counting"
    )
    parser.add_argument(
        "--ttl",
        type=ttl_arg,
        default=60,
        help="the fleet's lease TTL; auto: the smallest probed TTL that held with room",
    )
    parser.add_argument(
        "--fallback-ttl", type=int, default=30, help="with --ttl auto when no probe held"
    )
    parser.add_argument(
        "--probe-ttls",
        type=counts,
        default=[10, 20, 30],
        help="TTLs of the bare-lease probe ('' for none)",
    )
    parser.add_argument("--probe-hold", type=float, default=20.0, help="s, at least the TTL")
    parser.add_argument(
        "--hold", type=float, default=20.0, help="s of fleet leases alone (their cost)"
    )
    parser.add_argument("--registrars", type=int, default=2)
    parser.add_argument("--register-concurrency", type=int, default=64, help="per registrar")
    parser.add_argument(
        "--register-limit", type=float, default=180.0, help="s to register the fleet"
    )
    parser.add_argument("--resyncs", type=int, default=3)
    parser.add_argument(
        "--events", type=int, default=5, help="changes applied in the fresh sidecar"
    )
    parser.add_argument("--ring-instances", type=int, default=1000)
    parser.add_argument("--ring-repeats", type=int, default=7)
    parser.add_argument("--load-sim-seconds", type=int, default=60)
    parser.add_argument("--load-sim-instances", type=int, default=2000, help="the simulated sample")
    parser.add_argument(
        "--load-seconds", type=float, default=30.0, help="live load/ writes (0: none)"
    )
    parser.add_argument(
        "--max-run", type=float, default=900.0, help="s: later phases are skipped past it"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.services < 1 or args.instances < args.services * 2:
        parser.error("need at least 2 instances per service")
    budget = Budget(args.max_run)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result: dict[str, Any] = {"config": config, "machine": machine()}
    result.update(run(args, budget))
    result["run_s"] = round(budget.elapsed(), 1)
    result["extrapolated"] = extrapolate(result, args)
    result["targets"] = targets(result, args)
    print(render(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
