"""How many ``load/`` writes a steady mesh makes, per instance and per 1,000 instances.

Starts an embedded etcd, ``--instances`` demo apps + sidecars for ``echo``
(report interval 1 s) and a ``client``, drives a steady keyed load through the
client sidecar, and for each metric of ``--scaled-on`` in turn puts a policy for
``echo`` scaling on it and counts every ``load/echo/*`` write etcd sees (a watch
on the prefix) for ``--duration`` seconds. A sidecar writes a reading early only
when the field its policy scales on moved past ``sidecar.load.RewriteThresholds``,
else once its last write is ``max_interval_s`` old, so the steady rate should be
close to 1/max_interval_s per instance: the policy reaches the sidecars through
their own watch, which this also shows working.

Prints a table and writes ``bench/results/bench_load_records.json``.
Run: ``python -m bench.bench_load_records [--instances 4] [--duration 90] [--scaled-on rps]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from registry.embedded import EmbeddedEtcd
from registry.errors import EtcdUnavailable
from registry.etcd import EtcdClient, EtcdConfig
from registry.keys import KeyLayout
from registry.scaling import METRICS, LoadReport, Policy
from ringmesh.localmesh import LocalMesh
from sidecar.load import DEFAULT_THRESHOLDS, changed_fields
from tests.load import Load

PREFIX = "/ringmesh-bench/v1"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_load_records.json"


class WriteLog:
    """Every load/ write under PREFIX, seen through a watch in a thread of its own."""

    def __init__(self, etcd_url: str) -> None:
        self._url = etcd_url
        self.writes: list[tuple[float, str, LoadReport]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._watch()), daemon=True)
        self._started = threading.Event()

    def __enter__(self) -> WriteLog:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    async def _watch(self) -> None:
        prefix = KeyLayout(PREFIX).loads
        async with EtcdClient(EtcdConfig.from_urls(self._url)) as client:
            _, revision = await client.get_prefix(prefix)
            task = asyncio.create_task(self._follow(client, prefix, revision + 1))
            self._started.set()
            stopped = asyncio.create_task(asyncio.to_thread(self._stop.wait))
            await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
            task.cancel()

    async def _follow(self, client: EtcdClient, prefix: str, revision: int) -> None:
        with contextlib.suppress(EtcdUnavailable):
            async for event in client.watch_prefix(prefix, start_revision=revision):
                if event.value is not None:
                    report = LoadReport.from_json(event.value)
                    self.writes.append((time.monotonic(), event.key, report))


def set_policy(etcd_url: str, metric: str) -> None:
    """A policy for ``echo`` scaling on ``metric`` (no scaler runs: only the sidecars read it)."""
    policy = Policy(min_replicas=1, max_replicas=10, metric=metric, target=100.0)

    async def put() -> None:
        async with EtcdClient(EtcdConfig.from_urls(etcd_url)) as client:
            await client.put(KeyLayout(PREFIX).policy("echo"), policy.to_json(), lease=None)

    asyncio.run(put())


def measure(
    instances: int, metrics: Sequence[str], duration: float, warmup: float, logs: Path
) -> list[dict[str, Any]]:
    rows = []
    with EmbeddedEtcd() as etcd, LocalMesh(etcd.url, prefix=PREFIX, logs=logs) as mesh:
        for i in range(instances):
            mesh.add("echo", f"echo-{i + 1}")
        client = mesh.add("client", "client-1")
        total = len(metrics) * (duration + warmup) + 60
        with Load(client.outbound, callers=8, delay_ms=5, keys=400, max_seconds=total):
            for metric in metrics:
                set_policy(etcd.url, metric)
                time.sleep(warmup)  # the policy watched, the load's ramp, first records
                with WriteLog(etcd.url) as log:
                    started = time.monotonic()
                    time.sleep(duration)
                    ended = time.monotonic()
                writes = [w for w in log.writes if started <= w[0] < ended]
                rows.append(_row(metric, instances, writes, ended - started))
    return rows


def _row(
    metric: str, instances: int, writes: list[tuple[float, str, LoadReport]], seconds: float
) -> dict[str, Any]:
    per_key: dict[str, list[LoadReport]] = {}
    for _, key, report in writes:
        per_key.setdefault(key, []).append(report)
    gaps = [b.ts - a.ts for reports in per_key.values() for a, b in itertools.pairwise(reports)]
    per_instance_s = len(writes) / instances / seconds
    why: dict[str, int] = {}
    for reports in per_key.values():
        for a, b in itertools.pairwise(reports):
            moved = changed_fields(a, b, among=(metric,)) or ("max_interval",)
            for name in moved:
                why[name] = why.get(name, 0) + 1
    return {
        "scaled_on": metric,
        "instances": instances,
        "duration_s": round(seconds, 2),
        "writes": len(writes),
        "writes_per_instance_s": round(per_instance_s, 4),
        "writes_per_1000_instances_s": round(per_instance_s * 1000, 1),
        "every_reading_per_1000_instances_s": 1000.0,  # the old rate: one per report interval
        "mean_gap_s": round(sum(gaps) / len(gaps), 2) if gaps else None,
        "max_gap_s": round(max(gaps), 2) if gaps else None,
        "rps_per_instance": round(sum(r.rps for _, _, r in writes) / max(1, len(writes)), 1),
        "writes_by_cause": why,
        "max_interval_s": DEFAULT_THRESHOLDS.max_interval_s,
    }


def render(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{'scaled on':>10}{'instances':>10}{'seconds':>9}{'writes':>8}{'/inst/s':>9}"
        f"{'/1000 inst/s':>14}{'mean gap':>10}{'max gap':>9}{'rps/inst':>10}  causes"
    ]
    for row in rows:
        lines.append(
            f"{row['scaled_on']:>10}{row['instances']:>10}{row['duration_s']:>9}{row['writes']:>8}"
            f"{row['writes_per_instance_s']:>9.3f}{row['writes_per_1000_instances_s']:>14.1f}"
            f"{row['mean_gap_s'] or 0:>9.1f}s{row['max_gap_s'] or 0:>8.1f}s"
            f"{row['rps_per_instance']:>10}  {row['writes_by_cause']}"
        )
    lines.append(
        "(steady keyed load; a record is rewritten when the field its policy scales on moves "
        f"past its threshold or every {rows[0]['max_interval_s']:g} s; writing every 1 s "
        "reading would be 1,000 per 1,000 instances per second)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument(
        "--duration", type=float, default=90.0, help="seconds counted per metric (3 max intervals)"
    )
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before each count")
    parser.add_argument(
        "--scaled-on",
        default=",".join(METRICS),
        help="the policy metrics to measure, in turn (comma-separated)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.scaled_on.split(",") if m.strip()]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        parser.error(f"--scaled-on: {unknown or 'nothing'}; the metrics are {', '.join(METRICS)}")
    with tempfile.TemporaryDirectory(prefix="ringmesh-bench-") as tmp:
        rows = measure(args.instances, metrics, args.duration, args.warmup, Path(tmp))
    print(render(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
