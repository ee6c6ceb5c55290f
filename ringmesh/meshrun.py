"""`ringmesh up -f mesh.yaml`, running: embedded etcd and the file's services on this machine.

Every instance is ``python -m ringmesh.instance --command ...`` (the app and its
sidecar, ringmesh/instance.py). A ``replicas`` service gets that many, started
here; a ``policy`` service gets its policy (`ringmesh policy set`) and one
scaler with the local actuator runs its instances. Instances announce
themselves in a private run directory (``<id>.json``: ports, pids, state),
which is how the instances a scaler starts are shown too.

Stops on Ctrl-C, SIGTERM, SIGHUP or after ``--for SECONDS`` (a second signal: at once,
SIGKILL instead of a drain): 0 once it ran, 128+signal
if interrupted while starting, 1 (naming it) if a process died on its own.
With ``--json`` stdout is one JSON document, printed at the end, and the lines
about what runs go to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from registry.embedded import EmbeddedEtcd
from registry.errors import MeshError
from registry.keys import DEFAULT_PREFIX
from ringmesh.meshfile import MeshFile, ServiceSpec
from ringmesh.procs import Child, python_module, stop_all
from ringmesh.view import emit

START_TIMEOUT_S = 120.0  # every instance running (an instance gives its app 60 s to listen)
STOP_TIMEOUT_S = 45.0  # the scaler drains its instances (30 s at most) before it exits
POLL_S = 0.1


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while the mesh was starting."""


def run_mesh(mesh: MeshFile, *, duration: float | None, as_json: bool, etcd_members: int) -> int:
    stop = threading.Event()
    hurry = threading.Event()  # a second signal: kill what is left instead of draining it
    received: list[int] = []
    out = sys.stderr if as_json else sys.stdout

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if stop.is_set() and not hurry.is_set():
            hurry.set()
            emit("ringmesh up: stopping at once", out)
        stop.set()

    # SIGHUP too: a closed terminal must not leave the instances (in sessions of their
    # own) running.
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    run = _Run(mesh, stop, hurry, out=out)
    try:
        run.main(duration, etcd_members)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    doc = run.document()
    if as_json:
        sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
        sys.stdout.flush()
    else:
        run.print_summary(doc)
    if run.interrupted:
        return 128 + received[0]
    if run.error is not None:
        raise MeshError(run.error)
    return 0


@dataclass
class _Run:
    mesh: MeshFile
    stop: threading.Event
    hurry: threading.Event
    out: TextIO
    etcd_url: str = ""
    run_dir: Path | None = None
    scaler: Child | None = None
    replicas: dict[str, Child] = field(default_factory=dict)  # by instance id
    current: dict[str, dict[str, Any]] = field(default_factory=dict)  # announcements now
    announced: dict[str, dict[str, Any]] = field(default_factory=dict)  # the last of each
    shown: set[str] = field(default_factory=set)
    dead: dict[str, str] = field(default_factory=dict)  # what died on its own: why
    error: str | None = None
    interrupted: bool = False
    running: bool = False
    topology: dict[str, Any] | None = None

    @property
    def died(self) -> list[str]:
        return [f"{name}: {reason}" for name, reason in self.dead.items()]

    def say(self, text: str) -> None:
        emit(f"ringmesh up: {text}", self.out)

    def check(self) -> None:
        if self.stop.is_set():
            raise _Interrupted

    # -- the whole run -------------------------------------------------------------------

    def main(self, duration: float | None, etcd_members: int) -> None:
        etcd = EmbeddedEtcd(members=etcd_members)  # stop() removes its data dir
        self.run_dir = Path(tempfile.mkdtemp(prefix="ringmesh-meshfile-"))
        try:
            etcd.start()
            self.etcd_url = etcd.url
            try:
                self.start(etcd_members)
                self.running = True
                self.serve(duration, etcd)
            finally:
                self.topology = _read_topology(self.etcd_url)
                self.say("stopping")
                self.stop_all()
        except (_Interrupted, MeshError) as exc:
            # A terminal's Ctrl-C also reaches etcd and `ringmesh policy set`, so a
            # step that fails after it is the interruption, not an error.
            if self.stop.is_set() and not self.running:
                self.interrupted = True
            elif isinstance(exc, MeshError):
                self.error = str(exc)
        finally:
            etcd.stop()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def start(self, etcd_members: int) -> None:
        members = f" ({etcd_members} members)" if etcd_members > 1 else ""
        self.say(f"etcd at {self.etcd_url}{members}")
        self.say(f"{self.mesh.path}: {', '.join(_sizing(s) for s in self.mesh.services)}")
        policies = [s for s in self.mesh.services if s.policy is not None]
        for spec in policies:
            self.check()
            _policy_set(spec, self.etcd_url)
        if policies:
            self.check()
            commands = [f"--command={s.name}={self.template(s)}" for s in policies]
            argv = python_module(
                "ringmesh", "scaler", "--etcd", self.etcd_url, "--id", "up-scaler",
                "--interval", "1", "--actuator", "local", *commands,
            )  # fmt: skip
            self.scaler = Child("scaler", argv)
        for spec in self.mesh.services:
            for index in range(1, (spec.replicas or 0) + 1):
                self.check()
                values = {"service": spec.name, "index": index, "etcd": self.etcd_url}
                argv = [w.format(prefix=DEFAULT_PREFIX, **values) for w in self.words(spec)]
                name = f"{spec.name}-{index}"
                self.replicas[name] = Child(f"instance {name}", argv)
        deadline = time.monotonic() + START_TIMEOUT_S
        while missing := self.missing():
            self.check()
            self.watch()
            if self.died:
                raise MeshError(f"while starting: {'; '.join(self.died)}")
            if time.monotonic() > deadline:
                raise MeshError(f"not running within {START_TIMEOUT_S:g} s: {', '.join(missing)}")
            self.stop.wait(POLL_S)

    def serve(self, duration: float | None, etcd: EmbeddedEtcd) -> None:
        self.say(f"e.g. ringmesh topology --etcd {self.etcd_url}")
        self.say("running; Ctrl-C to stop" if duration is None else f"running for {duration:g} s")
        deadline = None if duration is None else time.monotonic() + duration
        while not self.stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return
            self.watch()
            if not all(member.running() for member in etcd.members):
                self.dead.setdefault("etcd", "exited")
            if self.dead and not self.stop.is_set():
                raise MeshError(f"exited on its own: {'; '.join(self.died)}")
            self.stop.wait(POLL_S)

    # -- instances -----------------------------------------------------------------------

    def words(self, spec: ServiceSpec) -> list[str]:
        """The instance command as the local actuator's CommandLauncher takes it: words
        with its placeholders ({service}, {index}, {etcd}, {prefix}) and every other brace
        doubled, since it formats each word (the app's own placeholders pass through)."""
        assert self.run_dir is not None
        own = [
            *python_module("ringmesh.instance"),
            "--command", spec.command_line,
            "--cwd", str(self.mesh.directory),
            "--announce-dir", str(self.run_dir),
        ]  # fmt: skip
        escaped = [word.replace("{", "{{").replace("}", "}}") for word in own]
        sidecar = [word.replace("{", "{{").replace("}", "}}") for word in spec.sidecar_args()]
        return [
            *escaped,
            "--service", "{service}", "--index", "{index}", "--etcd", "{etcd}",
            "--prefix", "{prefix}", "--", *sidecar,
        ]  # fmt: skip

    def template(self, spec: ServiceSpec) -> str:
        """The scaler's ``--command SERVICE=TEMPLATE`` template (split with shlex)."""
        return shlex.join(self.words(spec))

    def watch(self) -> None:
        """Read the announcements: show new instances and gone ones, note deaths."""
        assert self.run_dir is not None
        now: dict[str, dict[str, Any]] = {}
        for path in self.run_dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text())
                if isinstance(record, dict):
                    now[path.stem] = record
        self.current = now
        self.announced.update(now)
        for name, record in sorted(now.items()):
            if record.get("state") == "running" and name not in self.shown:
                self.shown.add(name)
                self.say(
                    f"{name} ({record.get('service')}): app 127.0.0.1:{record.get('port')}, "
                    f"outbound {record.get('outbound')}, inbound {record.get('address')}"
                )
            if record.get("state") == "died":
                self.dead.setdefault(name, str(record.get("reason")))
        for name in sorted(self.shown - now.keys()):
            self.shown.discard(name)
            if name not in self.dead:
                self.say(f"{name} stopped")
        for name, child in self.replicas.items():
            if not child.alive():
                self.dead.setdefault(name, f"exited with {child.proc.returncode}")
        if self.scaler is not None and not self.scaler.alive():
            self.dead.setdefault("scaler", f"exited with {self.scaler.proc.returncode}")

    def missing(self) -> list[str]:
        """What start-up still waits for."""
        running = [r for r in self.current.values() if r.get("state") == "running"]
        missing = [n for n in self.replicas if self.current.get(n, {}).get("state") != "running"]
        for spec in self.mesh.services:
            if spec.policy is None:
                continue
            count = sum(1 for r in running if r.get("service") == spec.name)
            if count < spec.policy.min_replicas:
                missing.append(f"{spec.name} ({count} of {spec.policy.min_replicas} running)")
        return missing

    def stop_all(self) -> None:
        """SIGTERM everything at once (instances drain together), wait, then kill (at
        once after a second signal); then whatever an instance that was killed left
        behind."""
        children = [*self.replicas.values(), *([self.scaler] if self.scaler else [])]
        stop_all(children, STOP_TIMEOUT_S, hurry=self.hurry)
        assert self.run_dir is not None
        for path in self.run_dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text())
                pids = record.get("pids", {}) if isinstance(record, dict) else {}
                for role, pid in pids.items():
                    if not isinstance(pid, int) or pid <= 1:
                        continue
                    with contextlib.suppress(OSError):
                        if role == "app":
                            # It leads a process group of its own (no pid is reused while
                            # its group lives): whatever it started goes too.
                            os.killpg(pid, signal.SIGKILL)
                        elif self.etcd_url.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                            os.kill(pid, signal.SIGKILL)  # the instance, its sidecar

    # -- the summary ---------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        topology = self.topology or {"revision": None, "leader": None, "services": {}}
        announced = self.announced
        services: dict[str, Any] = {}
        for spec in self.mesh.services:
            body = dict(topology["services"].get(spec.name, {"live": 0, "instances": []}))
            for instance in body.get("instances", []):
                record = announced.get(instance["id"], {})
                if record.get("port") is not None:
                    instance["app"] = f"127.0.0.1:{record['port']}"
                instance["outbound"] = record.get("outbound")
                instance["pids"] = record.get("pids", {})
            body["command"] = spec.command_text
            body["replicas"] = spec.replicas
            body["policy"] = json.loads(spec.policy.to_json()) if spec.policy else None
            services[spec.name] = body
        return {
            "ok": self.error is None and not self.interrupted and not self.died,
            "error": "interrupted while starting" if self.interrupted else self.error,
            "died": self.died,
            "file": str(self.mesh.path),
            "etcd": self.etcd_url,
            "revision": topology["revision"],
            "leader": topology["leader"],
            "services": services,
        }

    def print_summary(self, doc: dict[str, Any]) -> None:
        if not self.running:
            return
        for name, body in doc["services"].items():
            ids = ", ".join(i["id"] for i in body["instances"]) or "none"
            self.say(f"{name}: {body['live']} live at the end ({ids})")


def _sizing(spec: ServiceSpec) -> str:
    if spec.policy is None:
        return f"{spec.name} x{spec.replicas}"
    p = spec.policy
    return f"{spec.name} {p.min_replicas}-{p.max_replicas} on {p.metric} (target {p.target:g})"


def _policy_set(spec: ServiceSpec, etcd_url: str) -> None:
    policy = spec.policy
    assert policy is not None
    args = [
        "policy", "set", spec.name,
        "--min", str(policy.min_replicas), "--max", str(policy.max_replicas),
        "--metric", policy.metric, "--target", repr(policy.target),
        "--tolerance", repr(policy.tolerance),
        "--scale-up-window", repr(policy.scale_up_window_s),
        "--scale-down-window", repr(policy.scale_down_window_s),
        "--mode", policy.mode, "--etcd", etcd_url,
    ]  # fmt: skip
    done = subprocess.run(
        python_module("ringmesh", *args), capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise MeshError(f"ringmesh policy set {spec.name} failed: {done.stderr.strip()}")


def _read_topology(etcd_url: str) -> dict[str, Any] | None:
    """What etcd says runs now (`ringmesh topology --json`'s document), None if it cannot
    be read within a few seconds."""
    from registry.election import read_leader
    from registry.etcd import EtcdClient, EtcdConfig
    from registry.keys import KeyLayout
    from registry.topology import read_topology
    from ringmesh.inspect import Scaling, topology_document
    from scaler.leader import read_targets

    async def read() -> dict[str, Any]:
        layout = KeyLayout(DEFAULT_PREFIX)
        async with asyncio.timeout(5), EtcdClient(EtcdConfig.from_urls(etcd_url)) as client:
            topology = await read_topology(client, layout)
            scaling = Scaling(await read_targets(client, layout), await read_leader(client, layout))
            ttls = {}
            for ids in topology.services.values():
                for entry in ids.values():
                    if entry.lease and entry.lease not in ttls:
                        ttls[entry.lease] = await client.lease_ttl(entry.lease)
        return topology_document(topology, ttls, scaling)

    if not etcd_url:
        return None
    try:
        return asyncio.run(read())
    except (MeshError, TimeoutError, OSError):
        return None
