"""`ringmesh up`: a whole mesh on this machine with one command.

Embedded etcd; a policy for the demo service; a scaler with the local
actuator, which starts the demo instances (app + sidecar each) and keeps
their count on target; and a client instance whose outbound port you can
call. Stops everything on Ctrl-C, SIGTERM, or after ``--for SECONDS``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from types import FrameType

import grpc

from proto import demo_pb2, demo_pb2_grpc
from registry.embedded import EmbeddedEtcd
from registry.errors import ConfigError, MeshError
from ringmesh.localmesh import LocalMesh
from ringmesh.procs import Child, python_module

SERVICE = "demo"
INSTANCE_TEMPLATE = f"{sys.executable} -m ringmesh.instance --service {{service}} --index {{index}} --etcd {{etcd}} --prefix {{prefix}}"


def _say(text: str) -> None:
    print(f"ringmesh up: {text}", flush=True)


class _Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while the mesh was starting."""


def _check(stop: threading.Event) -> None:
    if stop.is_set():
        raise _Interrupted


def _ringmesh(*args: str) -> None:
    done = subprocess.run(
        python_module("ringmesh", *args), capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise MeshError(f"ringmesh {' '.join(args[:2])} failed: {done.stderr.strip()}")


def _show_routing(outbound: str, keys: list[str]) -> None:
    with grpc.insecure_channel(outbound) as channel:
        stub = demo_pb2_grpc.DemoStub(channel)
        for key in keys:
            try:
                reply = stub.Echo(
                    demo_pb2.EchoRequest(text=key),
                    metadata=(("ringmesh-service", SERVICE), ("ringmesh-hash-key", key)),
                    timeout=5,
                )
            except grpc.RpcError as exc:
                raise MeshError(
                    f"calling {SERVICE!r} through {outbound} failed: {_rpc(exc)}"
                ) from exc
            _say(f"  key {key!r:>10} -> {reply.instance}")


def _rpc(exc: grpc.RpcError) -> str:
    """A failed call as one line: ``UNAVAILABLE: details``."""
    if not isinstance(exc, grpc.Call):
        return " ".join(str(exc).split())
    return f"{exc.code().name}: {' '.join((exc.details() or '').split())}".rstrip(": ")


def _wait_event(child: Child, name: str, stop: threading.Event, timeout: float = 30.0) -> None:
    """``child.wait_event(name)``, but Ctrl-C does not wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        _check(stop)
        try:
            child.wait_event(name, timeout=0.2)
            return
        except MeshError:
            if not child.alive():
                code = child.proc.returncode
                raise MeshError(f"{child.name} exited with {code} before {name!r}") from None
            if time.monotonic() >= deadline:
                raise MeshError(f"{child.name}: no {name!r} event within {timeout:g} s") from None


def _wait_for_instances(mesh: LocalMesh, etcd_url: str, count: int, stop: threading.Event) -> None:
    from ringmesh.inspect import count_serving

    deadline = time.monotonic() + 60
    while count_serving(etcd_url, mesh.prefix, SERVICE) < count:
        _check(stop)
        if time.monotonic() > deadline:
            raise MeshError(
                f"the scaler did not start {count} instance(s) of {SERVICE!r} within 60 s"
            )
        stop.wait(0.2)


def run_up(*, replicas: int, duration: float | None, etcd_members: int = 1) -> int:
    """Run the local mesh; 0 when stopped after it came up, 128+signal when stopped before.

    Ctrl-C during start-up means the mesh never came up, so the exit status
    says "interrupted" (130, like any interrupted command) rather than
    success, and a script's `ringmesh up && ...` does not go on. Ctrl-C once
    it runs is the advertised way to stop it: 0.
    """
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}")
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _up(replicas, duration, stop, etcd_members)
    except (_Interrupted, MeshError):
        # A terminal's Ctrl-C also reaches etcd and `ringmesh policy set`, so
        # a step that fails after it is the interruption, not an error.
        if not stop.is_set():
            raise
        return 128 + received[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _up(replicas: int, duration: float | None, stop: threading.Event, etcd_members: int) -> int:
    with EmbeddedEtcd(members=etcd_members) as etcd, LocalMesh(etcd.url) as mesh:
        try:
            _say(f"etcd at {etcd.url}" + (f" ({etcd_members} members)" if etcd_members > 1 else ""))
            _check(stop)
            _ringmesh("policy", "set", SERVICE, "--min", str(replicas), "--max", str(replicas * 3),
                      "--metric", "inflight", "--target", "5", "--scale-down-window", "30",
                      "--etcd", etcd.url)  # fmt: skip
            _check(stop)
            scaler = Child(
                "scaler",
                python_module("ringmesh", "scaler", "--etcd", etcd.url, "--id", "up-scaler", "--interval", "1",
                              "--actuator", "local", "--command", f"{SERVICE}={INSTANCE_TEMPLATE}"),
            )  # fmt: skip
            mesh.children.append(scaler)
            _wait_event(scaler, "leading", stop)
            _wait_for_instances(mesh, etcd.url, replicas, stop)
            client = mesh.add("client", "client-1", wait=False)
            _wait_event(client.sidecar, "registered", stop)
            _say(
                f"{replicas} instance(s) of '{SERVICE}' registered; call them through {client.outbound}"
            )
            _say(
                f"  policy: {SERVICE} scales {replicas}-{replicas * 3} on in-flight calls (target 5 each)"
            )
            _say(f"  e.g. ringmesh topology --etcd {etcd.url}")
            _say(f"       ringmesh route {SERVICE} user-42 --etcd {etcd.url}")
            _show_routing(client.outbound, ["user-1", "user-2", "user-3", "user-42", "order-7"])
            _check(stop)
            deadline = None if duration is None else time.monotonic() + duration
            _say("running; Ctrl-C to stop" if deadline is None else f"running for {duration:g} s")
            while not stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                dead = [c.name for c in mesh.children if not c.alive()]
                if dead:
                    _say(f"stopped unexpectedly: {', '.join(dead)}")
                    return 1
                stop.wait(0.2)
            return 0
        finally:
            _say("stopping")


if __name__ == "__main__":
    sys.exit(run_up(replicas=3, duration=None))
