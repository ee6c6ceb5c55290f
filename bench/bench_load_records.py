"""How many ``load/`` writes a steady mesh makes, per instance and per 1,000 instances.

Starts an embedded etcd, ``--instances`` demo apps + sidecars for ``echo``
(report interval 1 s) and a ``client``, drives a steady keyed load through the
client sidecar for ``--duration`` seconds, and counts every ``load/echo/*``
write etcd sees (a watch on the prefix). A sidecar writes a reading only when
it moved past ``sidecar.load.RewriteThresholds`` or its last write is
``max_interval_s`` old, so the steady rate should be close to
1/max_interval_s per instance.

Also printed: how far the written values drift from the readings between writes
(the error the scaler sees), as the largest relative change a write carried.

Prints a table and writes ``bench/results/bench_load_records.json``.
Run: ``python -m bench.bench_load_records [--instances 4] [--duration 40]``.
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
from registry.scaling import LoadReport
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


def measure(instances: int, duration: float, warmup: float, logs: Path) -> dict[str, Any]:
    with EmbeddedEtcd() as etcd, LocalMesh(etcd.url, prefix=PREFIX, logs=logs) as mesh:
        for i in range(instances):
            mesh.add("echo", f"echo-{i + 1}")
        client = mesh.add("client", "client-1")
        with Load(client.outbound, callers=8, delay_ms=5, keys=400, max_seconds=duration + 60):
            time.sleep(warmup)  # the first record of each instance, and the load's ramp
            with WriteLog(etcd.url) as log:
                started = time.monotonic()
                time.sleep(duration)
                ended = time.monotonic()
            writes = [w for w in log.writes if started <= w[0] < ended]
    per_key: dict[str, list[LoadReport]] = {}
    for _, key, report in writes:
        per_key.setdefault(key, []).append(report)
    gaps = [b.ts - a.ts for reports in per_key.values() for a, b in itertools.pairwise(reports)]
    per_instance_s = len(writes) / instances / (ended - started)
    why: dict[str, int] = {}
    for reports in per_key.values():
        for a, b in itertools.pairwise(reports):
            moved = changed_fields(a, b) or ("max_interval",)
            for name in moved:
                why[name] = why.get(name, 0) + 1
    return {
        "instances": instances,
        "duration_s": round(ended - started, 2),
        "writes": len(writes),
        "writes_per_instance_s": round(per_instance_s, 4),
        "writes_per_1000_instances_s": round(per_instance_s * 1000, 1),
        "every_reading_per_1000_instances_s": 1000.0,  # the old rate: one per report interval
        "mean_gap_s": round(sum(gaps) / len(gaps), 2) if gaps else None,
        "max_gap_s": round(max(gaps), 2) if gaps else None,
        "rps_per_instance": round(sum(r.rps for _, _, r in writes) / max(1, len(writes)), 1),
        "writes_by_cause": why,
        "max_interval_s": DEFAULT_THRESHOLDS.max_interval_s,
        "relative": DEFAULT_THRESHOLDS.relative,
    }


def render(row: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"{'instances':>10}{'seconds':>9}{'writes':>8}{'/inst/s':>9}{'/1000 inst/s':>14}"
            f"{'mean gap':>10}{'max gap':>9}{'rps/inst':>10}",
            f"{row['instances']:>10}{row['duration_s']:>9}{row['writes']:>8}"
            f"{row['writes_per_instance_s']:>9.3f}{row['writes_per_1000_instances_s']:>14.1f}"
            f"{row['mean_gap_s'] or 0:>9.1f}s{row['max_gap_s'] or 0:>8.1f}s{row['rps_per_instance']:>10}",
            f"(steady keyed load; a record is rewritten when a field moves by more than "
            f"{row['relative']:.0%} (and its floor) or every {row['max_interval_s']:g} s; "
            "writing every 1 s reading would be 1,000 per 1,000 instances per second)",
            f"writes by cause (a write can have several): {row['writes_by_cause']}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds counted")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ringmesh-bench-") as tmp:
        row = measure(args.instances, args.duration, args.warmup, Path(tmp))
    print(render(row))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(row, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
