"""The proxy benchmark's client: build the Rust load generator (bench/loadgen/) and run it.

The load generator is a separate process so that its CPU can be read from /proc like
every other process's, and cheap (h2 on one tokio thread) so that it leaves the two
cores to the app and the proxies. It announces the start and the end of its measured
window on stdout; ``run`` calls ``at_start``/``at_end`` right then, which is where the
benchmark reads every process's CPU counters.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from registry.errors import MeshError
from ringmesh.procs import Child

CRATE = Path(__file__).resolve().parent / "loadgen"
BINARY = CRATE / "target" / "release" / "ringmesh-bench-loadgen"


def build_loadgen(timeout: float = 900.0) -> Path:
    """Build (or find up to date) the release binary; offline first, from the cargo cache."""
    cargo = shutil.which("cargo")
    if cargo is None:
        raise RuntimeError("cargo is not on PATH: the load generator (bench/loadgen) needs it")
    base = [cargo, "build", "--release", "-q", "--manifest-path", str(CRATE / "Cargo.toml")]
    errors = ""
    for extra in (["--offline"], []):
        done = subprocess.run(
            [*base, *extra], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode == 0 and BINARY.exists():
            return BINARY
        errors = done.stderr.strip()
    raise RuntimeError(f"building bench/loadgen failed:\n{errors}")


@dataclass(frozen=True)
class Load:
    target: str  # host:port
    rpc: str  # "echo" (unary) or "count" (server stream)
    payload: int  # request bytes: EchoRequest.text, or CountRequest.payload
    messages: int  # response messages per call (1 for echo)
    concurrency: int
    warmup: float
    duration: float
    keys: int
    service: str
    timeout: float

    def argv(self, binary: Path) -> list[str]:
        return [
            str(binary),
            "--target", self.target,
            "--method", self.rpc,
            "--payload", str(self.payload),
            "--messages", str(self.messages),
            "--concurrency", str(self.concurrency),
            "--warmup", f"{self.warmup:g}",
            "--duration", f"{self.duration:g}",
            "--keys", str(self.keys),
            "--service", self.service,
            "--timeout", f"{self.timeout:g}",
        ]  # fmt: skip


def run(
    binary: Path,
    load: Load,
    *,
    at_start: Callable[[int], None],
    at_end: Callable[[int], None],
    stderr: IO[bytes] | None = None,
) -> dict[str, Any]:
    """Run one load; ``at_start``/``at_end`` get the client's pid; returns its result line."""
    child = Child("loadgen", load.argv(binary), stderr=stderr)
    try:
        try:
            child.wait_event("connected", timeout=15)
            child.wait_event("measuring", timeout=load.warmup + 15)
            at_start(child.pid)
            child.wait_event("done", timeout=load.duration + 15)
            at_end(child.pid)
            result = child.wait_event("result", timeout=load.timeout + 15)
        except MeshError as exc:
            child.kill()  # if it still runs: it missed its deadline
            child._reader.join(timeout=2)  # its last lines may still be in the pipe
            errors = [e for e in _drain(child) if e.get("event") == "error"]
            why = errors[0].get("message") if errors else exc
            raise RuntimeError(f"load generator against {load.target}: {why}") from None
        child.proc.wait(timeout=10)
        return result
    finally:
        child.kill()
        if child.proc.stdout is not None:
            child.proc.stdout.close()


def _drain(child: Child) -> list[dict[str, Any]]:
    events = list(child.seen)
    while not child.events.empty():
        events.append(child.events.get_nowait())
    return events
