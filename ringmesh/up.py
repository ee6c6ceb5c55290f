"""`ringmesh up`: a whole mesh on this machine with one command.

Embedded etcd, N instances of the demo service (app + sidecar each), and a
client instance whose outbound port you can call. Stops everything on
Ctrl-C, SIGTERM, or after ``--for SECONDS``.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType

import grpc

from proto import demo_pb2, demo_pb2_grpc
from registry.embedded import EmbeddedEtcd
from ringmesh.localmesh import LocalMesh

SERVICE = "demo"


def _say(text: str) -> None:
    print(f"ringmesh up: {text}", flush=True)


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


def run_up(*, replicas: int, duration: float | None) -> int:
    if replicas < 1:
        from registry.errors import ConfigError

        raise ConfigError(f"--replicas must be at least 1, got {replicas}")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with EmbeddedEtcd() as etcd, LocalMesh(etcd.url) as mesh:
        try:
            _say(f"etcd at {etcd.url}")
            for i in range(1, replicas + 1):
                mesh.add(SERVICE, f"{SERVICE}-{i}")
            outbound = mesh.add("client", "client-1").outbound
            _say(f"{replicas} instance(s) of '{SERVICE}' registered; call them through {outbound}")
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
