"""The local actuator with real processes: newest first on the way down, and instances that
leave together drain together (one drain timeout in all, not one each)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scaler.actuators import CommandLauncher, LocalActuator

pytestmark = pytest.mark.integration

# An instance that takes DRAIN seconds to drain on SIGTERM (does not drain, nor exit, if
# DRAIN < 0). It notes when its SIGTERM arrived (sigterm-N) and when its drain ended
# (drained-N), in time.monotonic() (one clock for every process on Linux), so a test can
# see whether drains overlapped rather than infer it from how long they took.
INSTANCE = """
import os, signal, sys, time
from pathlib import Path
out, index, drain = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
def terminated(signum, frame):
    (out / f"sigterm-{index}").write_text(repr(time.monotonic()))
    if drain < 0:
        return
    time.sleep(drain)
    (out / f"drained-{index}").write_text(repr(time.monotonic()))
    sys.exit(0)
signal.signal(signal.SIGTERM, terminated)
(out / f"ready-{index}").write_text(str(os.getpid()))
while True:
    time.sleep(1)
"""


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[Path]:
    """Where instances say they are ready; any still running at the end is killed."""
    (tmp_path / "instance.py").write_text(INSTANCE)
    yield tmp_path
    for ready in tmp_path.glob("ready-*"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.killpg(int(ready.read_text()), signal.SIGKILL)


def actuator(out: Path, *, drain: float, drain_timeout: float) -> LocalActuator:
    template = f"{sys.executable} {out / 'instance.py'} {out} {{index}} {drain}"
    launcher = CommandLauncher(
        {"svc": template}, etcd="http://127.0.0.1:2379", prefix="/t", drain_timeout=drain_timeout
    )
    return LocalActuator(launcher)


async def ready(out: Path, *indexes: int) -> None:
    deadline = time.monotonic() + 20
    while not all((out / f"ready-{i}").exists() for i in indexes):
        assert time.monotonic() < deadline, f"instances {indexes} ready"
        await asyncio.sleep(0.02)


def running(out: Path, index: int) -> bool:
    try:
        os.kill(int((out / f"ready-{index}").read_text()), 0)
    except ProcessLookupError:
        return False
    return not (out / f"drained-{index}").exists()


def noted(out: Path, what: str, index: int) -> float:
    """When instance ``index`` noted ``what`` (sigterm, drained)."""
    return float((out / f"{what}-{index}").read_text())


def assert_drained_together(out: Path, *indexes: int) -> None:
    """Every drain began before any ended: they ran side by side, not one after another.
    (One at a time, the next SIGTERM would come only after the previous drain ended.)"""
    began = {i: noted(out, "sigterm", i) for i in indexes}
    ended = {i: noted(out, "drained", i) for i in indexes}
    assert max(began.values()) < min(ended.values()), (
        f"drains of {indexes} did not overlap: began {began}, ended {ended}"
    )


def test_scale_down_and_shutdown_drain_the_leaving_instances_together(instances: Path) -> None:
    drain = 2.0

    async def scenario() -> tuple[float, float]:
        local = actuator(instances, drain=drain, drain_timeout=10)
        try:
            await local.apply("svc", 4)
            await ready(instances, 1, 2, 3, 4)
            started = time.monotonic()
            await local.apply("svc", 1)  # three leave, each drains for `drain` s
            down = time.monotonic() - started
            assert local.replicas("svc") == 1
            assert [i for i in (1, 2, 3, 4) if running(instances, i)] == [1], "newest first"
            assert all((instances / f"drained-{i}").exists() for i in (2, 3, 4))
            assert_drained_together(instances, 2, 3, 4)

            await local.apply("svc", 3)
            await ready(instances, 5, 6)
            started = time.monotonic()
        finally:
            await local.aclose()
        closed = time.monotonic() - started
        assert all((instances / f"drained-{i}").exists() for i in (1, 5, 6))
        assert_drained_together(instances, 1, 5, 6)
        return down, closed

    down, closed = asyncio.run(scenario())
    # The overlap above proves they drain together; this bounds the whole: one drain, plus
    # 1.5 drains (3 s) for three processes to wake, exit and be polled (every 50 ms) on a
    # busy machine, still short of the 3 drains that one at a time takes at least.
    assert down < 2.5 * drain, f"three drains of {drain} s took {down:.1f} s: one at a time?"
    assert closed < 2.5 * drain, f"shutdown took {closed:.1f} s: one at a time?"


def test_instances_that_do_not_drain_are_killed_after_one_drain_timeout(
    instances: Path,
) -> None:
    timeout = 2.0

    async def scenario() -> float:
        local = actuator(instances, drain=-1, drain_timeout=timeout)
        try:
            await local.apply("svc", 3)
            await ready(instances, 1, 2, 3)
            started = time.monotonic()
            await local.apply("svc", 0)
            return time.monotonic() - started
        finally:
            await local.aclose()

    took = asyncio.run(scenario())
    assert not any(running(instances, i) for i in (1, 2, 3))
    # Each got its SIGTERM before the first one's drain timeout ran out: one at a time, the
    # next SIGTERM would come only after the previous instance was killed (>= timeout).
    terms = [noted(instances, "sigterm", i) for i in (1, 2, 3)]
    assert max(terms) - min(terms) < timeout, f"SIGTERMs at {terms}: one at a time?"
    # Never killed before the drain timeout; all killed after one timeout, plus 1.5 of it
    # (3 s) to kill, reap and poll them on a busy machine, still short of the 3 timeouts
    # that one at a time takes at least.
    assert timeout <= took < 2.5 * timeout, f"took {took:.1f} s for three instances"
