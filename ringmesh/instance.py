"""One demo instance as one command: the demo app and its sidecar, stopped together.

What ``ringmesh up`` gives the local actuator as its command template:
``python -m ringmesh.instance --service demo --index 3 --etcd URL``. On
SIGTERM the sidecar drains first (the app keeps serving meanwhile), then the
app stops; exit 0. If either dies on its own, the other is stopped, exit 1.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from types import FrameType

from registry.errors import MeshError
from registry.keys import DEFAULT_PREFIX
from ringmesh.localmesh import LocalMesh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ringmesh.instance", description=__doc__)
    parser.add_argument("--service", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX)
    parser.add_argument("sidecar_args", nargs="*", help="extra sidecar flags (after --)")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with LocalMesh(args.etcd, prefix=args.prefix) as mesh:
        name = f"{args.service}-{args.index}"
        instance = mesh.add(args.service, name, *args.sidecar_args, wait=False)
        # Registering can take a while (the sidecar's watch must show it): a SIGTERM
        # meanwhile stops both at once rather than after the registration.
        while True:
            if stop.is_set():
                return 0
            if not (instance.app.alive() and instance.sidecar.alive()):
                return 1
            try:
                info = instance.sidecar.wait_event("registered", timeout=0.2)
                break
            except MeshError:
                continue
        print(json.dumps(info), flush=True)
        while not stop.wait(0.2):
            if not (instance.app.alive() and instance.sidecar.alive()):
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
