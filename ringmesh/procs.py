"""Child processes that announce themselves with JSON lines on stdout.

Used by `ringmesh up` and the tests: start a demo app or a sidecar, wait
for its event line, and always stop it (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from registry.errors import MeshError


class Child:
    """A child process whose stdout is a stream of JSON event lines."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stderr: Any = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=env,
            # A Ctrl-C in the terminal goes to `up`, which stops its children in order.
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    self.events.put(event)

    def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Block until the child prints ``{"event": name, ...}``; raise if it exits first."""
        for event in self.seen:
            if event.get("event") == name:
                return event
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MeshError(f"{self.name}: no {name!r} event within {timeout} s")
            try:
                event = self.events.get(timeout=min(left, 0.1))
            except queue.Empty:
                if self.proc.poll() is not None:
                    # Its last lines may still be in the pipe: read to EOF before deciding.
                    self._reader.join(timeout=1)
                if self.proc.poll() is not None and self.events.empty():
                    raise MeshError(
                        f"{self.name} exited with {self.proc.returncode} before {name!r}"
                    ) from None
                continue
            self.seen.append(event)
            if event.get("event") == name:
                return event

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):  # it exited since the poll
                os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit status."""
        self.signal(signal.SIGTERM)
        return self._reap(time.monotonic() + timeout)

    def _reap(self, deadline: float) -> int:
        """Wait for the exit until ``deadline``, then SIGKILL; close its output."""
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=2)  # EOF now: closing under a reading thread would raise there
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()


def stop_all(
    children: Sequence[Child], timeout: float = 15.0, *, hurry: threading.Event | None = None
) -> None:
    """SIGTERM every child at once, then wait for them all: sidecars drain side by side,
    not one after another. Whoever is left at ``timeout``, or once ``hurry`` is set (a
    second Ctrl-C), is SIGKILLed."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        while child.alive() and time.monotonic() < deadline:
            if hurry is not None and hurry.is_set():
                deadline = time.monotonic()
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=0.1)
        child._reap(deadline)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def demo_app(instance: str, *, port: int = 0, stderr: Any = None) -> Child:
    child = Child(
        f"app {instance}",
        python_module("ringmesh.demo", "--port", str(port), "--instance", instance),
        stderr=stderr,
    )
    return child


def cache_app(
    instance: str, *, port: int = 0, stderr: Any = None, extra: Sequence[str] = ()
) -> Child:
    """The cache demo app (ringmesh/cache.py); ``extra`` are its flags, e.g. ``--miss-ms``."""
    return Child(
        f"cache {instance}",
        python_module("ringmesh.cache", "--port", str(port), "--instance", instance, *extra),
        stderr=stderr,
    )


def sidecar(
    service: str,
    app: str | None,
    etcd_url: str,
    *extra: str,
    name: str | None = None,
    env: dict[str, str] | None = None,
    stderr: Any = None,
) -> Child:
    argv = python_module(
        "ringmesh",
        "sidecar",
        "--service",
        service,
        *(("--app", app) if app is not None else ()),
        "--etcd",
        etcd_url,
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        *extra,
    )
    return Child(name or f"sidecar {service}", argv, env=env, stderr=stderr)
