"""nginx as a gRPC proxy for bench/bench_proxy.py: install it if missing, run one instance.

Each instance runs in the foreground (``daemon off``) from a config written to its own
temp directory: one worker process, no access log, HTTP/2 cleartext on 127.0.0.1, and
``grpc_pass`` to an upstream block with ``keepalive 64`` (nginx sends each call upstream
on a connection of its own, which it then keeps for the next call).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def install_nginx(timeout: float = 600.0) -> tuple[str | None, str]:
    """(the binary, "") once installed from Debian's packages, or (None, why not).

    The package's post-install script would start a system nginx on port 80; a
    ``policy-rc.d`` that says no (Debian's own switch for this, put there only if
    there is none) keeps it from starting.
    """
    if shutil.which("apt-get") is None:
        return None, "no apt-get on this machine"
    added_policy = False
    try:
        if not POLICY_RC_D.exists():
            POLICY_RC_D.write_text("#!/bin/sh\n# bench/nginx.py: no service starts\nexit 101\n")
            POLICY_RC_D.chmod(0o755)
            added_policy = True
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        deadline = time.monotonic() + timeout
        update = subprocess.run(
            ["apt-get", "update", "-qq"],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if update.returncode != 0:
            return None, f"apt-get update failed: {_last_line(update.stderr)}"
        why = ""
        for package in ("nginx", "nginx-light"):
            left = max(deadline - time.monotonic(), 1.0)
            done = subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                capture_output=True,
                text=True,
                env=env,
                timeout=left,
                check=False,
            )
            binary = nginx_binary()
            if done.returncode == 0 and binary:
                return binary, ""
            why = f"apt-get install {package} failed: {_last_line(done.stderr)}"
        return None, why
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"installing nginx failed: {exc}"
    finally:
        if added_policy:
            POLICY_RC_D.unlink(missing_ok=True)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def nginx_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    return tuple(int(g) for g in match.groups()) if match else (0, 0, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(directory: Path, port: int, upstream: str, version: tuple[int, ...]) -> str:
    # nginx 1.25.1 moved HTTP/2 from a listen parameter to its own directive.
    listen = (
        f"listen 127.0.0.1:{port};\n        http2 on;"
        if version >= (1, 25, 1)
        else f"listen 127.0.0.1:{port} http2;"
    )
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    # A caller's connection is not closed after 1,000 calls (the default).
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    upstream app {{
        server {upstream};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 600s;
    }}
    server {{
        {listen}
        location / {{
            grpc_pass grpc://app;
        }}
    }}
}}
"""


class Nginx:
    """One nginx (master + 1 worker) proxying gRPC from 127.0.0.1:<port> to ``upstream``."""

    def __init__(self, binary: str, upstream: str, name: str = "nginx") -> None:
        self.binary = binary
        self.upstream = upstream
        self.name = name
        self.directory = Path(tempfile.mkdtemp(prefix=f"ringmesh-bench-{name}-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _argv(self, *extra: str) -> list[str]:
        argv = [self.binary, "-p", str(self.directory), "-c", str(self.directory / "nginx.conf")]
        if nginx_version(self.binary) >= (1, 19, 5):
            argv += ["-e", str(self.directory / "error.log")]  # not /var/log, even at start
        return [*argv, *extra]

    def start(self, within: float = 10.0) -> None:
        version = nginx_version(self.binary)
        (self.directory / "nginx.conf").write_text(
            config_text(self.directory, self.port, self.upstream, version)
        )
        test = subprocess.run(
            self._argv("-t"), capture_output=True, text=True, timeout=30, check=False
        )
        if test.returncode != 0:
            raise RuntimeError(f"{self.name}: config test failed: {_last_line(test.stderr)}")
        log = open(self.directory / "stderr.log", "wb")  # noqa: SIM115 - closed below
        try:
            self.proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log()}")
            if self.workers() and _accepts(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: not listening on {self.address} within {within} s")

    def log(self) -> str:
        texts = []
        for name in ("stderr.log", "error.log"):
            path = self.directory / name
            if path.exists():
                texts.append(path.read_text(errors="replace").strip())
        return _last_line("\n".join(texts))

    def workers(self) -> list[int]:
        """The master's children (its worker), from /proc."""
        if self.proc is None:
            return []
        master = self.proc.pid
        children = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == master:
                children.append(int(entry))
        return sorted(children)

    def pids(self) -> list[int]:
        """Master and worker(s): the CPU of the proxy is all of theirs."""
        return ([self.proc.pid] if self.proc is not None else []) + self.workers()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGQUIT (graceful), then SIGTERM, then SIGKILL of the whole session."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.poll() is None:
                for sig, wait in ((signal.SIGQUIT, timeout / 2), (signal.SIGTERM, timeout / 2)):
                    proc.send_signal(sig)
                    try:
                        proc.wait(timeout=wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: master and worker
                    proc.wait()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
