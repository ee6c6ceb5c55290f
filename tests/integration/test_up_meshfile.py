"""`ringmesh up -f mesh.yaml` through the real CLI: the example mesh serving calls from one
service to another, a process that dies on its own, an interrupted start-up, a malformed
file. Nothing of a run may outlive it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from proto import demo_pb2, demo_pb2_grpc
from ringmesh.procs import Child, sidecar
from tests.waiting import until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "local" / "mesh.yaml"
SHOWN = re.compile(r"ringmesh up: (\S+) \((\S+)\): app (\S+), outbound (\S+), inbound (\S+)")


@dataclass
class Up:
    """A `ringmesh up -f` subprocess, its output collected line by line."""

    proc: subprocess.Popen[str]
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    def text(self) -> str:
        """stderr, then stdout (where the lines about what runs go without --json)."""
        return "".join(self.err) + "".join(self.out)

    def wait_for(self, pattern: str, within: float = 60.0) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def check() -> bool:
            assert self.proc.poll() is None, f"up exited early: {self.text()[-3000:]}"
            match = re.search(pattern, self.text())
            if match:
                found.append(match)
            return match is not None

        until(check, within=within, what=f"{pattern!r} on up's stderr", interval=0.05)
        return found[0]

    def finish(self, within: float = 60.0) -> int:
        code = self.proc.wait(timeout=within)
        for reader in self.readers:
            reader.join(timeout=5)
        return code

    def instances(self) -> dict[str, tuple[str, str]]:
        """Instance id: (service, app address), as up printed them."""
        return {m.group(1): (m.group(2), m.group(3)) for m in SHOWN.finditer(self.text())}


@contextlib.contextmanager
def ringmesh_up(*args: str) -> Iterator[Up]:
    """Run it; afterwards (whatever the test did) kill it and whatever it left behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringmesh", "up", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    up = Up(proc)
    for stream, lines in ((proc.stdout, up.out), (proc.stderr, up.err)):
        reader = threading.Thread(target=lambda s=stream, x=lines: x.extend(s or []), daemon=True)
        reader.start()
        up.readers.append(reader)
    try:
        yield up
    finally:
        marks = _marks(up)
        apps = _announced_pids(marks[1]) if len(marks) > 1 else []
        if proc.poll() is None:  # the test failed: let up stop what it started
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Whatever is still there (up itself killed, say): the apps mention neither mark.
        for pid in [*apps, *(p for mark in marks for p in _processes_mentioning(mark))]:
            if _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for reader in up.readers:
            reader.join(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _marks(up: Up) -> list[str]:
    """What every process of this run has on its command line: etcd's URL, the run dir."""
    match = re.search(r"etcd at (\S+)", up.text())
    if not match:
        return []
    marks = [match.group(1)]
    for pid in _processes_mentioning(match.group(1)):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            if "--announce-dir" in argv:
                marks.append(argv[argv.index("--announce-dir") + 1])
    return list(dict.fromkeys(marks))


def _announced_pids(run_dir: str) -> list[int]:
    """The apps' and sidecars' pids, from the instances' announcements."""
    pids = []
    for path in Path(run_dir).glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            pids += json.loads(path.read_text()).get("pids", {}).values()
    return pids


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (entry / "cmdline").read_bytes() and not _zombie(int(entry.name)):
                found.append(int(entry.name))
    return found


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone
    return stat.rpartition(")")[2].split()[0] == "Z"


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and not _zombie(pid)


def _nothing_left(marks: list[str], pids: list[int]) -> None:
    """No process of the run is left, and its run directory is gone."""
    assert len(marks) == 2, f"etcd's URL and the run dir: {marks}"

    def clean() -> bool:
        return not any(_processes_mentioning(m) for m in marks) and not any(map(_alive, pids))

    until(clean, within=10, what="every process of `up` gone", interval=0.1)
    assert not Path(marks[1]).exists(), f"{marks[1]} left behind"


def test_the_example_mesh_runs_and_the_frontend_calls_the_backend_through_it() -> None:
    # 15 s from "running": the calls below take 2-5 s (8 with a CPU hog beside them).
    with ringmesh_up("-f", str(EXAMPLE), "--for", "15", "--json") as up:
        up.wait_for(r"ringmesh up: running for 15 s")
        etcd_url = up.wait_for(r"etcd at (\S+)").group(1)
        marks = _marks(up)
        shown = up.instances()
        backends = {i for i, (service, _) in shown.items() if service == "backend"}
        assert backends == {"backend-1", "backend-2"}, shown
        assert [i for i, (service, _) in shown.items() if service == "frontend"] == ["frontend-1"]

        # Through the mesh: a client-only sidecar, frontend's sidecar, frontend, its
        # sidecar's outbound port, a backend's sidecar, the backend.
        client: Child = sidecar("client", None, etcd_url, name="client sidecar")
        try:
            outbound = client.wait_event("ready")["outbound"]
            answered: dict[str, str] = {}
            with grpc.insecure_channel(outbound) as channel:
                stub = demo_pb2_grpc.DemoStub(channel)
                for key in [f"user-{i}" for i in range(6)] * 2:
                    reply = stub.Echo(
                        demo_pb2.EchoRequest(text=key),
                        metadata=(("ringmesh-service", "frontend"),),
                        timeout=10,
                    )
                    backend, _, text = reply.text.partition(": ")
                    assert text == key and backend in backends, reply
                    # The frontend keys its call: a key stays with its backend.
                    assert answered.setdefault(key, backend) == backend
        finally:
            client.stop()
        # And at the frontend's own port, as up printed it.
        with grpc.insecure_channel(shown["frontend-1"][1]) as channel:
            reply = demo_pb2_grpc.DemoStub(channel).Echo(
                demo_pb2.EchoRequest(text="direct"), timeout=10
            )
            assert reply.text in {f"{b}: direct" for b in backends}

        assert up.finish() == 0, up.text()[-3000:]
        doc = json.loads("".join(up.out))
        assert doc["ok"] is True and doc["error"] is None and doc["died"] == []
        services = doc["services"]
        assert set(services) == {"backend", "frontend"}
        backend_ids = sorted(i["id"] for i in services["backend"]["instances"])
        assert backend_ids == ["backend-1", "backend-2"] and services["backend"]["live"] == 2
        assert [i["id"] for i in services["frontend"]["instances"]] == ["frontend-1"]
        assert services["backend"]["replicas"] == 2 and services["backend"]["policy"] is None
        assert services["frontend"]["policy"]["min_replicas"] == 1
        for body in services.values():
            for instance in body["instances"]:
                assert instance["app"] == shown[instance["id"]][1]
                assert instance["state"] == "serving" and instance["outbound"]
        pids = [p for b in services.values() for i in b["instances"] for p in i["pids"].values()]
        assert len(pids) == 9  # the instance, its app and its sidecar, each
        _nothing_left(marks, pids)


CRASHER = """\
import pathlib, sys, time
from concurrent import futures
import grpc

server = grpc.server(futures.ThreadPoolExecutor(1))
server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
server.start()
print("listening", flush=True)
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.05)
sys.exit(3)
"""


def test_an_app_that_dies_on_its_own_stops_up_with_1_naming_it(tmp_path: Path) -> None:
    (tmp_path / "crash.py").write_text(CRASHER)
    trigger = tmp_path / "crash-now"
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        textwrap.dedent(f"""\
        services:
          crasher:
            command: "{{python}} crash.py {{port}} {trigger}"
            replicas: 1
        """)
    )
    with ringmesh_up("-f", str(mesh), "--json") as up:
        up.wait_for(r"ringmesh up: running; Ctrl-C to stop")
        marks = _marks(up)
        assert "crasher-1 | listening" in up.text()  # the app's output, named
        trigger.touch()
        assert up.finish() == 1
        last = "".join(up.err).splitlines()[-1]
        assert last == "ringmesh up: exited on its own: crasher-1: the app exited with status 3"
        doc = json.loads("".join(up.out))
        assert doc["ok"] is False and doc["died"] == ["crasher-1: the app exited with status 3"]
        _nothing_left(marks, [])


def test_sigterm_while_starting_exits_143_and_stops_everything() -> None:
    with ringmesh_up("-f", str(EXAMPLE)) as up:
        up.wait_for(r"backend-1 \| ")  # an app of it runs
        marks = _marks(up)
        pids = _announced_pids(marks[1])
        assert pids, "backend-1 announced its app"
        up.proc.send_signal(signal.SIGTERM)
        assert up.finish() == 143, up.text()[-3000:]
        assert "Traceback" not in up.text()
        _nothing_left(marks, pids)


STUBBORN = """\
import signal, sys, time
from concurrent import futures
import grpc

signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it drains for ever, as far as anyone can tell
server = grpc.server(futures.ThreadPoolExecutor(1))
server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
server.start()
print("listening", flush=True)
while True:
    time.sleep(1)
"""


def test_a_second_sigterm_while_stopping_kills_at_once(tmp_path: Path) -> None:
    """The first signal drains (an app that ignores SIGTERM gets 10 s before its
    instance kills it); a second one, as with `ringmesh up`, stops everything now."""
    (tmp_path / "stubborn.py").write_text(STUBBORN)
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        textwrap.dedent("""\
        services:
          stubborn:
            command: "{python} stubborn.py {port}"
            replicas: 1
        """)
    )
    with ringmesh_up("-f", str(mesh)) as up:
        up.wait_for(r"ringmesh up: running; Ctrl-C to stop")
        marks = _marks(up)
        pids = _announced_pids(marks[1])
        assert pids, "stubborn-1 announced its app"
        up.proc.send_signal(signal.SIGTERM)
        up.wait_for(r"ringmesh up: stopping")
        second = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        assert up.finish() == 0, up.text()[-3000:]  # it ran: stopping it is no failure
        took = time.monotonic() - second
        assert "ringmesh up: stopping at once" in up.text()
        assert took < 5, f"exited {took:.1f} s after the second signal (the app's 10 s not cut)"
        assert "Traceback" not in up.text()
        _nothing_left(marks, pids)


def test_a_malformed_file_exits_2_with_one_line_naming_its_line(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        "services:\n  web:\n    command: '{python} -m ringmesh.demo --port {port}'\n"
        "    replicas: two\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "ringmesh", "up", "-f", str(mesh)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"ringmesh up: {mesh}:4: services.web.replicas: must be an integer >= 1, got 'two'"
    ]
    assert done.stdout == ""
