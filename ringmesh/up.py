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
            reply = stub.Echo(
                demo_pb2.EchoRequest(text=key),
                metadata=(("ringmesh-service", SERVICE), ("ringmesh-hash-key", key)),
                timeout=5,
            )
            _say(f"  key {key!r:>10} -> {reply.instance}")


def _wait_for_instances(mesh: LocalMesh, etcd_url: str, count: int, stop: threading.Event) -> None:
    from ringmesh.inspect import count_serving

    deadline = time.monotonic() + 60
    while count_serving(etcd_url, mesh.prefix, SERVICE) < count:
        if stop.is_set() or time.monotonic() > deadline:
            raise MeshError(
                f"the scaler did not start {count} instance(s) of {SERVICE!r} within 60 s"
            )
        time.sleep(0.2)


def run_up(*, replicas: int, duration: float | None) -> int:
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with EmbeddedEtcd() as etcd, LocalMesh(etcd.url) as mesh:
        scaler: Child | None = None
        try:
            _say(f"etcd at {etcd.url}")
            _ringmesh("policy", "set", SERVICE, "--min", str(replicas), "--max", str(replicas * 3),
                      "--metric", "inflight", "--target", "5", "--scale-down-window", "30",
                      "--etcd", etcd.url)  # fmt: skip
            scaler = Child(
                "scaler",
                python_module("ringmesh", "scaler", "--etcd", etcd.url, "--id", "up-scaler", "--interval", "1",
                              "--actuator", "local", "--command", f"{SERVICE}={INSTANCE_TEMPLATE}"),
            )  # fmt: skip
            mesh.children.append(scaler)
            scaler.wait_event("leading")
            _wait_for_instances(mesh, etcd.url, replicas, stop)
            outbound = mesh.add("client", "client-1").outbound
            _say(f"{replicas} instance(s) of '{SERVICE}' registered; call them through {outbound}")
            _say(
                f"  policy: {SERVICE} scales {replicas}-{replicas * 3} on in-flight calls (target 5 each)"
            )
            _say(f"  e.g. ringmesh topology --etcd {etcd.url}")
            _say(f"       ringmesh route {SERVICE} user-42 --etcd {etcd.url}")
            _show_routing(outbound, ["user-1", "user-2", "user-3", "user-42", "order-7"])
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
