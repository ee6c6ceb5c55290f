"""Where etcd is and how to reach it: parsed once from flags, validated, no I/O but DNS."""

from __future__ import annotations

import ipaddress
import math
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from registry.errors import ConfigError

DEFAULT_ETCD = "http://127.0.0.1:2379"


@dataclass(frozen=True)
class EtcdConfig:
    """Where etcd is and how to authenticate; built once from flags."""

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    timeout: float = 3.0
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = None

    @classmethod
    def from_urls(cls, urls: str, **options: Any) -> EtcdConfig:
        """Parse ``http://a:2379,https://b:2379``; https (or a CA file) turns TLS on.

        ``http://user:password@host:2379`` sets the credentials, like etcdctl's
        ``--user``; every URL carrying some must carry the same, and flags
        (``user=``/``password=``) may not say otherwise.
        """
        endpoints: list[str] = []
        schemes: set[str] = set()
        credentials: set[tuple[str, str]] = set()
        for url in (u.strip() for u in urls.split(",")):
            if not url:
                continue
            if "://" not in url:
                url = "http://" + url
            shown = _without_password(url)
            try:
                parts = urlsplit(url)
            except ValueError as exc:  # e.g. "http://[::1" or "http://[zz]:1"
                raise ConfigError(f"invalid etcd endpoint {shown!r}: {exc}") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"invalid etcd endpoint {shown!r}: expected http(s)://HOST:PORT")
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ConfigError(f"invalid etcd endpoint {shown!r}: expected no path or query")
            try:
                port = 2379 if parts.port is None else parts.port
            except ValueError as exc:
                raise ConfigError(f"invalid etcd endpoint {shown!r}: {exc}") from exc
            if port == 0:
                raise ConfigError(f"invalid etcd endpoint {shown!r}: port 0")
            if parts.username is not None:
                if parts.password is None:
                    raise ConfigError(f"etcd endpoint {shown!r} names a user but no password")
                credentials.add((unquote(parts.username), unquote(parts.password)))
            host = parts.hostname
            endpoints.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            schemes.add(parts.scheme)
        if not endpoints:
            raise ConfigError("no etcd endpoint given")
        if len(schemes) > 1:
            raise ConfigError("etcd endpoints mix http and https")
        if len(credentials) > 1:
            raise ConfigError("etcd endpoints carry different credentials")
        if credentials:
            user, password = credentials.pop()
            flagged = (options.get("user"), options.get("password"))
            if flagged != (None, None) and flagged != (user, password):
                raise ConfigError(
                    "etcd credentials given both in the URL and as flags, differently"
                )
            options = {**options, "user": user, "password": password}
        tls = "https" in schemes or any(options.get(k) for k in ("ca_file", "cert_file"))
        config = cls(endpoints=tuple(endpoints), tls=tls, **options)
        config.validate()
        return config

    def validate(self) -> None:
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(
                f"etcd timeout must be a finite number of seconds > 0, got {self.timeout!r}"
            )
        if (self.user is None) != (self.password is None):
            raise ConfigError("etcd user and password must be given together")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("etcd client certificate and key must be given together")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"etcd TLS file not found: {path}")

    def grpc_target(self) -> str:
        """One gRPC target for all endpoints: ``ipv4:a:p,b:p`` lets gRPC fail over."""
        if len(self.endpoints) == 1:
            return self.endpoints[0]
        resolved = [_resolve(endpoint) for endpoint in self.endpoints]
        families = {family for family, _ in resolved}
        if len(families) > 1:
            raise ConfigError("etcd endpoints mix IPv4 and IPv6 addresses")
        return f"{families.pop()}:" + ",".join(address for _, address in resolved)


def _without_password(url: str) -> str:
    """``url`` fit for an error message, even one urlsplit cannot parse.

    Everything between the user's ``:`` and the last ``@`` is hidden: that
    over-hides rather than leaks when the password itself holds ``@`` or ``/``.
    """
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{host}"


def _resolve(endpoint: str) -> tuple[str, str]:
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"cannot resolve etcd endpoint {endpoint!r}: {exc}") from exc
        ip = ipaddress.ip_address(info[0][4][0])
    if ip.version == 6:
        return "ipv6", f"[{ip}]:{port}"
    return "ipv4", f"{ip}:{port}"
