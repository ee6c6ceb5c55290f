"""One instance as one command: an app and its sidecar, stopped together.

What ``ringmesh up`` gives the local actuator as its command template:
``python -m ringmesh.instance --service demo --index 3 --etcd URL`` runs the
demo app. With ``--command TEMPLATE`` it runs that app instead (what
``ringmesh up -f mesh.yaml`` does): the placeholders of a mesh file's
commands are filled in ({port}, {outbound}, {etcd}, {service}, {instance},
{python}), the app is started in ``--cwd`` and its output is shown on stderr
with the instance id in front; once its port accepts connections the sidecar
starts on the outbound port the app was told. With ``--announce-dir DIR`` the
instance keeps ``DIR/<id>.json`` up to date (state, ports, pids; the reason if
it died), and removes it when it was stopped.

On SIGTERM the sidecar drains first (the app keeps serving meanwhile), then
the app stops; exit 0. If either dies on its own, the other is stopped, exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

from registry.embedded import free_port
from registry.errors import MeshError
from registry.keys import DEFAULT_PREFIX
from ringmesh.localmesh import LocalMesh
from ringmesh.meshfile import expand_command
from ringmesh.procs import Child, sidecar

SIDECAR_STOP_S = 20.0  # its drain (--drain-grace 10 by default), then deregistering
APP_STOP_S = 10.0
_output_lock = threading.Lock()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ringmesh.instance", description=__doc__)
    parser.add_argument("--service", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX)
    parser.add_argument(
        "--command", help="the app's command line, with mesh file placeholders (default: demo)"
    )
    parser.add_argument("--cwd", help="the app's working directory (with --command)")
    parser.add_argument(
        "--announce-dir", type=Path, help="keep DIR/<id>.json on this instance (with --command)"
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=60.0,
        help="seconds for the app to listen and the sidecar to register (with --command)",
    )
    parser.add_argument("sidecar_args", nargs="*", help="extra sidecar flags (after --)")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.command is not None:
        try:
            app_instance = _AppInstance(args, stop)
        except (KeyError, IndexError, ValueError) as exc:
            parser.error(f"--command {args.command!r}: {exc!r} (see ringmesh/meshfile.py)")
        return app_instance.run()
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


class _Died(Exception):
    """The app or the sidecar ended (or never started) on its own."""


class _AppInstance:
    def __init__(self, args: argparse.Namespace, stop: threading.Event) -> None:
        self.args = args
        self.stop = stop
        self.service: str = args.service
        self.name = f"{args.service}-{args.index}"
        self.port = free_port()
        outbound = free_port()
        while outbound == self.port:
            outbound = free_port()
        self.outbound = f"127.0.0.1:{outbound}"
        values = {
            "port": str(self.port),
            "outbound": self.outbound,
            "etcd": args.etcd,
            "service": self.service,
            "instance": self.name,
            "python": sys.executable,
        }
        self.argv = expand_command(shlex.split(args.command), values)
        self.app: subprocess.Popen[bytes] | None = None
        self.sidecar: Child | None = None
        self.state: dict[str, Any] = {"service": self.service, "instance": self.name}
        self.pumps: list[tuple[threading.Thread, IO[bytes]]] = []

    def run(self) -> int:
        try:
            self._start()
            while not self.stop.wait(0.2):
                self._check()
            return 0
        except _Died as exc:
            reason = str(exc)
            _say(f"ringmesh.instance {self.name}: {reason}")
            self.state.update(state="died", reason=reason)
            return 1
        finally:
            self._stop_children()
            if self.state.get("state") == "died":
                self.state["pids"] = {}
                self._announce()
            else:
                self._unannounce()

    def _start(self) -> None:
        try:
            self.app = subprocess.Popen(
                self.argv,
                cwd=self.args.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stopped with whatever it starts
            )
        except OSError as exc:
            raise _Died(f"cannot run {self.argv[0]!r}: {exc.strerror}") from exc
        self._pump(self.app.stdout, f"{self.name} | ")
        self.state.update(state="starting", pids={"instance": os.getpid(), "app": self.app.pid})
        self._announce()
        deadline = time.monotonic() + self.args.start_timeout
        while not _accepts(self.port):
            if self.stop.wait(0.05):
                return
            self._check(what=f"before listening on port {self.port}")
            if time.monotonic() > deadline:
                raise _Died(
                    f"the app did not listen on 127.0.0.1:{self.port} within "
                    f"{self.args.start_timeout:g} s (it must listen on the {{port}} it is given)"
                )
        self.sidecar = sidecar(
            self.service, f"127.0.0.1:{self.port}", self.args.etcd,
            "--prefix", self.args.prefix, "--instance-id", self.name,
            "--outbound", self.outbound, *self.args.sidecar_args,
            name=f"sidecar {self.name}", stderr=subprocess.PIPE,
        )  # fmt: skip
        self._pump(self.sidecar.proc.stderr, f"{self.name} sidecar | ")
        self.state["pids"] = {
            "instance": os.getpid(),
            "app": self.app.pid,
            "sidecar": self.sidecar.pid,
        }
        self._announce()
        while True:
            if self.stop.is_set():
                return
            self._check(what="before the sidecar registered")
            try:
                info = self.sidecar.wait_event("registered", timeout=0.2)
                break
            except MeshError:
                if time.monotonic() > deadline:
                    raise _Died(
                        f"the sidecar did not register within {self.args.start_timeout:g} s"
                    ) from None
        self.state.update(
            state="running",
            port=self.port,
            outbound=info.get("outbound", self.outbound),
            address=info.get("address"),
            admin=info.get("admin"),
        )
        self._announce()
        print(json.dumps({**info, "app": f"127.0.0.1:{self.port}"}), flush=True)

    def _check(self, what: str = "") -> None:
        suffix = f" {what}" if what else ""
        if self.app is not None and self.app.poll() is not None:
            raise _Died(f"the app {_ended(self.app.returncode)}{suffix}")
        if self.sidecar is not None and not self.sidecar.alive():
            raise _Died(f"the sidecar {_ended(self.sidecar.proc.returncode)}{suffix}")

    def _stop_children(self) -> None:
        """The sidecar first (it drains while the app still answers), then the app's group."""
        if self.sidecar is not None:
            self.sidecar.stop(timeout=SIDECAR_STOP_S)
        app = self.app
        if app is not None:
            _signal_group(app, signal.SIGTERM)
            try:
                app.wait(timeout=APP_STOP_S)
            except subprocess.TimeoutExpired:
                _say(f"ringmesh.instance {self.name}: the app did not stop in {APP_STOP_S:g} s")
                app.kill()
                app.wait()
            _signal_group(app, signal.SIGKILL)  # anything it started and left behind
        for pump, stream in self.pumps:
            pump.join(timeout=2)
            if not pump.is_alive():  # else a process it could not stop still writes
                stream.close()

    def _pump(self, stream: IO[bytes] | None, prefix: str) -> None:
        """Copy a child's output to stderr, line by line, ``prefix`` in front."""
        if stream is None:
            return

        def copy() -> None:
            for line in stream:
                text = line.decode(errors="replace").rstrip("\n")
                _say(f"{prefix}{text}")

        thread = threading.Thread(target=copy, name=f"pump {prefix}", daemon=True)
        thread.start()
        self.pumps.append((thread, stream))

    def _announce(self) -> None:
        directory: Path | None = self.args.announce_dir
        if directory is None:
            return
        path = directory / f"{self.name}.json"
        temporary = directory / f".{self.name}.json.tmp"
        with contextlib.suppress(OSError):  # the directory is gone: `up` is over
            temporary.write_text(json.dumps(self.state))
            os.replace(temporary, path)

    def _unannounce(self) -> None:
        directory: Path | None = self.args.announce_dir
        if directory is not None:
            with contextlib.suppress(OSError):
                (directory / f"{self.name}.json").unlink()


def _ended(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, sig)


def _say(text: str) -> None:
    # Never raises: a pump that stopped would leave the app blocked on a full pipe.
    with _output_lock, contextlib.suppress(OSError, ValueError):
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
