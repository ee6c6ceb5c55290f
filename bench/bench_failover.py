"""What a dead instance costs callers: failover latency and time to stop choosing it.

Starts an embedded etcd, 3 demo apps + sidecars for ``echo`` and a ``client``,
drives keyed idempotent unary calls through the client sidecar (4 callers,
5 ms server delay), and SIGKILLs the echo instance owning most keys: once its
app alone (the inbound sidecar answers ``ringmesh-not-processed``), once app
and sidecar together (connect refused). For each:

* baseline p50/p99 of first-attempt calls before the kill;
* p50/p99 of calls that failed over (``ringmesh-attempts`` > 1): the extra
  latency of a failed-over call;
* how long after the kill the last call still tried the dead instance first;
* failed calls (should be 0).

Prints a table and writes ``bench/results/bench_failover.json``.
Run: ``python -m bench.bench_failover [--before 3] [--after 4]`` (or ``./dev bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from registry.embedded import EmbeddedEtcd
from registry.etcd import EtcdClient, EtcdConfig
from registry.keys import KeyLayout
from registry.topology import read_topology
from ringmesh.localmesh import LocalMesh
from sidecar.routing import RoutingTable
from tests.load import Load, Result

PREFIX = "/ringmesh-bench/v1"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_failover.json"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def owner_of_most_keys(etcd_url: str, keys: int) -> str:
    async def read() -> RoutingTable:
        async with EtcdClient(EtcdConfig.from_urls(etcd_url)) as client:
            return RoutingTable.build(await read_topology(client, KeyLayout(PREFIX)))

    table = asyncio.run(read())
    owned: dict[str, int] = {}
    for i in range(keys):
        owner = table.route("echo", f"key-{i}")[0].id
        owned[owner] = owned.get(owner, 0) + 1
    return max(owned, key=lambda name: owned[name])


def scenario(kind: str, before: float, after: float, logs: Path) -> dict[str, Any]:
    with EmbeddedEtcd() as etcd, LocalMesh(etcd.url, prefix=PREFIX, logs=logs) as mesh:
        for i in range(3):
            mesh.add("echo", f"echo-{i + 1}")
        client = mesh.add("client", "client-1")
        victim = mesh.instances[owner_of_most_keys(etcd.url, 200)]
        load = Load(client.outbound, callers=4, idempotent=True, delay_ms=5, keys=200)
        with load:
            time.sleep(before)
            victim.app.kill()
            if kind == "app-and-sidecar":
                victim.sidecar.kill()
            killed = time.monotonic()
            time.sleep(after)
        results: list[Result] = load.results
    ms = 1000.0
    baseline = [
        (r.ended - r.started) * ms for r in results if r.ok and r.attempts == 1 and r.ended < killed
    ]
    failed_over = [r for r in results if r.ok and r.attempts > 1 and r.started >= killed - 0.1]
    over_ms = [(r.ended - r.started) * ms for r in failed_over]
    last_first_try = max((r.started for r in failed_over), default=killed) - killed
    return {
        "kind": kind,
        "victim": victim.name,
        "calls": len(results),
        "failed": sum(1 for r in results if not r.ok),
        "baseline_p50_ms": percentile(baseline, 50),
        "baseline_p99_ms": percentile(baseline, 99),
        "failed_over_calls": len(failed_over),
        "failover_p50_ms": percentile(over_ms, 50),
        "failover_p99_ms": percentile(over_ms, 99),
        "extra_p50_ms": percentile(over_ms, 50) - percentile(baseline, 50),
        "extra_p99_ms": percentile(over_ms, 99) - percentile(baseline, 99),
        "dead_chosen_first_for_ms": last_first_try * ms,
    }


def render(rows: list[dict[str, Any]]) -> str:
    head = f"{'killed':<16}{'calls':>7}{'failed':>7}{'base p50':>9}{'base p99':>9}{'fo calls':>9}{'fo p50':>8}{'fo p99':>8}{'+p50':>7}{'+p99':>7}{'dead 1st for':>13}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['kind']:<16}{r['calls']:>7}{r['failed']:>7}{r['baseline_p50_ms']:>9.2f}{r['baseline_p99_ms']:>9.2f}"
            f"{r['failed_over_calls']:>9}{r['failover_p50_ms']:>8.2f}{r['failover_p99_ms']:>8.2f}"
            f"{r['extra_p50_ms']:>7.2f}{r['extra_p99_ms']:>7.2f}{r['dead_chosen_first_for_ms']:>10.0f} ms"
        )
    lines.append(
        "(ms; fo = calls that failed over; 'dead 1st for' = time after the kill during which calls still tried the dead instance first)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=float, default=3.0, help="seconds of load before the kill")
    parser.add_argument("--after", type=float, default=4.0, help="seconds of load after the kill")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ringmesh-bench-") as tmp:
        for kind in ("app", "app-and-sidecar"):
            logs = Path(tmp) / kind
            logs.mkdir()
            rows.append(scenario(kind, args.before, args.after, logs))
    print(render(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"scenarios": rows, "before_s": args.before, "after_s": args.after}, indent=2)
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
