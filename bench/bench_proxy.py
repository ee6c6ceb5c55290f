"""What a hop costs: the native data plane beside direct calls, the old grpc.aio plane and nginx.

One run starts one demo app (``ringmesh.demo``) and, in front of it, every path:

* ``direct``: client -> app;
* ``mesh``: client -> client sidecar (outbound) -> echo sidecar (inbound) -> app, both
  sidecars ``ringmesh sidecar`` on the native data plane (this tree);
* ``mesh-mtls``: the same two native hops, both sidecars with ``--tls-dir`` (certificates
  made for the run with ``ringmesh certs``), so the sidecar-to-sidecar leg is mutual TLS;
* ``grpcaio``: the same two hops through the grpc.aio plane of commit 1a56072 (the last
  one before the native plane), run from a git worktree of it;
* ``nginx``: client -> nginx ``grpc_pass`` (upstream keepalive) -> app, one hop;
* ``nginx2``: client -> nginx -> nginx -> app, two hops like the meshes.

All three meshes register in one embedded etcd, under prefixes of their own. The client is
bench/loadgen (Rust, h2 on one thread, one HTTP/2 connection): closed-loop callers at
each concurrency. Every case (a workload on a path) runs once per round, the paths
round-robin within each workload, rotated by one each round, so machine noise hits every
path alike; figures are medians across rounds. CPU per call of every process comes from
``/proc/<pid>/stat`` (utime + stime) over each measured window, RSS from
``/proc/<pid>/status``. Apart from the rounds, each round also opens short-lived
connections straight to the echo sidecars' inbound ports (TLS with a mesh certificate, and
plaintext) and reads the sidecar's CPU per new connection: the handshake's cost, which the
pooled sidecar-to-sidecar connection hides from the rows. Prints tables and writes ``bench/results/proxy.json``
(``--save``: also ``bench/proxy-results.json`` and ``bench/proxy-results.png``).

Run: ``python -m bench.bench_proxy [--rounds 5] [--duration 3] [--warmup 1]``;
``--duration 0.5 --warmup 0.2 --rounds 1`` is a quick smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc

from bench import client as loadgen
from bench.nginx import Nginx, install_nginx, nginx_binary, nginx_version
from dataplane import build_profile
from proto import demo_pb2, demo_pb2_grpc
from registry.embedded import EmbeddedEtcd
from registry.errors import MeshError
from ringmesh.procs import Child, demo_app, python_module, sidecar
from sidecar.ring import DEFAULT_VNODES, BoundedRing, Peer

SERVICE = "echo"
CLIENT_SERVICE = "client"  # the client sidecar's service (and certificate)
NATIVE_PREFIX = "/ringmesh-bench/native/v1"
GRPCAIO_PREFIX = "/ringmesh-bench/grpcaio/v1"
MTLS_PREFIX = "/ringmesh-bench/mtls/v1"
OLD_COMMIT = "1a56072"  # the last commit before the native data plane
N_KEYS = 4096
CALL_TIMEOUT = 10.0
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "proxy.json"
SAVED_JSON = HERE / "proxy-results.json"
SAVED_PNG = HERE / "proxy-results.png"
CLK_TCK = os.sysconf("SC_CLK_TCK")

ALL_PATHS = ("direct", "mesh", "mesh-mtls", "grpcaio", "nginx", "nginx2")
PATH_HELP = {
    "direct": "client -> app",
    "mesh": "client -> client sidecar -> echo sidecar -> app (native plane)",
    "mesh-mtls": "the same two native hops, both sidecars --tls-dir: mTLS between them",
    "grpcaio": f"the same two hops, grpc.aio plane of commit {OLD_COMMIT}",
    "nginx": "client -> nginx grpc_pass (upstream keepalive 64) -> app",
    "nginx2": "client -> nginx -> nginx -> app",
}

# Targets for the native mesh: (key, what, unit, goal, stretch, higher is better).
TARGET_CPU_US = (60.0, 30.0)
TARGET_ADDED_P50_MS = 0.1
TARGET_VS_DIRECT = (0.7, 0.8)
TARGET_RSS_MB = 60.0

Pids = Callable[[], list[int]]


# -- /proc accounting ---------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of a whole process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces: count fields after its ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 (utime) and 15 (stime)


def run_ns(pid: int) -> dict[int, int]:
    """Nanoseconds on a CPU of each thread of a process (``/proc/<pid>/task/*/schedstat``,
    the scheduler's own clock): no 10 ms ticks, for windows too short to count them in."""
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with (
            contextlib.suppress(OSError, ValueError),
            open(f"/proc/{pid}/task/{task}/schedstat") as f,
        ):
            out[int(task)] = int(f.read().split()[0])
    return out


def rss_mb(pid: int) -> float:
    """VmRSS in MB (10^6 bytes)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    return math.nan


def host_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def snapshot(procs: Mapping[str, Pids]) -> dict[str, int]:
    ticks = {}
    for name, pids in procs.items():
        try:
            ticks[name] = sum(cpu_ticks(pid) for pid in pids())
        except OSError:
            raise RuntimeError(f"{name} is gone (its /proc entry vanished)") from None
    return ticks


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "clk_tck": CLK_TCK,
    }


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        # The working tree differs from the commit (tracked files only).
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


# -- what runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str  # "unary", "unary64k", "stream"
    label: str
    rpc: str  # "echo" or "count"
    payload: int
    messages: int  # response messages per call
    concurrency: int
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Route:
    path: str
    target: str  # what the client calls
    hops: tuple[str, ...]  # the proxies' process names, caller side first


def workloads(args: argparse.Namespace) -> list[Workload]:
    paths = tuple(args.paths)
    high = max(args.concurrency)
    no_nginx2 = tuple(p for p in paths if p != "nginx2")  # one row each is enough
    out = [
        Workload("unary", f"unary {args.payload} B", "echo", args.payload, 1, c, paths)
        for c in args.concurrency
    ]
    if args.big_payload > 0:
        size = args.big_payload
        label = f"unary {size // 1024} KiB" if size % 1024 == 0 else f"unary {size} B"
        out.append(Workload("unary64k", label, "echo", size, 1, high, no_nginx2))
    if args.stream_messages > 0:
        n = args.stream_messages
        out.append(Workload("stream", f"stream {n} msgs", "count", 0, n, high, no_nginx2))
    return out


class Stack:
    """Everything started, stopped in reverse order, and what to read about it."""

    def __init__(self, exits: contextlib.ExitStack, logs: Path) -> None:
        self.exits = exits
        self.logs = logs
        self.procs: dict[str, Pids] = {"bench": lambda: [os.getpid()]}
        self.children: dict[str, Child] = {}
        self.nginxes: dict[str, Nginx] = {}
        self.routes: dict[str, Route] = {}
        self.notices: list[str] = []
        self.nginx_version = ""
        self.inbound: dict[str, str] = {}  # plane -> its echo sidecar's inbound host:port
        self.certs: Path | None = None  # the run's mesh CA dir (ringmesh certs), if made

    def log(self, name: str) -> IO[bytes]:
        f = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed by the exit stack
        self.exits.callback(f.close)
        return f

    def child(self, name: str, start: Callable[[], Child]) -> Child:
        child = start()
        self.exits.callback(child.stop, 10)
        self.children[name] = child
        self.procs[name] = lambda: [child.pid]
        return child

    def forget(self, prefix: str) -> None:
        """No more watching or measuring the processes named ``prefix...`` (still stopped)."""
        for name in [n for n in self.procs if n.startswith(prefix)]:
            self.procs.pop(name)
            self.children.pop(name, None)
            self.nginxes.pop(name, None)

    def alive(self) -> None:
        for name, child in self.children.items():
            if not child.alive():
                raise RuntimeError(f"{name} died during the run (logs: {self.logs})")
        for name, nginx in self.nginxes.items():
            if not nginx.alive():
                raise RuntimeError(f"{name} died during the run: {nginx.log()}")


def start_plane(
    stack: Stack,
    plane: str,
    app: str,
    etcd_url: str,
    prefix: str,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    certs: Path | None = None,
) -> str:
    """An echo sidecar and a client sidecar in front of ``app``; the client's outbound.
    With ``certs`` (a ``ringmesh certs`` dir), each sidecar gets ``--tls-dir certs/SERVICE``."""
    started = []
    for role, service in (("echo", SERVICE), ("client", CLIENT_SERVICE)):
        name = f"{plane}_{role}_sidecar"
        tls = ("--tls-dir", str(certs / service)) if certs is not None else ()

        def start(service: str = service, name: str = name, tls: tuple[str, ...] = tls) -> Child:
            # `python -m ringmesh` imports from the current directory first.
            with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
                return sidecar(
                    service, app, etcd_url, "--prefix", prefix,
                    "--instance-id", f"{service}-1", *tls,
                    name=name, stderr=stack.log(name), env=env,
                )  # fmt: skip

        started.append(stack.child(name, start))
    for side in started:
        side.wait_event("registered", timeout=30)
    stack.inbound[plane] = str(started[0].wait_event("registered")["inbound"])
    return str(started[1].wait_event("registered")["outbound"])


def make_certs(stack: Stack) -> Path:
    """A mesh CA and one certificate per sidecar service, made with the CLI in a temp dir
    (removed after the sidecars stop: the exit stack unwinds in reverse)."""
    root = Path(stack.exits.enter_context(tempfile.TemporaryDirectory(prefix="ringmesh-pki-")))
    for args in (
        ("init", str(root)),
        *(("issue", str(root), s) for s in (SERVICE, CLIENT_SERVICE)),
    ):
        done = subprocess.run(
            python_module("ringmesh", "certs", *args),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"ringmesh certs {args[0]} failed: {done.stderr.strip()}")
    return root


@contextlib.contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """A detached git worktree of ``commit`` in a temp dir, removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="ringmesh-grpcaio-"))
    path = parent / "tree"
    try:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        yield path
    finally:
        if path.exists():
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
                capture_output=True, timeout=120, check=False,
            )  # fmt: skip
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "prune"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(parent, ignore_errors=True)


def start_grpcaio(stack: Stack, app: str, etcd_url: str, commit: str) -> str | None:
    try:
        tree = stack.exits.enter_context(worktree(commit))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        why = getattr(exc, "stderr", None) or exc
        stack.notices.append(
            f"grpcaio: skipped, no git worktree of {commit}: {str(why).strip().splitlines()[-1]}"
        )
        return None
    env = {**os.environ, "PYTHONPATH": str(tree)}
    try:
        return start_plane(stack, "grpcaio", app, etcd_url, GRPCAIO_PREFIX, cwd=tree, env=env)
    except MeshError as exc:  # what is started is stopped with the rest
        stack.notices.append(f"grpcaio: skipped, its sidecars did not start: {exc}")
        stack.forget("grpcaio_")
        return None


def start_nginx(stack: Stack, app: str, paths: Sequence[str], install: bool) -> None:
    binary = nginx_binary()
    if binary is None and install:
        print("nginx: not installed; installing it from Debian's packages ...", flush=True)
        binary, why = install_nginx()
        if binary is None:
            stack.notices.append(f"nginx: skipped, install failed: {why}")
            return
    if binary is None:
        stack.notices.append("nginx: skipped, not installed (and --no-install)")
        return
    stack.nginx_version = ".".join(map(str, nginx_version(binary)))
    try:
        back = stack.exits.enter_context(Nginx(binary, app, "nginx-back"))
        stack.nginxes["nginx_back"] = back
        stack.procs["nginx_back"] = back.pids
        stack.routes["nginx"] = Route("nginx", back.address, ("nginx_back",))
        if "nginx2" in paths:
            front = stack.exits.enter_context(Nginx(binary, back.address, "nginx-front"))
            stack.nginxes["nginx_front"] = front
            stack.procs["nginx_front"] = front.pids
            stack.routes["nginx2"] = Route("nginx2", front.address, ("nginx_front", "nginx_back"))
    except RuntimeError as exc:
        stack.notices.append(f"nginx: skipped, {exc}")


def start_everything(stack: Stack, args: argparse.Namespace) -> None:
    paths = args.paths
    etcd = stack.exits.enter_context(EmbeddedEtcd())
    stack.procs["etcd"] = lambda: [etcd.pid] if etcd.pid is not None else []
    app_child = stack.child("app", lambda: demo_app("app-1", stderr=stack.log("app")))
    app = f"127.0.0.1:{int(app_child.wait_event('listening')['port'])}"
    stack.routes["direct"] = Route("direct", app, ())
    if "mesh" in paths:
        print("starting the native plane's two sidecars ...", flush=True)
        outbound = start_plane(stack, "mesh", app, etcd.url, NATIVE_PREFIX)
        stack.routes["mesh"] = Route("mesh", outbound, ("mesh_client_sidecar", "mesh_echo_sidecar"))
    if "mesh-mtls" in paths:
        print("making certificates (ringmesh certs) and starting the mTLS sidecars ...", flush=True)
        stack.certs = make_certs(stack)
        outbound_tls = start_plane(stack, "mtls", app, etcd.url, MTLS_PREFIX, certs=stack.certs)
        stack.routes["mesh-mtls"] = Route(
            "mesh-mtls", outbound_tls, ("mtls_client_sidecar", "mtls_echo_sidecar")
        )
    if "grpcaio" in paths:
        print(f"starting the grpc.aio plane's two sidecars (worktree of {args.old_commit}) ...")
        outbound_old = start_grpcaio(stack, app, etcd.url, args.old_commit)
        if outbound_old is not None:
            stack.routes["grpcaio"] = Route(
                "grpcaio", outbound_old, ("grpcaio_client_sidecar", "grpcaio_echo_sidecar")
            )
    if "nginx" in paths or "nginx2" in paths:
        print("starting nginx ...", flush=True)
        start_nginx(stack, app, paths, args.install)
    for route in list(stack.routes.values()):
        try:
            wait_route(route)
        except RuntimeError as exc:
            if route.path in ("direct", "mesh", "mesh-mtls"):
                raise
            stack.notices.append(f"{route.path}: skipped, {exc}")
            del stack.routes[route.path]


def wait_route(route: Route, within: float = 20.0) -> None:
    """Until a keyed Echo through ``route`` succeeds (a sidecar's watch may lag)."""
    request = demo_pb2.EchoRequest(text="ready")
    metadata = (("ringmesh-service", SERVICE), ("ringmesh-hash-key", "ready"))
    deadline = time.monotonic() + within
    last = "none"
    with grpc.insecure_channel(route.target) as channel:
        stub = demo_pb2_grpc.DemoStub(channel)
        while time.monotonic() < deadline:
            try:
                stub.Echo(request, metadata=metadata, timeout=2)
                return
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
                time.sleep(0.1)
    raise RuntimeError(f"{route.path} ({route.target}) not ready within {within} s: {last}")


# -- measuring ---------------------------------------------------------------------------


def nan_if_none(value: Any) -> float:
    return float(value) if value is not None else math.nan


def measure(
    stack: Stack,
    binary: Path,
    route: Route,
    work: Workload,
    args: argparse.Namespace,
    no: int,
    log: IO[bytes],
) -> dict[str, Any]:
    load = loadgen.Load(
        target=route.target, rpc=work.rpc, payload=work.payload, messages=work.messages,
        concurrency=work.concurrency, warmup=args.warmup, duration=args.duration,
        keys=N_KEYS, service=SERVICE, timeout=CALL_TIMEOUT,
    )  # fmt: skip
    marks: dict[str, Any] = {}

    def at(which: str) -> Callable[[int], None]:
        def take(client_pid: int) -> None:
            ticks = snapshot(stack.procs)
            ticks["client"] = cpu_ticks(client_pid)
            marks[which] = (ticks, host_ticks())
            if which == "after":
                marks["rss"] = {
                    name: sum(rss_mb(pid) for pid in pids()) for name, pids in stack.procs.items()
                }

        return take

    out = loadgen.run(binary, load, at_start=at("before"), at_end=at("after"), stderr=log)
    (before, host0), (after, host1) = marks["before"], marks["after"]
    ticks = {name: after[name] - before[name] for name in after}
    calls = int(out["calls"])
    seconds = float(out["seconds"])
    per_call = {name: t / CLK_TCK / max(calls, 1) * 1e6 for name, t in ticks.items()}
    hop_us = [per_call[h] for h in route.hops]
    return {
        "round": no,
        "workload": work.name,
        "path": route.path,
        "concurrency": work.concurrency,
        "hops": len(route.hops),
        "calls": calls,
        "seconds": seconds,
        "calls_per_s": calls / seconds,
        "messages": int(out["messages"]),
        "p50_ms": nan_if_none(out["p50_us"]) / 1e3,
        "p90_ms": nan_if_none(out["p90_us"]) / 1e3,
        "p99_ms": nan_if_none(out["p99_us"]) / 1e3,
        "max_ms": nan_if_none(out["max_us"]) / 1e3,
        "mean_ms": nan_if_none(out["mean_us"]) / 1e3,
        "errors": dict(out["errors"]),
        "errors_outside_window": int(out["errors_outside_window"]),
        "cpu_ticks": ticks,
        "cpu_us_per_call": per_call,
        "client_us": per_call["client"],
        "app_us": per_call["app"],
        "hop_us": hop_us,
        "per_hop_us": sum(hop_us) / len(hop_us) if hop_us else math.nan,
        "hop_rss_mb": [marks["rss"][h] for h in route.hops],
        "rss_mb": marks["rss"],
        "host_busy_pct": (host1[0] - host0[0]) / max(host1[1] - host0[1], 1) * 100,
    }


def run_rounds(
    stack: Stack, binary: Path, works: Sequence[Workload], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every case once per round, then (``--handshakes``) the new-connection batches."""
    runs: list[dict[str, Any]] = []
    handshakes: list[dict[str, Any]] = []
    connecting = handshake_targets(stack) if args.handshakes > 0 else []
    log = stack.log("loadgen")
    total = args.rounds * sum(len([p for p in w.paths if p in stack.routes]) for w in works)
    for r in range(args.rounds):
        for work in works:
            paths = [p for p in work.paths if p in stack.routes]
            k = r % len(paths)
            for path in paths[k:] + paths[:k]:  # round-robin, rotated by one each round
                print(
                    f"  [{len(runs) + 1:>3}/{total}] round {r + 1}: {work.label:<16} "
                    f"c={work.concurrency:<3} {path:<9}",
                    end="",
                    flush=True,
                )
                run = measure(stack, binary, stack.routes[path], work, args, r + 1, log)
                stack.alive()
                errors = sum(run["errors"].values())
                print(
                    f" {run['calls_per_s']:8.0f} calls/s  p50 {run['p50_ms']:7.3f} ms"
                    + (f"  {errors} errors" if errors else ""),
                    flush=True,
                )
                runs.append(run)
        k = r % max(len(connecting), 1)
        for hs in connecting[k:] + connecting[:k]:  # the order swapped each round
            print(
                f"  handshakes round {r + 1}: {hs.mode:<9} x {args.handshakes} -> {hs.sidecar:<18}",
                end="",
                flush=True,
            )
            batch = handshake_batch(stack, hs, args.handshakes, r + 1)
            stack.alive()
            print(
                f" {batch['cpu_us_per_conn']:7.1f} µs CPU/conn "
                f"({batch['run_ns_us_per_conn']:.1f} by schedstat)",
                flush=True,
            )
            handshakes.append(batch)
    return runs, handshakes


# -- new connections: what a handshake costs -----------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, SETTINGS, stream 0
HANDSHAKE_WARMUP = 10  # connections before each batch, not measured
HANDSHAKE_SETTLE = 0.05  # s before the last reading: the sidecar ends the last connections


@dataclass(frozen=True)
class Handshake:
    mode: str  # "plaintext" or "mtls"
    sidecar: str  # the echo sidecar's process name
    address: str  # its inbound host:port
    context: ssl.SSLContext | None  # None: plaintext


def client_tls(certs: Path) -> ssl.SSLContext:
    """TLS 1.3 with the client service's mesh certificate, the server's chain checked
    against the mesh CA. No hostname check: a mesh certificate names its service in a URI
    SAN (the sidecars check that themselves), not a DNS name."""
    mine = certs / CLIENT_SERVICE
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(mine / "ca.pem")
    context.load_cert_chain(mine / "cert.pem", mine / "key.pem")
    context.set_alpn_protocols(["h2"])
    return context


def handshake_targets(stack: Stack) -> list[Handshake]:
    out = []
    if "mesh" in stack.inbound:
        out.append(Handshake("plaintext", "mesh_echo_sidecar", stack.inbound["mesh"], None))
    else:
        stack.notices.append("handshakes: no plaintext figure (path mesh not run)")
    if "mtls" in stack.inbound and stack.certs is not None:
        context = client_tls(stack.certs)
        out.append(Handshake("mtls", "mtls_echo_sidecar", stack.inbound["mtls"], context))
    else:
        stack.notices.append("handshakes: no mTLS figure (path mesh-mtls not run)")
    return out


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError("the sidecar closed the connection before its SETTINGS")
        data += chunk
    return data


def new_connection(address: str, context: ssl.SSLContext | None) -> None:
    """One short-lived connection: TCP (+ the TLS handshake), the client's HTTP/2 preface
    and SETTINGS, the server's SETTINGS read, closed."""
    host, port = address.rsplit(":", 1)
    raw = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
    sock = raw
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(raw, server_hostname=f"{SERVICE}.ringmesh")
            if sock.selected_alpn_protocol() != "h2":
                raise RuntimeError(f"{address}: ALPN {sock.selected_alpn_protocol()!r}, not h2")
        sock.sendall(H2_PREFACE + H2_EMPTY_SETTINGS)
        header = recv_exact(sock, 9)
        if header[3] != 0x4 or header[4] & 0x1:
            raise RuntimeError(f"{address}: the first frame is type {header[3]}, not SETTINGS")
        recv_exact(sock, int.from_bytes(header[:3], "big"))
    finally:
        sock.close()
        raw.close()


def handshake_batch(stack: Stack, hs: Handshake, n: int, no: int) -> dict[str, Any]:
    """``n`` new connections to one echo sidecar's inbound port, one after the other, and
    that sidecar's CPU over them (utime+stime, and the scheduler's ns clock)."""
    pid = stack.children[hs.sidecar].pid
    try:
        for _ in range(HANDSHAKE_WARMUP):
            new_connection(hs.address, hs.context)
        time.sleep(HANDSHAKE_SETTLE)
        ticks0, ns0 = cpu_ticks(pid), run_ns(pid)
        wall0, own0 = time.perf_counter(), time.thread_time()
        for _ in range(n):
            new_connection(hs.address, hs.context)
        wall, own = time.perf_counter() - wall0, time.thread_time() - own0
        time.sleep(HANDSHAKE_SETTLE)
        ticks1, ns1 = cpu_ticks(pid), run_ns(pid)
    except (OSError, ssl.SSLError) as exc:
        raise RuntimeError(
            f"handshakes ({hs.mode}) with {hs.sidecar} at {hs.address}: {exc}"
        ) from None
    ticks = ticks1 - ticks0
    # A thread gone between the readings took its time with it: no figure then.
    ns = sum(v - ns0.get(t, 0) for t, v in ns1.items()) if ns0.keys() <= ns1.keys() else math.nan
    return {
        "round": no,
        "mode": hs.mode,
        "sidecar": hs.sidecar,
        "address": hs.address,
        "connections": n,
        "seconds": wall + HANDSHAKE_SETTLE,  # the window the sidecar's CPU was read over
        "cpu_ticks": ticks,
        "run_ns": ns,
        "cpu_us_per_conn": ticks / CLK_TCK / n * 1e6,
        "run_ns_us_per_conn": ns / 1e3 / n,
        "wall_us_per_conn": wall / n * 1e6,
        "client_cpu_us_per_conn": own / n * 1e6,  # this Python loop's own thread
    }


def summarize_handshakes(
    batches: Sequence[dict[str, Any]], idle: Mapping[str, float]
) -> dict[str, Any]:
    """Pooled over every batch of a mode (sum of CPU / sum of connections: ticks of 10 ms
    are coarse against one batch), with each batch's figure's median beside it."""
    out: dict[str, Any] = {}
    for mode in ("plaintext", "mtls"):
        mine = [b for b in batches if b["mode"] == mode]
        if not mine:
            continue
        conns = sum(b["connections"] for b in mine)
        seconds = sum(b["seconds"] for b in mine)
        sidecar_name = mine[0]["sidecar"]
        out[mode] = {
            "sidecar": sidecar_name,
            "batches": len(mine),
            "connections": conns,
            "cpu_us_per_conn": sum(b["cpu_ticks"] for b in mine) / CLK_TCK / conns * 1e6,
            "cpu_us_per_conn_median": median([b["cpu_us_per_conn"] for b in mine]),
            "run_ns_us_per_conn": sum(b["run_ns"] for b in mine) / 1e3 / conns,
            "run_ns_us_per_conn_median": median([b["run_ns_us_per_conn"] for b in mine]),
            # The sidecar's idle background (ms per s, while direct ran) over the windows,
            # per connection: inside both figures above, not taken out.
            "idle_us_per_conn": idle.get(sidecar_name, math.nan) * seconds / conns * 1e3,
            "wall_us_per_conn": median([b["wall_us_per_conn"] for b in mine]),
            "client_cpu_us_per_conn": median([b["client_cpu_us_per_conn"] for b in mine]),
        }
    if "plaintext" in out and "mtls" in out:
        tls, plain = out["mtls"], out["plaintext"]
        out["mtls_minus_plaintext"] = {
            key: tls[key] - plain[key]
            for key in ("cpu_us_per_conn", "run_ns_us_per_conn", "wall_us_per_conn")
        }
    return out


# -- summary -----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def summarize(runs: Sequence[dict[str, Any]], works: Sequence[Workload]) -> list[dict[str, Any]]:
    rows = []
    for work in works:
        mine = [
            r for r in runs if r["workload"] == work.name and r["concurrency"] == work.concurrency
        ]
        direct = {r["round"]: r for r in mine if r["path"] == "direct"}
        plain = {r["round"]: r for r in mine if r["path"] == "mesh"}
        for path in ALL_PATHS:
            those = [r for r in mine if r["path"] == path]
            if not those:
                continue
            hops = those[0]["hops"]
            paired = [(r, direct[r["round"]]) for r in those if r["round"] in direct]
            rates = [r["calls_per_s"] for r in those]
            n_hops = max(len(r["hop_us"]) for r in those)
            rows.append(
                {
                    "workload": work.name,
                    "label": work.label,
                    "path": path,
                    "concurrency": work.concurrency,
                    "hops": hops,
                    "rounds": len(those),
                    "calls_per_s": median(rates),
                    "calls_per_s_min": min(rates),
                    "calls_per_s_max": max(rates),
                    "p50_ms": median([r["p50_ms"] for r in those]),
                    "p90_ms": median([r["p90_ms"] for r in those]),
                    "p99_ms": median([r["p99_ms"] for r in those]),
                    "messages_per_s": median([r["messages"] / r["seconds"] for r in those]),
                    "client_us": median([r["client_us"] for r in those]),
                    "app_us": median([r["app_us"] for r in those]),
                    "hop_us": [median([r["hop_us"][i] for r in those]) for i in range(n_hops)],
                    "per_hop_us": median([r["per_hop_us"] for r in those]),
                    "hop_rss_mb_max": [
                        max(r["hop_rss_mb"][i] for r in those) for i in range(n_hops)
                    ],
                    "host_busy_pct": median([r["host_busy_pct"] for r in those]),
                    # Paired with direct in the same round, then the median.
                    "calls_vs_direct": median(
                        [r["calls_per_s"] / d["calls_per_s"] for r, d in paired if d["calls_per_s"]]
                    ),
                    "added_p50_per_hop_ms": median(
                        [(r["p50_ms"] - d["p50_ms"]) / hops for r, d in paired]
                    )
                    if hops
                    else math.nan,
                    "errors": sum(sum(r["errors"].values()) for r in those),
                }
            )
            if path == "mesh-mtls":
                rows[-1]["vs_mesh"] = versus_mesh(those, plain)
    return rows


def versus_mesh(
    tls: Sequence[dict[str, Any]], plain: Mapping[int, dict[str, Any]]
) -> dict[str, Any]:
    """mesh-mtls against mesh, paired in the same round, then the median."""
    paired = [(r, plain[r["round"]]) for r in tls if r["round"] in plain]
    if not paired:
        return {"rounds": 0}
    return {
        "rounds": len(paired),
        "per_hop_us_mesh": median([m["per_hop_us"] for _, m in paired]),
        "per_hop_x": median(
            [r["per_hop_us"] / m["per_hop_us"] for r, m in paired if m["per_hop_us"]]
        ),
        "per_hop_added_us": median([r["per_hop_us"] - m["per_hop_us"] for r, m in paired]),
        "calls_x": median(
            [r["calls_per_s"] / m["calls_per_s"] for r, m in paired if m["calls_per_s"]]
        ),
        "added_p50_per_hop_ms": median(
            [(r["p50_ms"] - m["p50_ms"]) / max(r["hops"], 1) for r, m in paired]
        ),
    }


def background(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """CPU ms per second of every process while only ``direct`` ran: the proxies' idle
    cost (probes, load reports, lease keep-alives), which is in their per-call figures."""
    direct = [r for r in runs if r["path"] == "direct"]
    names = sorted({n for r in direct for n in r["cpu_ticks"]} - {"client", "app"})
    return {
        name: median([r["cpu_ticks"][name] / CLK_TCK / r["seconds"] * 1e3 for r in direct])
        for name in names
    }


def targets(summary: Sequence[dict[str, Any]], levels: Sequence[int]) -> list[dict[str, Any]]:
    """The native mesh against its targets (unary rows, lowest and highest concurrency)."""
    by = {(r["path"], r["concurrency"]): r for r in summary if r["workload"] == "unary"}
    low, high = min(levels), max(levels)
    mesh_low, mesh_high = by.get(("mesh", low)), by.get(("mesh", high))
    out: list[dict[str, Any]] = []

    def add(
        what: str, value: float, unit: str, goal: float, stretch: float | None, higher: bool
    ) -> None:
        def meets(bound: float) -> bool:
            return not math.isnan(value) and (value >= bound if higher else value <= bound)

        out.append(
            {
                "what": what, "value": value, "unit": unit, "goal": goal, "stretch": stretch,
                "higher_is_better": higher, "met": meets(goal),
                "stretch_met": meets(stretch) if stretch is not None else None,
            }
        )  # fmt: skip

    if mesh_high is not None:
        add(
            f"sidecar CPU per call per hop, {high} concurrent",
            mesh_high["per_hop_us"], "µs", *TARGET_CPU_US, higher=False,
        )  # fmt: skip
    if mesh_low is not None:
        add(
            f"added p50 per hop, {low} concurrent",
            mesh_low["added_p50_per_hop_ms"], "ms", TARGET_ADDED_P50_MS, None, higher=False,
        )  # fmt: skip
    if mesh_high is not None:
        add(
            f"calls/s vs direct, {high} concurrent",
            mesh_high["calls_vs_direct"], "x", *TARGET_VS_DIRECT, higher=True,
        )  # fmt: skip
    rss = [v for r in summary if r["path"] == "mesh" for v in r["hop_rss_mb_max"]]
    if rss:
        add(
            "sidecar RSS (the larger, any round)", max(rss), "MB", TARGET_RSS_MB, None, higher=False
        )
    return out


# -- ring lookups ------------------------------------------------------------------------


def bench_ring(peer_counts: Sequence[int], n_keys: int = 20_000) -> list[dict[str, Any]]:
    """Building a ring and exporting it (each topology change), and ``order`` per key
    (the native lookup ``ringmesh route`` calls), in-process."""
    keys = [f"key-{i}" for i in range(n_keys)]
    rows = []
    for n in peer_counts:
        peers = [Peer(f"{SERVICE}-{i + 1}", f"127.0.0.1:{20000 + i}") for i in range(n)]

        def build(peers: list[Peer] = peers) -> None:
            BoundedRing(peers).order("warm")  # builds, exports, indexes

        ring = BoundedRing(peers)
        ring.order("warm")

        def lookups(ring: BoundedRing = ring) -> None:
            for key in keys:
                ring.order(key)

        rows.append(
            {
                "peers": n,
                "vnodes": DEFAULT_VNODES,
                "build_ms": min(timeit.repeat(build, number=1, repeat=5)) * 1e3,
                "order_us": min(timeit.repeat(lookups, number=1, repeat=3)) / n_keys * 1e6,
            }
        )
    return rows


# -- report ------------------------------------------------------------------------------


def fmt(value: float | None, spec: str, width: int) -> str:
    """A number, or a dash for none (no calls, no such hop); a spec may start with "+"."""
    if value is None or math.isnan(value):
        return f"{'-':>{width}}"
    sign, spec = ("+", spec[1:]) if spec.startswith("+") else ("", spec)
    return f"{value:>{sign}{width}{spec}}"


def render(result: dict[str, Any]) -> str:
    cfg, mach, git = result["config"], result["machine"], result["git"]
    out: list[str] = []
    add = out.append
    add("")
    add(
        f"ringmesh proxy benchmark: {cfg['rounds']} round(s) x {cfg['duration']:g} s per case "
        f"(+{cfg['warmup']:g} s warm-up), paths round-robin; medians across rounds"
    )
    add(
        f"machine: {mach['nproc']} x {mach['cpu_model']}; native data plane: "
        f"{result['native_build_profile']} build; commit {git['commit'][:10]}"
        f"{' + uncommitted changes' if git['dirty'] else ''}"
    )
    add(f"client: {result['client']['what']}")
    for path in cfg["paths"]:
        state = "" if path in result["ran"] else "   (not run)"
        add(f"  {path:<9} {PATH_HELP[path]}{state}")
    if result.get("nginx_version"):
        add(f"  nginx {result['nginx_version']}, worker_processes 1")
    add("")
    add(
        f"{'workload':<16}{'path':<10}{'hops':>4}{'conc':>5}{'calls/s':>9}{'x direct':>9}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'+p50/hop':>9}{'errors':>7}"
    )
    for r in result["summary"]:
        add(
            f"{r['label']:<16}{r['path']:<10}{r['hops']:>4}{r['concurrency']:>5}"
            f"{fmt(r['calls_per_s'], '.0f', 9)}{fmt(r['calls_vs_direct'], '.2f', 9)}"
            f"{fmt(r['p50_ms'], '.3f', 9)}{fmt(r['p99_ms'], '.3f', 9)}"
            f"{fmt(r['added_p50_per_hop_ms'], '.3f', 9)}"
            f"{r['errors']:>7}"
        )
    add("(+p50/hop: (p50 - direct p50) / hops, ms; x direct: calls/s over direct's, same round)")
    add("")
    add(
        "CPU µs per call (utime+stime, /proc/<pid>/stat, tick "
        f"{1e6 / CLK_TCK:.0f} µs); hop 1 = client sidecar / front nginx, hop 2 = echo sidecar"
    )
    add(
        f"{'workload':<16}{'path':<10}{'conc':>5}{'client':>8}{'hop 1':>8}{'hop 2':>8}"
        f"{'app':>8}{'per hop':>9}{'RSS MB 1':>10}{'RSS MB 2':>10}{'host %':>8}"
    )
    for r in result["summary"]:
        hop = [*r["hop_us"], None, None]
        rss = [*r["hop_rss_mb_max"], None, None]
        add(
            f"{r['label']:<16}{r['path']:<10}{r['concurrency']:>5}{fmt(r['client_us'], '.0f', 8)}"
            f"{fmt(hop[0], '.0f', 8)}{fmt(hop[1], '.0f', 8)}{fmt(r['app_us'], '.0f', 8)}"
            f"{fmt(r['per_hop_us'], '.1f', 9)}{fmt(rss[0], '.1f', 10)}{fmt(rss[1], '.1f', 10)}"
            f"{fmt(r['host_busy_pct'], '.0f', 8)}"
        )
    add(
        "(per hop: the hops' CPU / calls / hops; RSS: VmRSS at the end of each window, the largest)"
    )
    idle = result["idle_cpu_ms_per_s"]
    if idle:
        cells = ", ".join(f"{name} {fmt(ms, '.1f', 0)}" for name, ms in idle.items())
        add(f"idle CPU, ms per s (while direct ran): {cells}")
    out.extend(render_mtls(result))
    if result["targets"]:
        add("")
        add("native mesh targets:")
        for t in result["targets"]:
            sign = ">=" if t["higher_is_better"] else "<="
            unit = "" if t["unit"] == "x" else f" {t['unit']}"
            value = fmt(t["value"], ".3g" if t["unit"] != "µs" else ".1f", 7)
            line = (
                f"  {t['what']:<42}{value}{unit:<4} {sign} {t['goal']:g}: "
                f"{'met' if t['met'] else 'NOT met'}"
            )
            if t["stretch"] is not None:
                line += f"   (stretch {sign} {t['stretch']:g}: {'met' if t['stretch_met'] else 'not met'})"
            add(line)
    add("")
    add(f"Ring, in-process (sidecar.ring.BoundedRing, {DEFAULT_VNODES} vnodes):")
    for row in result["ring"]:
        add(
            f"  {row['peers']:>2} peers: build + export {row['build_ms']:6.2f} ms, "
            f"order() {row['order_us']:5.2f} µs per key"
        )
    for notice in result["notices"]:
        add(f"NOTE: {notice}")
    errors = [
        (f"round {r['round']} {r['workload']} c={r['concurrency']} {r['path']}", what, n)
        for r in result["runs"]
        for what, n in r["errors"].items()
    ]
    if errors:
        add("")
        add("ERRORS:")
        for case, what, n in errors:
            add(f"  {case}: {n} x {what}")
    return "\n".join(out)


def render_mtls(result: dict[str, Any]) -> list[str]:
    """mesh-mtls against mesh per row, and the handshake table."""
    out: list[str] = []
    add = out.append
    rows = [r for r in result["summary"] if r["path"] == "mesh-mtls" and r["vs_mesh"]["rounds"]]
    if rows:
        add("")
        add(
            "mesh-mtls vs mesh (sidecar CPU per call per hop; paired in the same round, then the median)"
        )
        add(
            f"{'workload':<16}{'conc':>5}{'mesh':>9}{'mTLS':>9}{'added':>9}{'x mesh':>8}"
            f"{'calls/s x mesh':>16}{'+p50/hop ms':>13}"
        )
        for r in rows:
            v = r["vs_mesh"]
            add(
                f"{r['label']:<16}{r['concurrency']:>5}{fmt(v['per_hop_us_mesh'], '.1f', 9)}"
                f"{fmt(r['per_hop_us'], '.1f', 9)}{fmt(v['per_hop_added_us'], '+.1f', 9)}"
                f"{fmt(v['per_hop_x'], '.2f', 8)}{fmt(v['calls_x'], '.2f', 16)}"
                f"{fmt(v['added_p50_per_hop_ms'], '+.3f', 13)}"
            )
        add(
            "(mesh, mTLS: µs per call per hop; added = mTLS - mesh; +p50/hop: (p50 - mesh's) / hops)"
        )
    hs = result.get("handshakes") or {}
    summary = hs.get("summary") or {}
    if not summary:
        return out
    cfg = hs["config"]
    add("")
    add(
        "New connections to the echo sidecar's inbound port, one after the other "
        f"({cfg['connections']} per round x {result['config']['rounds']}): TCP"
    )
    add(
        f"  [+ TLS 1.3, client certificate '{cfg['client_certificate']}'] + the h2 preface, "
        "the server's SETTINGS read, closed"
    )
    add(
        f"{'mode':<18}{'sidecar':<19}{'conns':>6}{'CPU µs':>9}{'sched µs':>10}"
        f"{'idle µs':>9}{'wall µs':>9}{'client µs':>11}"
    )
    for mode in ("plaintext", "mtls"):
        m = summary.get(mode)
        if m is None:
            continue
        add(
            f"{mode:<18}{m['sidecar']:<19}{m['connections']:>6}"
            f"{fmt(m['cpu_us_per_conn'], '.1f', 9)}{fmt(m['run_ns_us_per_conn'], '.1f', 10)}"
            f"{fmt(m['idle_us_per_conn'], '.1f', 9)}{fmt(m['wall_us_per_conn'], '.0f', 9)}"
            f"{fmt(m['client_cpu_us_per_conn'], '.0f', 11)}"
        )
    diff = summary.get("mtls_minus_plaintext")
    if diff:
        add(
            f"{'mTLS - plaintext':<18}{'':<19}{'':>6}{fmt(diff['cpu_us_per_conn'], '+.1f', 9)}"
            f"{fmt(diff['run_ns_us_per_conn'], '+.1f', 10)}{'':>9}"
            f"{fmt(diff['wall_us_per_conn'], '+.0f', 9)}"
        )
    add(
        "(sidecar CPU per new connection, pooled over the rounds: CPU = utime+stime, "
        f"1 tick = {1e6 / CLK_TCK / cfg['connections']:.0f} µs per connection of one batch;"
    )
    add(
        " sched = the scheduler's ns clock, /proc/<pid>/task/*/schedstat; idle = the sidecar's "
        "idle background in the windows, inside both; wall and client = this Python loop's)"
    )
    return out


def clean(value: Any) -> Any:
    """JSON without NaN: non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


# -- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per case")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per case")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every case")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], help="for the 100-byte unary rows"
    )
    parser.add_argument("--paths", nargs="+", choices=ALL_PATHS, default=list(ALL_PATHS))
    parser.add_argument("--payload", type=int, default=100, help="bytes of request text")
    parser.add_argument(
        "--big-payload", type=int, default=65536, help="the large unary row's bytes (0: no row)"
    )
    parser.add_argument(
        "--stream-messages",
        type=int,
        default=100,
        help="messages of the server-stream row (0: no row)",
    )
    parser.add_argument(
        "--handshakes",
        type=int,
        default=300,
        help="new connections per round to each echo sidecar's inbound port, mTLS and "
        "plaintext (0: none)",
    )
    parser.add_argument("--old-commit", default=OLD_COMMIT, help="the grpc.aio plane's commit")
    parser.add_argument(
        "--no-install", dest="install", action="store_false", help="never apt-get nginx"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--save",
        action="store_true",
        help=f"also write {SAVED_JSON.relative_to(REPO)} and {SAVED_PNG.relative_to(REPO)}",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the children's logs")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--duration must be in (0, 600], --warmup in [0, 60]")
    if not 1 <= args.rounds <= 100 or not all(1 <= c <= 1024 for c in args.concurrency):
        parser.error("--rounds must be in 1..100, --concurrency in 1..1024")
    if not 0 <= args.payload <= 16 << 20 or not 0 <= args.big_payload <= 16 << 20:
        parser.error("payloads are 0..16 MiB")
    if not 0 <= args.stream_messages <= 100_000:
        parser.error("--stream-messages is 0..100000")
    if not 0 <= args.handshakes <= 100_000:
        parser.error("--handshakes is 0..100000")
    args.paths = ["direct", *(p for p in ALL_PATHS if p in args.paths and p != "direct")]
    args.concurrency = sorted(set(args.concurrency))
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop everything


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return bench(args)
    except (RuntimeError, MeshError) as exc:
        print(f"bench_proxy: {exc}", file=sys.stderr)
        return 1


def bench(args: argparse.Namespace) -> int:
    profile = build_profile()
    print(f"native data plane: {profile} build", flush=True)
    print("building the load generator (bench/loadgen, cargo --release) ...", flush=True)
    binary = loadgen.build_loadgen()
    print("ring builds and lookups ...", flush=True)
    ring = bench_ring([3, 10])
    works = workloads(args)
    logs = Path(tempfile.mkdtemp(prefix="ringmesh-bench-"))
    ok = False
    try:
        with contextlib.ExitStack() as exits:
            stack = Stack(exits, logs)
            print("starting etcd and the demo app ...", flush=True)
            start_everything(stack, args)
            for notice in stack.notices:
                print(f"NOTE: {notice}", flush=True)
            runs, handshakes = run_rounds(stack, binary, works, args)
            print("stopping everything ...", flush=True)
        ok = True
    finally:
        if ok and not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            print(f"children's logs kept in {logs}", file=sys.stderr)

    summary = summarize(runs, works)
    idle = background(runs)
    result: dict[str, Any] = {
        "benchmark": "bench_proxy",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_state(),
        "machine": machine(),
        "native_build_profile": profile,
        "nginx_version": stack.nginx_version,
        "client": {
            "what": "bench/loadgen: Rust, h2 on one tokio thread, one HTTP/2 connection, "
            "closed-loop callers",
            "binary": str(binary.relative_to(REPO)),
        },
        "config": {
            "duration": args.duration,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "payload": args.payload,
            "big_payload": args.big_payload,
            "stream_messages": args.stream_messages,
            "keys": N_KEYS,
            "paths": args.paths,
            "old_commit": args.old_commit,
            "prefixes": {
                "mesh": NATIVE_PREFIX,
                "mesh-mtls": MTLS_PREFIX,
                "grpcaio": GRPCAIO_PREFIX,
            },
            "handshakes": args.handshakes,
        },
        "ran": sorted(stack.routes),
        "notices": stack.notices,
        "workloads": [
            {
                k: getattr(w, k)
                for k in ("name", "label", "rpc", "payload", "messages", "concurrency")
            }
            for w in works
        ],
        "summary": summary,
        "targets": targets(summary, args.concurrency),
        "idle_cpu_ms_per_s": idle,
        "handshakes": {
            "config": {
                "connections": args.handshakes,
                "warmup_connections": HANDSHAKE_WARMUP,
                "settle_s": HANDSHAKE_SETTLE,
                "client_certificate": CLIENT_SERVICE,
                "server_name": f"{SERVICE}.ringmesh",
                "what": "new connections, one after the other, to the echo sidecar's inbound "
                "port: TCP (+ TLS 1.3 with the client's mesh certificate, ALPN h2), the "
                "HTTP/2 preface and an empty SETTINGS, the server's SETTINGS read, closed; "
                "the sidecar's CPU before and after each batch",
            },
            "summary": summarize_handshakes(handshakes, idle),
            "runs": handshakes,
        },
        "ring": ring,
        "runs": runs,
    }
    result = clean(result)
    print(render(result))
    text = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    outputs = [args.output, *([SAVED_JSON] if args.save else [])]
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if args.save:
        try:
            from bench.plot import plot

            plot(result, SAVED_PNG)
            print(f"wrote {SAVED_PNG}")
        except ImportError as exc:
            print(f"NOTE: no plot ({exc}); pip install matplotlib", file=sys.stderr)
    failed = sum(r["errors"] for r in summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
