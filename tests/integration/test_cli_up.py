"""`ringmesh up` when start-up goes wrong: a failing demo call, Ctrl-C while starting."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.embedded import free_port
from registry.errors import MeshError
from ringmesh import up
from ringmesh.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def keep_signal_handlers() -> Iterator[None]:
    """run_up installs SIGINT/SIGTERM handlers: never leave them in pytest's process."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_show_routing_failure_is_a_mesh_error() -> None:
    outbound = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(MeshError) as info:
        up._show_routing(outbound, ["user-1"])
    message = str(info.value)
    assert outbound in message and "UNAVAILABLE" in message and "\n" not in message


class _Stoppable:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.url = "http://127.0.0.1:1"
        self.prefix = "/ringmesh/v1"
        self.children: list[Any] = []
        self.closed = False

    def __enter__(self) -> _Stoppable:
        started.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True


started: list[_Stoppable] = []


class _Child:
    """A child that has already announced whatever is waited for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        return {"event": name}

    def alive(self) -> bool:
        return True


class _Client:
    def __init__(self, outbound: str) -> None:
        self.outbound = outbound
        self.sidecar = _Child()


def test_up_routing_failure_exits_1_with_one_line_and_stops_everything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Everything up to the demo calls is faked; the calls go to a port nobody serves."""
    started.clear()
    outbound = f"127.0.0.1:{free_port()}"
    monkeypatch.setattr(up, "EmbeddedEtcd", _Stoppable)
    monkeypatch.setattr(up, "LocalMesh", _Stoppable)
    monkeypatch.setattr(_Stoppable, "add", lambda self, *a, **k: _Client(outbound), raising=False)
    monkeypatch.setattr(up, "Child", _Child)
    monkeypatch.setattr(up, "_ringmesh", lambda *args: None)
    monkeypatch.setattr(up, "_wait_for_instances", lambda *args: None)
    assert main(["up", "--for", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ringmesh up: ") and "UNAVAILABLE" in err
    assert len(err.splitlines()) == 1
    assert len(started) == 2 and all(s.closed for s in started)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _scaler_started(etcd_url: str) -> bool:
    for pid in _processes_mentioning(etcd_url):
        with contextlib.suppress(OSError):
            if b"scaler" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
    return False


@pytest.mark.parametrize(
    ("whole_group", "when"),
    [(False, "etcd"), (True, "etcd"), (False, "scaler")],
    ids=["kill-INT", "terminal-ctrl-c", "kill-INT-while-scaling"],
)
def test_ctrl_c_during_start_up_stops_everything_quietly(whole_group: bool, when: str) -> None:
    """Exit 130, nothing on stderr, no process left over.

    A terminal's Ctrl-C signals the whole foreground group (up, its etcd,
    `ringmesh policy set`); `kill -INT` only up itself.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringmesh", "up", "--for", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    etcd_url = ""
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while not etcd_url:
            assert time.monotonic() < deadline, f"no 'etcd at' line: {lines}"
            assert proc.poll() is None, f"up exited early: {lines}"
            match = re.search(r"etcd at (\S+)", "".join(lines))
            etcd_url = match.group(1) if match else ""
            time.sleep(0.05)
        while when == "scaler" and not _scaler_started(etcd_url):
            assert time.monotonic() < deadline and proc.poll() is None, "no scaler started"
            time.sleep(0.05)
        if whole_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        reader.join(timeout=5)
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert code == 130, (code, err[-2000:], lines)
        assert "Traceback" not in err and "did not start" not in err
        assert "did not start" not in "".join(lines)
        deadline = time.monotonic() + 10
        while _processes_mentioning(etcd_url):  # the scaler and instances name etcd's URL
            assert time.monotonic() < deadline, "processes of `up` outlived it"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _processes_mentioning(etcd_url) if etcd_url else []:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
