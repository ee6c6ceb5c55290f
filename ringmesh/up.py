"""`ringmesh up`: the whole mesh at work on this machine, with one command.

It starts an embedded etcd, the cache demo service (proto/cache.proto: each
instance an app with a local cache in front of a slow backend, and its
sidecar), two scalers (one leads, the other stands by), an actuator that
makes the replica count follow the leader's targets, a client sidecar and
a load generator calling through it with a Zipf key mix; then tells the
story of ringmesh.story while a live view (ringmesh.view) shows it.

``--for SECONDS`` paces the story over SECONDS, stops, prints a summary
(``--json``: one JSON document) and exits 0 only if every step behaved.
Without it the story runs once and the mesh keeps serving until Ctrl-C.
Ctrl-C, SIGTERM or SIGHUP stops every process it started and removes its
temporary files; a second one stops them at once (SIGKILL) instead of
draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from registry.embedded import EmbeddedEtcd, free_port
from registry.errors import ConfigError, MeshError
from registry.etcd import EtcdClient, EtcdConfig
from registry.keys import DEFAULT_PREFIX, KeyLayout
from registry.scaling import Policy
from ringmesh.loadgen import LoadGenerator
from ringmesh.observe import MeshObserver, read_stats
from ringmesh.procs import Child, cache_app, python_module, sidecar
from ringmesh.story import (
    DEFAULT_DURATION_S,
    MAX_REPLICAS,
    MIN_DURATION_S,
    MIN_REPLICAS,
    SERVICE,
    TARGET_RPS,
    Story,
    summary_text,
)
from ringmesh.view import emit, live_view
from scaler.actuators import LocalActuator
from scaler.follow import follow_targets

SCALERS = ("scaler-a", "scaler-b")
IDEMPOTENT = "/ringmesh.cache.v1.Cache/*"  # Get reads; Put sets a value: both safe to repeat
INSTANCE_TTL_S = 5  # a killed instance's keys move once its lease expires
DRAIN_GRACE_S = 10
# A small cache with a long TTL: an instance can keep its share of the keys, not all of them
# (1,000 keys, Zipf 0.8: keyed ~70% hits vs unkeyed ~40% at 5 instances, simulated).
CACHE_ARGS = ("--miss-ms", "4", "--capacity", "300", "--ttl", "30")

# Ctrl-C, a supervisor's stop, and the terminal closing (tmux kill-session, ssh dropping).
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

T = TypeVar("T")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM."""


@dataclass
class Running:
    """One instance: the cache app and its sidecar."""

    id: str
    app: Child
    sidecar: Child

    def alive(self) -> bool:
        return self.app.alive() and self.sidecar.alive()

    def children(self) -> tuple[Child, Child]:
        return (self.sidecar, self.app)


@dataclass
class InstanceLauncher:
    """Starts cache instances for the local actuator; remembers every one it started."""

    etcd_url: str
    logs: Path
    prefix: str = DEFAULT_PREFIX
    started: list[Running] = field(default_factory=list)
    note: Callable[[str, str], object] = lambda kind, text: None  # the observer's event log
    _files: list[IO[bytes]] = field(default_factory=list)

    def log_file(self, name: str) -> IO[bytes]:
        """A child's stderr, kept until close()."""
        f = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self._files.append(f)
        return f

    def start(self, service: str, index: int) -> Running:
        instance_id = f"{service}-{index}"
        port = free_port()
        app = cache_app(
            instance_id, port=port, stderr=self.log_file(f"app-{instance_id}"), extra=CACHE_ARGS
        )
        side = sidecar(
            service, f"127.0.0.1:{port}", self.etcd_url,
            "--prefix", self.prefix, "--instance-id", instance_id,
            "--ttl", str(INSTANCE_TTL_S), "--drain-grace", str(DRAIN_GRACE_S),
            name=f"sidecar {instance_id}", stderr=self.log_file(f"sidecar-{instance_id}"),
        )  # fmt: skip
        running = Running(instance_id, app, side)
        self.started.append(running)
        return running

    async def stop(self, handle: Any) -> None:
        """Drain: the sidecar first (it serves until its calls are done), then the app."""
        running: Running = handle
        self.note("drain", f"SIGTERM {running.id}: drain its calls, then deregister")
        code = await asyncio.to_thread(running.sidecar.stop, DRAIN_GRACE_S + 5)
        await asyncio.to_thread(running.app.stop, 5)
        if code == 0:
            self.note("drained", f"{running.id} drained and exited")
        else:
            self.note("drain-failed", f"{running.id}'s sidecar exited with {code} while draining")

    def find(self, instance_id: str) -> Running | None:
        return next((r for r in self.started if r.id == instance_id and r.alive()), None)

    def kill_all(self) -> None:
        for running in self.started:
            for child in running.children():
                child.kill()

    def close(self) -> None:
        for running in self.started:
            for child in running.children():
                with contextlib.suppress(Exception):
                    child.stop(timeout=5)
        for f in self._files:
            f.close()
        self._files.clear()


class UpMesh:
    """The running mesh the story acts on (ringmesh.story.StoryMesh)."""

    def __init__(self, etcd_url: str, logs: Path) -> None:
        self.etcd_url = etcd_url
        self.layout = KeyLayout(DEFAULT_PREFIX)
        self.launcher = InstanceLauncher(etcd_url, logs)
        self.actuator = LocalActuator(self.launcher, alive=lambda handle: handle.alive())
        self.scalers: dict[str, Child] = {}
        self.others: list[Child] = []  # the client's sidecar
        self.rate = 0.0
        self.client: EtcdClient | None = None
        self.observer: MeshObserver  # set by start()
        self.loadgen: LoadGenerator
        self._tasks: list[asyncio.Task[None]] = []

    # -- what the story does --
    def set_rate(self, calls_per_s: float) -> None:
        self.rate = calls_per_s

    async def probe(self) -> bool:
        return await self.loadgen.probe()

    def kill(self, instance_id: str) -> None:
        running = self.launcher.find(instance_id)
        if running is None:
            raise MeshError(f"no running instance {instance_id!r} to kill")
        for child in running.children():
            child.kill()

    async def stop_scaler(self, scaler_id: str) -> None:
        child = self.scalers.pop(scaler_id)
        await asyncio.to_thread(child.stop, 15)

    async def start_scaler(self, scaler_id: str) -> None:
        child = Child(
            f"scaler {scaler_id}",
            python_module("ringmesh", "scaler", "--etcd", self.etcd_url, "--id", scaler_id,
                          "--interval", "1", "--actuator", "none"),
            stderr=self.launcher.log_file(scaler_id),
        )  # fmt: skip
        self.scalers[scaler_id] = child
        await asyncio.to_thread(child.wait_event, "candidate", 30.0)

    # -- bringing it up and down --
    async def start(self) -> str:
        """Everything but the story; returns the client sidecar's outbound address."""
        self.client = EtcdClient(EtcdConfig.from_urls(self.etcd_url))
        policy = Policy(
            min_replicas=MIN_REPLICAS, max_replicas=MAX_REPLICAS, metric="rps",
            target=TARGET_RPS, scale_down_window_s=5.0,
        )  # fmt: skip
        await self.client.put(self.layout.policy(SERVICE), policy.to_json(), lease=None)
        for scaler_id in SCALERS:
            await self.start_scaler(scaler_id)
        client = sidecar(
            "client", None, self.etcd_url, "--idempotent", IDEMPOTENT, "--watch", SERVICE,
            name="sidecar client", stderr=self.launcher.log_file("sidecar-client"),
        )  # fmt: skip
        self.others.append(client)
        ports = await asyncio.to_thread(client.wait_event, "ready", 30.0)
        outbound, admin = str(ports["outbound"]), str(ports["admin"])
        self.loadgen = LoadGenerator(outbound, service=SERVICE, rate=lambda: self.rate)
        self.observer = MeshObserver(
            self.client, self.layout, self.loadgen.tally, lambda: read_stats(admin)
        )
        self.launcher.note = self.observer.note
        self._tasks = [
            asyncio.create_task(
                follow_targets(self.client, self.layout, self.actuator, (SERVICE,))
            ),
            asyncio.create_task(self.observer.run()),
            asyncio.create_task(self.loadgen.run()),
        ]
        return outbound

    def check_alive(self) -> None:
        """A scaler or the client's sidecar that died on its own ends the run."""
        for child in (*self.scalers.values(), *self.others):
            if not child.alive():
                raise MeshError(f"{child.name} exited with {child.proc.returncode}")
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise MeshError(f"ringmesh up: {task.exception()}")

    async def stop(self) -> None:
        """The load first (so stopping costs no call), then instances (drained), then the rest."""
        self.rate = 0
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.actuator.aclose()
        finally:
            await asyncio.gather(
                *(asyncio.to_thread(c.stop, 10) for c in (*self.others, *self.scalers.values())),
                return_exceptions=True,
            )
            self.launcher.close()
            if self.client is not None:
                await self.client.aclose()

    def kill_all(self) -> None:
        """The second Ctrl-C: no draining, no waiting."""
        self.launcher.kill_all()
        for child in (*self.others, *self.scalers.values()):
            child.kill()


def run_up(*, duration: float | None, as_json: bool = False, etcd_members: int = 1) -> int:
    """Run the mesh and its story; the exit status is the story's (see the module doc)."""
    if duration is not None and duration < MIN_DURATION_S:
        raise ConfigError(
            f"--for must be at least {MIN_DURATION_S:g} s: the story scales out, fails over, "
            f"changes leader and scales in (got {duration:g})"
        )
    return asyncio.run(_run(duration, as_json, etcd_members))


async def _run(duration: float | None, as_json: bool, etcd_members: int) -> int:
    out = sys.stderr if as_json else sys.stdout

    def say(text: str) -> None:
        emit(f"ringmesh up: {text}", out)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []
    mesh: UpMesh | None = None

    def on_signal(signum: int) -> None:
        received.append(signum)
        if stop.is_set() and mesh is not None:
            say("stopping at once")
            mesh.kill_all()
        stop.set()

    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    logs = Path(tempfile.mkdtemp(prefix="ringmesh-up-"))
    etcd = EmbeddedEtcd(members=etcd_members)
    try:
        await _interruptible(asyncio.to_thread(etcd.start), stop)
        say(f"etcd at {etcd.url}" + (f" ({etcd_members} members)" if etcd_members > 1 else ""))
        mesh = UpMesh(etcd.url, logs)
        try:
            outbound = await _interruptible(mesh.start(), stop)
            say(
                f"{SERVICE}: {MIN_REPLICAS}-{MAX_REPLICAS} replicas at {TARGET_RPS:g} calls/s each; "
                f"scalers {', '.join(SCALERS)}; load through the client's sidecar at {outbound}"
            )
            say(f"inspect it: ringmesh topology --etcd {etcd.url}")
            return await _tell(mesh, duration, as_json, stop, say)
        except Interrupted:
            return 128 + received[0]
        finally:
            say("stopping")
            await mesh.stop()
    except Interrupted:
        return 128 + received[0]
    finally:
        await asyncio.to_thread(etcd.stop)
        shutil.rmtree(logs, ignore_errors=True)
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)


async def _interruptible(work: Awaitable[T], stop: asyncio.Event) -> T:
    """``await work``, unless Ctrl-C comes first: then Interrupted (work is cancelled)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise Interrupted
    return task.result()


async def _tell(
    mesh: UpMesh,
    duration: float | None,
    as_json: bool,
    stop: asyncio.Event,
    say: Callable[[str], None],
) -> int:
    story = Story(mesh, duration=duration or DEFAULT_DURATION_S)
    with live_view(mesh.observer, lambda: story.step, out=sys.stderr if as_json else sys.stdout):
        telling = asyncio.create_task(story.run())
        try:
            while not telling.done():
                mesh.check_alive()
                await _interruptible(asyncio.wait({telling}, timeout=0.2), stop)
        except Interrupted:
            telling.cancel()
            if duration is not None:
                raise  # the story did not finish: not a success
            return 0  # Ctrl-C is how an interactive `up` is stopped
        finally:
            if not telling.done():
                telling.cancel()
        ok = telling.result()
        if duration is None:
            story.step = "done; the mesh keeps serving (Ctrl-C to stop)"
            say(story.step)
            try:
                while True:
                    mesh.check_alive()
                    await _interruptible(asyncio.sleep(0.2), stop)
            except Interrupted:
                pass
    failed = next((r for r in story.results if not r.ok), None)
    doc = story.summary(ok=ok, failed_step=None if failed is None else failed.name)
    emit(json.dumps(doc, sort_keys=True) if as_json else summary_text(doc), sys.stdout)
    if failed is not None:
        say(f"step {failed.name!r} did not behave: {failed.detail}")
        return 1
    return 0
