"""`ringmesh up`: the whole story headless, the live view in a real terminal, and Ctrl-C.

Every run is a real `ringmesh up` process; what it started is found from
/proc (its children, whatever session they are in) and must be gone
afterwards, as must its temporary directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _temp_paths(pid: int) -> set[Path]:
    """The ringmesh temporary directories a process names on its command line or has open."""
    root = Path(tempfile.gettempdir())
    names: list[str] = []
    with contextlib.suppress(OSError):
        names += Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                names.append(os.readlink(fd))
    found = set()
    for name in names:
        for part in re.findall(rf"{re.escape(str(root))}/ringmesh-(?:up|etcd)-[^/\s=,]+", name):
            found.add(Path(part.removesuffix(".log")))
    return found


class Up:
    """A `ringmesh up` process; remembers every child it started, and leaves none behind."""

    def __init__(self, *args: str, argv: list[str] | None = None) -> None:
        self.argv = argv or [sys.executable, "-m", "ringmesh", "up", *args]
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.pids: set[int] = set()
        self.temp: set[Path] = set()  # what its children had open or were told to use
        self.out: list[str] = []
        self.err: list[str] = []
        self._done = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
            threading.Thread(target=self._track, args=(self.proc.pid,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, stream: object, into: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line)

    def _track(self, pid: int) -> None:
        while not self._done.is_set():
            self.pids |= _children(pid)
            for child in self.pids:
                self.temp |= _temp_paths(child)
            self._done.wait(0.1)

    def wait_line(self, pattern: str, within: float) -> str:
        deadline = time.monotonic() + within
        while True:
            for line in (*self.out, *self.err):
                if re.search(pattern, line):
                    return line
            assert self.proc.poll() is None, f"up exited before {pattern!r}: {self.tail()}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {within} s: {self.tail()}"
            time.sleep(0.05)

    def wait(self, within: float) -> int:
        code = self.proc.wait(timeout=within)
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=5)
        return code

    def tail(self) -> str:
        return "".join(self.out[-30:]) + "\n--- stderr ---\n" + "".join(self.err[-30:])

    def assert_nothing_left(self) -> None:
        deadline = time.monotonic() + 10
        while left := [pid for pid in self.pids if _running(pid)]:
            assert time.monotonic() < deadline, f"processes of `up` outlived it: {left}"
            time.sleep(0.1)
        assert self.pids and self.temp, "no child of `up` was seen: the check proves nothing"
        left_over = [p for p in self.temp if p.exists() or p.with_suffix(".log").exists()]
        assert not left_over, f"`up` left temporary files: {left_over}"

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._done.set()
        for pid in self.pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def up() -> Iterator[Callable[..., Up]]:
    started: list[Up] = []

    def start(*args: str) -> Up:
        started.append(Up(*args))
        return started[-1]

    yield start
    for run in started:
        run.cleanup()


def test_up_for_60_tells_the_whole_story_and_leaves_nothing(up: Callable[..., Up]) -> None:
    run = up("--for", "60", "--json")
    code = run.wait(within=240)
    stdout = "".join(run.out)
    assert code == 0, run.tail()
    doc = json.loads(stdout)  # one JSON document, nothing else on stdout
    events = "".join(run.err)
    assert "scale-out" in events and "\x1b[" not in events  # plain lines: not a terminal
    assert doc["ok"] is True and doc["failed_step"] is None
    steps = {step["name"]: step for step in doc["steps"]}
    assert list(steps) == [
        "baseline",
        "scale-out",
        "failover",
        "leader-change",
        "scale-in",
        "totals",
    ]
    assert all(step["ok"] for step in steps.values()), steps
    outs = [e for e in doc["scale_events"] if e["kind"] == "scale-out" and "-> 2 " not in e["text"]]
    assert outs and all("rps" in e["text"] and "target 40" in e["text"] for e in outs), doc
    assert any(e["kind"] == "scale-in" for e in doc["scale_events"]), doc
    assert doc["calls"]["total"] > 1000 and doc["calls"]["failed"] == 0, doc["calls"]
    assert doc["failovers"] >= 1 and "killed" in steps["failover"]["detail"]
    assert len(doc["leader_changes"]) == 1, doc["leader_changes"]
    assert doc["drains"] >= 1 and "drained, 0 failed" in steps["scale-in"]["detail"]
    assert doc["hit_rate"]["keyed"] > doc["hit_rate"]["unkeyed"] > 0, doc["hit_rate"]
    run.assert_nothing_left()


def test_up_for_needs_time_for_the_story(up: Callable[..., Up]) -> None:
    run = up("--for", "5")
    assert run.wait(within=30) == 2
    err = "".join(run.err)
    assert err.startswith("ringmesh up: --for must be at least 30 s") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("after", "signals"),
    [
        (r"etcd at ", 1),  # start-up: etcd runs, nothing else yet
        (r"scalers scaler-a", 1),  # start-up done, the story not yet under way
        (r"load starts", 1),  # during the story
        (r"load starts", 2),  # during the shutdown: a second Ctrl-C kills instead of draining
    ],
    ids=["start-up", "started", "story", "shutdown"],
)
def test_ctrl_c_at_any_moment_stops_everything(
    up: Callable[..., Up], after: str, signals: int
) -> None:
    """`--for` was asked, so an interrupted story is not a success: 130, and nothing left."""
    run = up("--for", "60")
    run.wait_line(after, within=90)
    run.proc.send_signal(signal.SIGINT)
    if signals == 2:
        run.wait_line(r"ringmesh up: stopping$", within=10)
        run.proc.send_signal(signal.SIGINT)
    code = run.wait(within=60)
    assert code == 130, run.tail()
    assert "Traceback" not in "".join(run.err), run.tail()
    if signals == 2:
        run.wait_line("stopping at once", within=1)
    run.assert_nothing_left()


@pytest.mark.parametrize("ending", ["ctrl-c", "hangup"])
def test_the_live_view_in_a_real_terminal(tmp_path: Path, ending: str) -> None:
    """tmux gives `up` a real TTY: the screen shows the instances and the story's events;
    Ctrl-C typed into it stops everything, and so does the terminal going away (SIGHUP,
    then every write to it fails: the shutdown must not depend on them)."""
    tmux = shutil.which("tmux")
    assert tmux, "tmux is needed (./dev test installs it)"
    socket = f"ringmesh-test-{uuid.uuid4().hex[:8]}"
    pid_file = tmp_path / "pid"
    status_file = tmp_path / "status"
    command = (
        f"echo $$ > {pid_file}; {sys.executable} -m ringmesh up; echo $? > {status_file}; sleep 60"
    )
    base = [tmux, "-L", socket]
    subprocess.run(
        [*base, "new-session", "-d", "-x", "160", "-y", "60", "-s", "up", command], check=True
    )
    pids: set[int] = set()
    temp: set[Path] = set()
    try:

        def screen() -> str:
            if pid_file.exists() and pid_file.read_text().strip():
                for up_pid in _children(int(pid_file.read_text())):
                    pids.update({up_pid} | _children(up_pid))
                for child in pids:
                    temp.update(_temp_paths(child))
            done = subprocess.run(
                [*base, "capture-pane", "-p", "-t", "up"], capture_output=True, text=True
            )
            return done.stdout

        def wait_screen(*needles: str, within: float) -> str:
            deadline = time.monotonic() + within
            while True:
                text = screen()
                if all(n in text for n in needles):
                    return text
                assert time.monotonic() < deadline, f"not on screen: {needles}\n{text}"
                time.sleep(0.2)

        text = wait_screen("cache-1", "cache-2", "calls/s", "hit rate", "ring", within=90)
        assert "\x1b[" not in text  # capture-pane gives the screen's text, not escape codes
        if ending == "hangup":
            screen()  # every child started so far is tracked
            subprocess.run([*base, "kill-session", "-t", "up"], check=True)
        else:
            text = wait_screen("scale-out", "cache-5", "scaler leader: scaler-", within=90)
            assert re.search(r"cache: \d live, target \d", text), text
            assert "step: scale-out" in text or "step: failover" in text, text
            subprocess.run([*base, "send-keys", "-t", "up", "C-c"], check=True)
            deadline = time.monotonic() + 60
            while not (status_file.exists() and status_file.read_text().strip()):
                assert time.monotonic() < deadline, f"up did not stop on Ctrl-C:\n{screen()}"
                time.sleep(0.2)
            status = status_file.read_text().strip()
            assert status == "0", f"exit status {status}:\n{screen()}"  # Ctrl-C stops a live up
            assert "stopping" in screen()
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True)
    deadline = time.monotonic() + 30  # a hang-up drains them first, as a Ctrl-C does
    while left := [pid for pid in pids if _running(pid)]:
        assert time.monotonic() < deadline, f"processes of `up` outlived it: {left}"
        time.sleep(0.1)
    assert pids and temp
    deadline = time.monotonic() + 10
    while [p for p in temp if p.exists() or p.with_suffix(".log").exists()]:
        assert time.monotonic() < deadline, f"temporary files left: {temp}"
        time.sleep(0.1)
