"""The sidecar's configuration: one frozen value, validated once at start-up."""

from __future__ import annotations

import ipaddress
import math
import socket
from dataclasses import dataclass, field

from registry.errors import ConfigError
from registry.etcd import EtcdConfig
from registry.keys import DEFAULT_PREFIX, validate_instance_id, validate_service
from registry.records import validate_weight


def split_hostport(value: str, *, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ConfigError(f"invalid {what} {value!r}: expected HOST:PORT")
    return host or "0.0.0.0", int(port)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SidecarConfig:
    service: str
    app: str | None = None  # None: outbound only (a job or gateway), registers nothing
    outbound: str = "127.0.0.1:15001"
    inbound: str = "0.0.0.0:15002"
    advertise: str | None = None
    admin: str = "127.0.0.1:15090"
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    prefix: str = DEFAULT_PREFIX
    instance_id: str | None = None
    zone: str = ""
    weight: int = 1
    ttl: int = 10
    drain_grace: float = 10.0
    idempotent: tuple[str, ...] = ()
    report_interval: float = 1.0
    otlp_endpoint: str | None = None  # OTEL_EXPORTER_OTLP_ENDPOINT (ringmesh.options)
    tls_dir: str | None = None  # mutual TLS between sidecars: cert.pem, key.pem, ca.pem
    # Services this sidecar watches (its own included when it has an app); empty: all.
    watch: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_service(self.service)
        for name in self.watch:
            validate_service(name)
        if self.app is not None:
            split_hostport(self.app, what="--app address")
        host, _ = split_hostport(self.outbound, what="--outbound address")
        if not is_loopback(host):
            raise ConfigError(
                f"--outbound {self.outbound!r} is not a loopback address: "
                "the outbound port must never be an open proxy"
            )
        split_hostport(self.inbound, what="--inbound address")
        split_hostport(self.admin, what="--admin address")
        if self.advertise is not None:
            host, port = split_hostport(self.advertise, what="--advertise address")
            if port == 0 or host in ("0.0.0.0", "::"):
                raise ConfigError(f"--advertise {self.advertise!r} must be a reachable HOST:PORT")
        if self.instance_id is not None:
            validate_instance_id(self.instance_id)
        validate_weight(self.weight)
        if self.ttl < 2:
            raise ConfigError(f"--ttl must be at least 2 seconds, got {self.ttl}")
        if not 0.1 <= self.report_interval <= 60:
            raise ConfigError(
                f"--report-interval must be 0.1-60 seconds, got {self.report_interval}"
            )
        if not (math.isfinite(self.drain_grace) and self.drain_grace >= 0):
            raise ConfigError(
                f"--drain-grace must be a finite number of seconds >= 0, got {self.drain_grace}"
            )

    def watched(self) -> tuple[str, ...]:
        """The services whose instances it watches; () for the whole ``instances/`` prefix.
        With an app its own service is always in: registration waits to see its record."""
        if not self.watch:
            return ()
        own = {self.service} if self.app is not None else set()
        return tuple(sorted(set(self.watch) | own))

    def advertised(self, inbound_port: int) -> str:
        """The address peers dial: --advertise, else the inbound host (or this host's IP)."""
        if self.advertise is not None:
            return self.advertise
        host, _ = split_hostport(self.inbound, what="--inbound address")
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostbyname(socket.gethostname())
        return join_hostport(host, inbound_port)

    def default_instance_id(self, inbound_port: int) -> str:
        """Stable across restarts of the same instance, so it gets its keys back."""
        raw = f"{socket.gethostname()}-{inbound_port}"
        cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in raw).strip("-._")
        return validate_instance_id(cleaned[-128:].lstrip("-._") or f"instance-{inbound_port}")
