"""What the data plane costs: keyed unary calls direct vs through two sidecars, and ring lookups.

Starts an embedded etcd, 3 demo apps + sidecars for service ``echo`` and a ``client``
app + sidecar, then drives keyed ``Demo/Echo`` calls from this process with grpc.aio:

* direct: straight to one echo app;
* mesh: client sidecar (outbound) -> echo sidecar (inbound) -> echo app (two hops).

Each case runs at each concurrency for a fixed time after a warm-up; direct and mesh
run back to back (order alternating per round) so their ratio is measured under the
same machine noise. CPU per call comes from ``/proc/<pid>/stat`` (utime + stime) of
every process involved. Ring lookups (``BoundedRing.owner``/``choose``) are timed
in-process. Prints tables and writes ``bench/results/bench_proxy.json``.

Run: ``python -m bench.bench_proxy [--duration 5] [--warmup 1] [--rounds 1]``;
``--duration 1 --warmup 0.5`` is a quick smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
import timeit
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from proto import demo_pb2, demo_pb2_grpc
from registry.embedded import EmbeddedEtcd
from ringmesh.localmesh import Instance, LocalMesh
from sidecar.ring import DEFAULT_LOAD_FACTOR, DEFAULT_VNODES, BoundedRing, Peer

SERVICE = "echo"
PREFIX = "/ringmesh-bench/v1"
ECHO_INSTANCES = 3
N_KEYS = 4096
CALL_TIMEOUT = 10.0
RESULTS = Path(__file__).resolve().parent / "results" / "bench_proxy.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")

Metadata = tuple[tuple[str, str], ...]


# -- /proc accounting ---------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of a whole process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces: count fields after its ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 (utime) and 15 (stime)


def host_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


@dataclass
class CpuSnapshot:
    roles: dict[str, int]
    host_busy: int
    host_total: int

    @classmethod
    def take(cls, pids: Mapping[str, Sequence[int]]) -> CpuSnapshot:
        roles = {role: sum(cpu_ticks(pid) for pid in group) for role, group in pids.items()}
        busy, total = host_ticks()
        return cls(roles, busy, total)


# -- the mesh ------------------------------------------------------------------------


@contextlib.contextmanager
def running_mesh(logs: Path) -> Iterator[tuple[EmbeddedEtcd, list[Instance], Instance]]:
    with EmbeddedEtcd() as etcd, LocalMesh(etcd.url, prefix=PREFIX, logs=logs) as mesh:
        echoes = [mesh.add(SERVICE, f"echo-{i + 1}") for i in range(ECHO_INSTANCES)]
        client = mesh.add("client", "client-1")
        yield etcd, echoes, client


# -- load ------------------------------------------------------------------------------


@dataclass
class Case:
    target: str  # "direct" or "mesh"
    concurrency: int
    calls: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    instances: Counter[str] = field(default_factory=Counter)
    cpu: Counter[str] = field(default_factory=Counter)  # role -> ticks
    host_busy: int = 0
    host_total: int = 0


def keyed_metadata(n: int, seed: int = 7) -> list[Metadata]:
    keys = [f"user-{i}" for i in range(n)]
    random.Random(seed).shuffle(keys)
    return [(("ringmesh-service", SERVICE), ("ringmesh-hash-key", key)) for key in keys]


async def drive(
    stub: Any,
    request: demo_pb2.EchoRequest,
    metadata: Sequence[Metadata],
    concurrency: int,
    seconds: float,
    case: Case | None,
) -> None:
    """``concurrency`` closed-loop callers for ``seconds``; results go into ``case`` if given."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    instances: Counter[str] = Counter()
    clock = time.perf_counter

    async def caller(offset: int) -> None:
        i = offset
        n = len(metadata)
        while clock() < deadline:
            md = metadata[i % n]
            i += 1
            start = clock()
            try:
                reply = await stub.Echo(request, metadata=md, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                errors[f"{exc.code().name}: {exc.details()}"] += 1
                continue
            latencies.append(clock() - start)
            instances[reply.instance] += 1

    start = clock()
    await asyncio.gather(*(caller(k * len(metadata) // concurrency) for k in range(concurrency)))
    elapsed = clock() - start
    if case is not None:
        case.calls += len(latencies)
        case.elapsed += elapsed
        case.latencies.extend(latencies)
        case.errors.update(errors)
        case.instances.update(instances)


async def wait_mesh_ready(stub: Any, metadata: Sequence[Metadata], within: float = 20.0) -> None:
    """Until keyed calls through the client sidecar reach every echo instance."""
    request = demo_pb2.EchoRequest(text="ready")
    deadline = time.monotonic() + within
    seen: set[str] = set()
    last_error = ""
    i = 0
    while time.monotonic() < deadline:
        try:
            reply = await stub.Echo(request, metadata=metadata[i % len(metadata)], timeout=2)
            seen.add(reply.instance)
        except grpc.aio.AioRpcError as exc:
            last_error = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(0.1)
        i += 1
        if len(seen) == ECHO_INSTANCES:
            return
    raise RuntimeError(f"mesh not ready: saw {sorted(seen)}; last error: {last_error or 'none'}")


async def run_load(
    args: argparse.Namespace, echoes: list[Instance], client: Instance, pids: dict[str, list[int]]
) -> list[Case]:
    request = demo_pb2.EchoRequest(text="x" * args.payload, delay_ms=0)
    metadata = keyed_metadata(N_KEYS)
    targets = {"direct": f"127.0.0.1:{echoes[0].app_port}", "mesh": client.outbound}
    channels = {name: grpc.aio.insecure_channel(address) for name, address in targets.items()}
    try:
        stubs = {name: demo_pb2_grpc.DemoStub(ch) for name, ch in channels.items()}
        await wait_mesh_ready(stubs["mesh"], metadata)
        cases = {
            (target, c): Case(target, c) for c in args.concurrency for target in ("direct", "mesh")
        }
        for round_no in range(args.rounds):
            order = ("direct", "mesh") if round_no % 2 == 0 else ("mesh", "direct")
            for c in args.concurrency:
                for target in order:
                    case = cases[(target, c)]
                    stub = stubs[target]
                    print(
                        f"  round {round_no + 1}/{args.rounds}: {target:6} c={c:<3} ...",
                        end="",
                        flush=True,
                    )
                    if args.warmup > 0:
                        await drive(stub, request, metadata, c, args.warmup, None)
                    before = CpuSnapshot.take(pids)
                    await drive(stub, request, metadata, c, args.duration, case)
                    after = CpuSnapshot.take(pids)
                    for role, ticks in after.roles.items():
                        case.cpu[role] += ticks - before.roles[role]
                    case.host_busy += after.host_busy - before.host_busy
                    case.host_total += after.host_total - before.host_total
                    print(f" {case.calls / case.elapsed:8.0f} calls/s", flush=True)
        return list(cases.values())
    finally:
        for ch in channels.values():
            await ch.close()


# -- ring lookups ----------------------------------------------------------------------


def per_call_us(fn: Callable[[str], object], keys: Sequence[str], repeat: int = 5) -> float:
    def loop() -> None:
        for key in keys:
            fn(key)

    best = min(timeit.repeat(loop, number=1, repeat=repeat))
    return best / len(keys) * 1e6


def bench_ring(peer_counts: Sequence[int], n_keys: int = 20_000) -> list[dict[str, Any]]:
    keys = [f"key-{i}" for i in range(n_keys)]
    rows = []
    for n in peer_counts:
        peers = [Peer(f"{SERVICE}-{i + 1}", f"127.0.0.1:{20000 + i}") for i in range(n)]
        ring = BoundedRing(peers)
        balanced = {p.id: 32 // n + (1 if i < 32 % n else 0) for i, p in enumerate(peers)}
        hot = {peers[0].id: 32}  # one peer above its bound: its keys walk the ring
        empty: dict[str, int] = {}
        rows.append(
            {
                "peers": n,
                "vnodes": DEFAULT_VNODES,
                "load_factor": DEFAULT_LOAD_FACTOR,
                "keys": n_keys,
                "owner_us": per_call_us(ring.owner, keys),
                "choose_idle_us": per_call_us(partial(ring.choose, inflight=empty), keys),
                "choose_32_balanced_us": per_call_us(partial(ring.choose, inflight=balanced), keys),
                "choose_32_on_one_peer_us": per_call_us(partial(ring.choose, inflight=hot), keys),
            }
        )
    return rows


# -- report -------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan if empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def summarize(case: Case) -> dict[str, Any]:
    lat = sorted(case.latencies)
    calls = max(case.calls, 1)
    seconds = max(case.elapsed, 1e-9)
    cpu_us = {role: ticks / CLK_TCK / calls * 1e6 for role, ticks in case.cpu.items()}
    ours = sum(case.cpu.values()) / CLK_TCK
    return {
        "target": case.target,
        "concurrency": case.concurrency,
        "calls": case.calls,
        "seconds": round(case.elapsed, 3),
        "calls_per_s": case.calls / seconds,
        "p50_ms": percentile(lat, 50) * 1e3,
        "p90_ms": percentile(lat, 90) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "max_ms": (lat[-1] * 1e3) if lat else float("nan"),
        "errors": dict(case.errors),
        "served_by": dict(sorted(case.instances.items())),
        "cpu_ticks": dict(case.cpu),
        "cpu_us_per_call": cpu_us,
        # Share of the whole machine (all cores) busy: our processes, and everything.
        "ours_busy_pct": ours / seconds / (os.cpu_count() or 1) * 100,
        "host_busy_pct": case.host_busy / max(case.host_total, 1) * 100,
    }


def ratios(direct: dict[str, Any], mesh: dict[str, Any]) -> dict[str, float]:
    def div(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {
        "calls_per_s": div(mesh["calls_per_s"], direct["calls_per_s"]),
        "p50_ms": div(mesh["p50_ms"], direct["p50_ms"]),
        "p99_ms": div(mesh["p99_ms"], direct["p99_ms"]),
        "added_p50_ms": mesh["p50_ms"] - direct["p50_ms"],
    }


ROLE_LABELS = (
    ("client_sidecar", "client sc"),
    ("echo_sidecars", "echo scs"),
    ("echo_apps", "echo apps"),
    ("bench", "bench"),
    ("etcd", "etcd"),
)


def render(result: dict[str, Any]) -> str:
    cfg = result["config"]
    out: list[str] = []
    add = out.append
    add("")
    add(
        f"ringmesh proxy benchmark: unary Demo/Echo, {cfg['payload']}-byte text, delay_ms=0, "
        f"keyed ({N_KEYS} keys); {cfg['duration']:g} s per case after {cfg['warmup']:g} s "
        f"warm-up, {cfg['rounds']} round(s); {cfg['cpus']} CPUs"
    )
    add("direct = bench -> echo app;  mesh = bench -> client sidecar -> echo sidecar -> echo app")
    add("")
    add(f"{'case':<8}{'conc':>5}{'calls':>9}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}  errors")
    for row in result["cases"]:
        errors = sum(row["errors"].values())
        add(
            f"{row['target']:<8}{row['concurrency']:>5}{row['calls']:>9}"
            f"{row['calls_per_s']:>10.0f}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}  {errors}"
        )
    add("")
    add(f"{'mesh/direct':<13}{'conc':>5}{'calls/s':>9}{'p50':>8}{'p99':>8}{'added p50 ms':>14}")
    for c, r in result["ratios"].items():
        add(
            f"{'':<13}{c:>5}{r['calls_per_s']:>9.2f}{r['p50_ms']:>8.2f}"
            f"{r['p99_ms']:>8.2f}{r['added_p50_ms']:>14.3f}"
        )
    add("")
    add(
        f"CPU per call, µs (utime+stime from /proc/<pid>/stat, tick {1e6 / CLK_TCK:.0f} µs; "
        "echo scs/apps = sum of the 3)"
    )
    header = "".join(f"{label:>11}" for _, label in ROLE_LABELS)
    add(f"{'case':<8}{'conc':>5}{header}{'ours %':>8}{'host %':>8}")
    for row in result["cases"]:
        cells = "".join(
            f"{row['cpu_us_per_call'].get(role, 0.0):>11.0f}" for role, _ in ROLE_LABELS
        )
        add(
            f"{row['target']:<8}{row['concurrency']:>5}{cells}"
            f"{row['ours_busy_pct']:>8.0f}{row['host_busy_pct']:>8.0f}"
        )
    add("")
    add("Per sidecar hop in the mesh runs (µs CPU per call):")
    for c, hop in result["hops"].items():
        add(
            f"  c={c:<3} client sidecar (outbound) {hop['client_sidecar_us']:6.0f}   "
            f"echo sidecar (inbound, sum of 3) {hop['echo_sidecars_us']:6.0f}   "
            f"both {hop['client_sidecar_us'] + hop['echo_sidecars_us']:6.0f}"
        )
    for row in result["cases"]:
        if row["target"] == "mesh":
            total = max(sum(row["served_by"].values()), 1)
            shares = ", ".join(f"{k} {v / total:.0%}" for k, v in row["served_by"].items())
            add(f"  c={row['concurrency']:<3} mesh calls served by: {shares}")
    add("")
    add(
        f"Ring lookup, in-process (sidecar.ring.BoundedRing, {DEFAULT_VNODES} vnodes, "
        f"load factor {DEFAULT_LOAD_FACTOR}), µs per call:"
    )
    add(f"{'peers':>5}{'owner':>9}{'choose idle':>13}{'choose 32 even':>16}{'choose 32 on 1':>16}")
    for r in result["ring"]:
        add(
            f"{r['peers']:>5}{r['owner_us']:>9.2f}{r['choose_idle_us']:>13.2f}"
            f"{r['choose_32_balanced_us']:>16.2f}{r['choose_32_on_one_peer_us']:>16.2f}"
        )
    errors = {
        f"{row['target']} c={row['concurrency']}": row["errors"]
        for row in result["cases"]
        if row["errors"]
    }
    if errors:
        add("")
        add("ERRORS:")
        for case, errs in errors.items():
            for what, count in errs.items():
                add(f"  {case}: {count} x {what}")
    return "\n".join(out)


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per case")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per case")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every case; order alternates per round"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--payload", type=int, default=100, help="bytes of request text")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep-logs", action="store_true", help="keep the children's logs")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1 or min(args.concurrency) < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --rounds and --concurrency >= 1")
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the mesh


def _event_loop_runner() -> Callable[[Any], Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    run: Callable[[Any], Any] = uvloop.run  # the sidecars use uvloop too
    return run


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    print("ring lookups ...", flush=True)
    ring = bench_ring([3, 10])
    logs = Path(tempfile.mkdtemp(prefix="ringmesh-bench-"))
    ok = False
    try:
        print("starting etcd, 3 echo instances and a client, each with a sidecar ...", flush=True)
        with running_mesh(logs) as (etcd, echoes, client):
            assert etcd.pid is not None
            pids = {
                "client_sidecar": [client.sidecar.pid],
                "echo_sidecars": [e.sidecar.pid for e in echoes],
                "echo_apps": [e.app.pid for e in echoes],
                "client_app": [client.app.pid],
                "bench": [os.getpid()],
                "etcd": [etcd.pid],
            }
            cases = _event_loop_runner()(run_load(args, echoes, client, pids))
            for child in [*(e.sidecar for e in echoes), client.sidecar]:
                if not child.alive():
                    raise RuntimeError(f"{child.name} died during the run")
        ok = True
    finally:
        if ok and not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            print(f"children's logs kept in {logs}", file=sys.stderr)

    rows = [summarize(case) for case in cases]
    by_key = {(r["target"], r["concurrency"]): r for r in rows}
    result: dict[str, Any] = {
        "benchmark": "bench_proxy",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "duration": args.duration,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "payload": args.payload,
            "keys": N_KEYS,
            "echo_instances": ECHO_INSTANCES,
            "cpus": os.cpu_count(),
            "clk_tck": CLK_TCK,
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "machine": platform.machine(),
        },
        "cases": rows,
        "ratios": {
            str(c): ratios(by_key[("direct", c)], by_key[("mesh", c)]) for c in args.concurrency
        },
        "hops": {
            str(c): {
                "client_sidecar_us": by_key[("mesh", c)]["cpu_us_per_call"]["client_sidecar"],
                "echo_sidecars_us": by_key[("mesh", c)]["cpu_us_per_call"]["echo_sidecars"],
            }
            for c in args.concurrency
        },
        "ring": ring,
    }
    print(render(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    print(f"\nwrote {args.output}")
    failed = sum(sum(r["errors"].values()) for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
