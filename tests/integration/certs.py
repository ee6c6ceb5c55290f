"""A throwaway PKI for TLS tests, made with the ``openssl`` command line.

One CA, a server certificate for 127.0.0.1 (and localhost) and a client
certificate, all EC P-256 keys valid for a day. Nothing here is secret.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def openssl() -> str | None:
    """Path of the openssl command, or None if it is not installed."""
    return shutil.which("openssl") or (
        "/usr/bin/openssl" if Path("/usr/bin/openssl").is_file() else None
    )


def _run(*args: str, cwd: Path) -> None:
    binary = openssl()
    if binary is None:
        raise RuntimeError("openssl not found")
    done = subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr.strip()}")


def _issue(directory: Path, name: str, cn: str, extensions: str, serial: int) -> None:
    """A key and a certificate for ``name``, signed by the CA in ``directory``."""
    _run(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=directory,
    )  # fmt: skip
    (directory / f"{name}.ext").write_text(extensions)
    _run(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", str(serial), "-days", "1", "-sha256",
        "-extfile", f"{name}.ext", "-out", f"{name}.crt",
        cwd=directory,
    )  # fmt: skip


def make_pki(directory: Path) -> Pki:
    """Write ca.crt, server.{crt,key} and client.{crt,key} into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    _run(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-sha256",
        "-subj", "/CN=ringmesh-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _issue(
        directory,
        "server",
        "etcd-server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n",
        serial=2,
    )
    _issue(
        directory,
        "client",
        "ringmesh-client",
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
        serial=3,
    )
    return Pki(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
