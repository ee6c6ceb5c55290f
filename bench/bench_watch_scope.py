"""What a sidecar pays for the mesh it watches: the whole ``instances/`` prefix vs ``--watch``.

Registers ``--instances`` records in ``--services`` services (one lease for
all; the addresses are never dialled) in an embedded etcd, then runs a
sidecar-like probe process per mode (``TopologyWatch`` -> ``RoutingTable.build``
-> ``NativePlane.install``, as ``sidecar/runtime.py`` does) and measures:

* the resync: from the watch's start to the first routing table installed;
* the probe's RSS after it (what the topology and the rings cost);
* the probe's CPU while ``--changes`` instances of other services churn
  (one put each), and how many routing tables it rebuilt for them;
* the delay from a change in a watched service to its install.

Modes, each in a fresh process: ``all`` (no ``--watch``: the whole mesh) and
``scoped`` (``--watch`` of ``--watched`` services). Prints a table and writes
``bench/results/bench_watch_scope.json``.
Run: ``python -m bench.bench_watch_scope [--instances 10000] [--services 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.fleet_workers import LAYOUT, PREFIX, instance_record, rss_bytes
from registry.embedded import EmbeddedEtcd
from registry.etcd import EtcdClient, EtcdConfig

RESULTS = Path(__file__).resolve().parent / "results" / "bench_watch_scope.json"
SENTINEL = "sentinel"


def service_name(i: int) -> str:
    return f"svc-{i:03d}"


async def register(url: str, instances: int, services: int) -> None:
    async with EtcdClient(EtcdConfig.from_urls(url)) as client:
        lease = await client.grant_lease(3600)
        limit = asyncio.Semaphore(64)

        async def put(n: int) -> None:
            service = service_name(n % services)
            record = instance_record(service, f"{service}-{n:05d}", n)
            async with limit:
                await client.put(LAYOUT.instance(service, record.id), record.to_json(), lease=lease)

        await asyncio.gather(*(put(n) for n in range(instances)))


async def churn(url: str, services: int, watched: int, changes: int) -> None:
    """Re-put instances of services nobody scoped watches (the mode's background noise)."""
    async with EtcdClient(EtcdConfig.from_urls(url)) as client:
        lease = await client.grant_lease(3600)
        for i in range(changes):
            service = service_name(watched + i % (services - watched))
            record = instance_record(service, f"{service}-churn-{i % 50}", 100_000 + i)
            await client.put(LAYOUT.instance(service, record.id), record.to_json(), lease=lease)


async def put_sentinel(url: str, n: int) -> float:
    async with EtcdClient(EtcdConfig.from_urls(url)) as client:
        lease = await client.grant_lease(3600)
        record = instance_record(service_name(0), f"{SENTINEL}-{n}", 200_000 + n)
        sent = time.time()
        await client.put(LAYOUT.instance(record.service, record.id), record.to_json(), lease=lease)
        return sent


# -- the probe (a child process per mode) --------------------------------------------------


async def probe(url: str, watch: list[str]) -> None:
    """A sidecar's control plane, minus registration: prints JSON lines, reads commands."""
    from registry.topology import Topology, TopologyWatch
    from sidecar.config import SidecarConfig
    from sidecar.plane import NativePlane
    from sidecar.routing import RoutingTable

    def say(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    plane = NativePlane(SidecarConfig(service="probe", watch=tuple(watch)), tracing=False)
    table: RoutingTable | None = None
    builds = 0
    seen: dict[str, float] = {}
    sentinel_seen = asyncio.Event()

    def on_change(topology: Topology) -> None:
        nonlocal table, builds
        table = RoutingTable.build(topology, previous=table, watching=watch)
        plane.install(table)
        builds += 1
        for record in topology.instances(service_name(0)):
            if record.id.startswith(SENTINEL) and record.id not in seen:
                seen[record.id] = time.time()
                sentinel_seen.set()

    async with EtcdClient(EtcdConfig.from_urls(url)) as client:
        await client.get(f"{PREFIX}/nothing")  # connected: what follows is the resync
        rss0 = rss_bytes()
        watcher = TopologyWatch(client, LAYOUT, on_change=on_change, services=watch)
        t0 = time.perf_counter()
        task = asyncio.create_task(watcher.run())
        await watcher.ready.wait()
        resync = time.perf_counter() - t0
        instances = sum(len(ids) for ids in watcher.topology.services.values())
        say(event="ready", resync_s=resync, rss_mb=(rss_bytes() - rss0) / 1e6, instances=instances)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = line.split()
            if command[0] == "mark":
                cpu0, builds0 = time.process_time(), builds
            elif command[0] == "report":
                sentinel = f"{SENTINEL}-{command[1]}"
                while sentinel not in seen:
                    sentinel_seen.clear()
                    await sentinel_seen.wait()
                say(
                    event="report",
                    cpu_s=time.process_time() - cpu0,
                    builds=builds - builds0,
                    sentinel_seen_at=seen[sentinel],
                )
        task.cancel()


# -- the run --------------------------------------------------------------------------------


def run_mode(url: str, mode: str, watch: list[str], args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.bench_watch_scope", "--probe", url]
    argv += [f"--watch={name}" for name in watch]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        ready = json.loads(child.stdout.readline())
        child.stdin.write("mark\n")
        child.stdin.flush()
        t0 = time.perf_counter()
        asyncio.run(churn(url, args.services, args.watched, args.changes))
        sent = asyncio.run(put_sentinel(url, args.round))
        churn_s = time.perf_counter() - t0
        child.stdin.write(f"report {args.round}\n")
        child.stdin.flush()
        report = json.loads(child.stdout.readline())
        args.round += 1
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    return {
        "mode": mode,
        "watch": watch,
        "instances_held": ready["instances"],
        "resync_s": ready["resync_s"],
        "rss_mb": ready["rss_mb"],
        "churn_s": churn_s,
        "cpu_s": report["cpu_s"],
        "cpu_per_change_ms": report["cpu_s"] / (args.changes + 1) * 1000,
        "builds": report["builds"],
        "watched_change_delay_ms": (report["sentinel_seen_at"] - sent) * 1000,
    }


def render(result: dict[str, Any]) -> str:
    rows = [("mode", "held", "resync", "RSS", "CPU/change", "rebuilds", "watched change seen")]
    for m in result["modes"]:
        rows.append((
            f"{m['mode']} ({', '.join(m['watch']) or 'whole prefix'})", f"{m['instances_held']:,}",
            f"{m['resync_s'] * 1000:.0f} ms", f"{m['rss_mb']:.1f} MB",
            f"{m['cpu_per_change_ms']:.2f} ms", str(m["builds"]),
            f"{m['watched_change_delay_ms']:.1f} ms",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    config = result["config"]
    lines.insert(
        0,
        f"{config['instances']:,} instances in {config['services']} services; "
        f"{config['changes']} changes to unwatched services per mode",
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--watched", type=int, default=2, help="services a scoped probe watches")
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--watch", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        asyncio.run(probe(args.probe, args.watch))
        return 0
    if not 0 < args.watched < args.services:
        parser.error("--watched must be between 1 and --services - 1")
    args.round = 0
    with EmbeddedEtcd() as etcd:
        t0 = time.perf_counter()
        asyncio.run(register(etcd.url, args.instances, args.services))
        registered_s = time.perf_counter() - t0
        scoped = [service_name(i) for i in range(args.watched)]
        modes = [
            run_mode(etcd.url, "all", [], args),
            run_mode(etcd.url, "scoped", scoped, args),
        ]
    config = {k: v for k, v in vars(args).items() if k not in ("probe", "watch", "round")}
    result = {
        "config": {**config, "output": str(args.output)},
        "registered_s": registered_s,
        "modes": modes,
    }
    print(render(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
