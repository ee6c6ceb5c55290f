"""The `ringmesh` command line. Exit 0 on success, 2 on a usage error, 1 otherwise."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from registry.errors import ConfigError, MeshError
from registry.etcd import EtcdClient
from registry.keys import KeyLayout, validate_service
from registry.roles import (
    RoleSpec,
    converge,
    read_password_file,
    scaler_role,
    sidecar_role,
    validate_user,
)
from registry.scaling import (
    DEFAULT_SCALE_DOWN_WINDOW_S,
    DEFAULT_SCALE_UP_WINDOW_S,
    DEFAULT_TOLERANCE,
    METRICS,
    MODES,
    REACTIVE,
)
from ringmesh.options import (
    EnvParser,
    add_etcd_options,
    etcd_config,
    otlp_endpoint,
    positive_seconds,
)

log = logging.getLogger("ringmesh")


def build_parser() -> EnvParser:
    parser = EnvParser(prog="ringmesh", description="A service mesh for gRPC services.")
    parser.option("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=EnvParser)

    sidecar = commands.add_parser("sidecar", help="run the sidecar of one service instance")
    sidecar.option("--service", required=True, help="this instance's service (a DNS label)")
    sidecar.option(
        "--app",
        metavar="HOST:PORT",
        help="the app's gRPC address (without it: outbound only, registers nothing)",
    )
    sidecar.option(
        "--outbound",
        default="127.0.0.1:15001",
        metavar="HOST:PORT",
        help="where the app sends its calls (loopback only)",
    )
    sidecar.option(
        "--inbound", default="0.0.0.0:15002", metavar="HOST:PORT", help="where peers call in"
    )
    sidecar.option("--advertise", metavar="HOST:PORT", help="address peers dial (default: inbound)")
    sidecar.option(
        "--admin", default="127.0.0.1:15090", metavar="HOST:PORT", help="probes and metrics"
    )
    sidecar.option("--instance-id", help="stable instance id (default: HOSTNAME-INBOUNDPORT)")
    sidecar.option("--zone", default="", help="zone label")
    sidecar.option("--weight", type=int, default=1, help="ring weight, 1-1000")
    sidecar.option("--ttl", type=int, default=10, help="lease TTL in seconds")
    sidecar.option(
        "--drain-grace", type=float, default=10.0, help="seconds to finish in-flight calls"
    )
    sidecar.option(
        "--idempotent",
        action="append",
        default=[],
        metavar="GLOB",
        help="method paths safe to retry, e.g. '/pkg.Svc/*' (repeatable; env: one per line)",
    )
    sidecar.option(
        "--watch",
        action="append",
        default=[],
        metavar="SERVICE",
        help="watch only these services' instances, not the whole mesh (repeatable; env: one per line)",
    )
    sidecar.option(
        "--report-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often the load/ record is written",
    )
    sidecar.option(
        "--tls-dir",
        metavar="DIR",
        help="this service's mesh certificate (cert.pem, key.pem, ca.pem, as `ringmesh certs issue` "
        "writes them): mutual TLS between sidecars",
    )
    add_etcd_options(sidecar)

    topology = commands.add_parser("topology", help="print services and instances from etcd")
    topology.option("--json", action="store_true", help="one JSON document on stdout")
    topology.option("--watch", action="store_true", help="print again on every change")
    add_etcd_options(topology)

    route = commands.add_parser("route", help="owner and failover order of a key")
    route.add_argument("service")
    route.add_argument("key")
    route.option("--json", action="store_true", help="one JSON document on stdout")
    add_etcd_options(route)

    scaler = commands.add_parser(
        "scaler", help="run a scaler (one of them leads, by etcd election)"
    )
    scaler.option("--id", dest="scaler_id", help="this scaler's id (default: HOSTNAME-PID)")
    scaler.option(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="evaluation period"
    )
    scaler.option("--actuator", choices=["none", "local", "kubernetes"], default="none")
    scaler.option("--ttl", type=int, default=10, help="election lease TTL in seconds")
    scaler.option("--max-total-replicas", type=int, metavar="N", help="global replica budget")
    scaler.option(
        "--command",
        dest="templates",
        action="append",
        default=[],
        metavar="SERVICE=TEMPLATE",
        help="local actuator: command starting one instance ({service} {index} {etcd} {prefix}); "
        "repeatable; env: one per line",
    )
    scaler.option(
        "--namespace", default="default", help="kubernetes actuator: the Deployments' namespace"
    )
    add_etcd_options(scaler)

    policy = commands.add_parser("policy", help="how a service scales (policy/<service>)")
    actions = policy.add_subparsers(dest="action", required=True, parser_class=EnvParser)
    set_ = actions.add_parser("set", help="create or replace a service's policy")
    set_.add_argument("service")
    set_.option("--min", type=int, required=True, help="fewest replicas")
    set_.option("--max", type=int, required=True, help="most replicas")
    set_.option("--metric", required=True, choices=METRICS, help="what to hold at the target")
    set_.option("--target", type=float, required=True, help="per-instance target of the metric")
    set_.option("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="no change within it")
    set_.option("--scale-up-window", type=float, default=DEFAULT_SCALE_UP_WINDOW_S, metavar="S")
    set_.option("--scale-down-window", type=float, default=DEFAULT_SCALE_DOWN_WINDOW_S, metavar="S")
    set_.option("--mode", choices=MODES, default=REACTIVE)
    add_etcd_options(set_)
    for name, text in (
        ("get", "print a service's policy"),
        ("delete", "remove a service's policy"),
    ):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("service")
        add_etcd_options(sub)

    authz = commands.add_parser("authz", help="who may call a service (authz/<service>)")
    actions = authz.add_subparsers(dest="action", required=True, parser_class=EnvParser)
    for name, text in (
        ("allow", "let CALLER call SERVICE (starts SERVICE's list if it has none)"),
        ("deny", "take CALLER off SERVICE's list"),
    ):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("service")
        sub.add_argument("caller")
        add_etcd_options(sub)
    show = actions.add_parser("show", help="print who may call SERVICE")
    show.add_argument("service")
    show.option("--json", action="store_true", help="one JSON document on stdout")
    add_etcd_options(show)

    certs = commands.add_parser("certs", help="the mesh CA and service certificates (mTLS)")
    actions = certs.add_subparsers(dest="action", required=True, parser_class=EnvParser)
    init = actions.add_parser("init", help="make the mesh CA: DIR/ca.pem, DIR/ca.key")
    init.add_argument("dir", metavar="DIR")
    init.option("--days", type=float, default=3650.0, help="validity in days (default 10 years)")
    init.option("--force", action="store_true", help="replace an existing CA")
    issue = actions.add_parser(
        "issue", help="a key and certificate for SERVICE: DIR/SERVICE/{cert,key,ca}.pem"
    )
    issue.add_argument("dir", metavar="DIR")
    issue.add_argument("service", metavar="SERVICE")
    issue.option(
        "--days", type=float, default=1.0, help="validity in days, fractions allowed (default 1)"
    )
    issue.option("--force", action="store_true", help="replace existing files (renewal)")

    roles = commands.add_parser(
        "etcd-roles", help="etcd users and roles of least privilege (connect as root)"
    )
    actions = roles.add_subparsers(dest="action", required=True, parser_class=EnvParser)
    for name, text in (
        ("sidecar", "the role and user of SERVICE's sidecars"),
        ("scaler", "the role and user of the scalers"),
    ):
        sub = actions.add_parser(name, help=text)
        if name == "sidecar":
            sub.add_argument("service")
        sub.option("--user", required=True, help="the etcd user to create or bring in line")
        sub.option(
            "--password-file", required=True, metavar="FILE", help="the user's password, one line"
        )
        add_etcd_options(sub)

    up = commands.add_parser("up", help="a local mesh: embedded etcd and demo services")
    up.option(
        "--for",
        dest="duration",
        type=positive_seconds,
        metavar="SECONDS",
        help="run the story (or the mesh file) for SECONDS, then stop and print a summary",
    )
    up.option("--json", action="store_true", help="the summary as one JSON document on stdout")
    up.option(
        "--etcd-members",
        type=int,
        default=1,
        choices=(1, 3),
        metavar="N",
        help="members of the embedded etcd cluster (1 or 3)",
    )
    up.add_argument(
        "-f", dest="mesh_file", metavar="mesh.yaml", help="run your own services from a mesh file"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("grpc_reflection").setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"ringmesh {args.command}: {exc}", file=sys.stderr)
        return 2
    except MeshError as exc:
        print(f"ringmesh {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "up":
        if args.mesh_file:
            from ringmesh.meshfile import run_meshfile

            return run_meshfile(
                Path(args.mesh_file),
                duration=args.duration,
                as_json=args.json,
                etcd_members=args.etcd_members,
            )
        from ringmesh.up import run_up

        return run_up(duration=args.duration, as_json=args.json, etcd_members=args.etcd_members)
    if args.command == "sidecar":
        return _run(_sidecar(args))
    if args.command == "scaler":
        return _run(_scaler(args))
    if args.command == "certs":
        from ringmesh.certs import certs_command

        return certs_command(args)
    layout = KeyLayout(args.prefix)
    config = etcd_config(args)
    if args.command == "topology":
        from ringmesh.inspect import topology_command

        return _run(
            _with_etcd(
                config, lambda c: topology_command(c, layout, as_json=args.json, watch=args.watch)
            )
        )
    if args.command == "route":
        from ringmesh.inspect import route_command

        return _run(
            _with_etcd(
                config,
                lambda c: route_command(c, layout, args.service, args.key, as_json=args.json),
            )
        )
    if args.command == "policy":
        from ringmesh.policy_cmd import policy_command

        return _run(_with_etcd(config, lambda c: policy_command(c, layout, args)))
    if args.command == "authz":
        from ringmesh.authz_cmd import authz_command

        return _run(_with_etcd(config, lambda c: authz_command(c, layout, args)))
    if args.command == "etcd-roles":
        spec = (
            sidecar_role(layout, args.service) if args.action == "sidecar" else scaler_role(layout)
        )
        user, password = validate_user(args.user), read_password_file(args.password_file)
        return _run(_with_etcd(config, lambda c: _etcd_roles(c, spec, user, password)))
    raise ConfigError(f"unknown command {args.command!r}")


async def _etcd_roles(client: EtcdClient, spec: RoleSpec, user: str, password: str) -> int:
    if not await client.auth_enabled():
        print(
            "ringmesh etcd-roles: etcd auth is off: the roles take effect with "
            "`etcdctl auth enable`",
            file=sys.stderr,
        )
    changes = await converge(client, spec, user=user, password=password)
    for change in changes:
        print(change)
    if not changes:
        print(f"role {spec.name} and user {user}: nothing to change")
    return 0


async def _with_etcd(config: Any, body: Callable[[EtcdClient], Awaitable[int]]) -> int:
    async with EtcdClient(config) as client:
        return await body(client)


def _run(main_coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coro)
    # uvloop: 10-13% less proxy CPU per call (FIELD-NOTES.md).
    result: int = uvloop.run(main_coro)
    return result


async def _sidecar(args: argparse.Namespace) -> int:
    from sidecar.config import SidecarConfig
    from sidecar.runtime import Sidecar

    config = SidecarConfig(
        service=args.service,
        app=args.app,
        outbound=args.outbound,
        inbound=args.inbound,
        advertise=args.advertise,
        admin=args.admin,
        etcd=etcd_config(args),
        prefix=args.prefix,
        instance_id=args.instance_id,
        zone=args.zone,
        weight=args.weight,
        ttl=args.ttl,
        drain_grace=args.drain_grace,
        idempotent=tuple(args.idempotent),
        watch=tuple(args.watch),
        report_interval=args.report_interval,
        otlp_endpoint=otlp_endpoint(),
        tls_dir=args.tls_dir,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Sidecar(config).run(stop)
    return 0


async def _scaler(args: argparse.Namespace) -> int:
    from scaler.leader import Scaler, ScalerConfig

    config = ScalerConfig(
        scaler_id=args.scaler_id or default_scaler_id(),
        etcd=etcd_config(args),
        prefix=args.prefix,
        interval=args.interval,
        ttl=args.ttl,
        max_total_replicas=args.max_total_replicas,
    )
    actuator = build_actuator(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Scaler(config, actuator).run(stop)
    return 0


def default_scaler_id() -> str:
    raw = f"{socket.gethostname()}-{os.getpid()}"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in raw).strip("-._")[-128:]


def build_actuator(args: argparse.Namespace) -> Any:
    from scaler.actuators import CommandLauncher, LocalActuator, NoActuator

    if args.actuator == "none":
        if args.templates:
            raise ConfigError("--command is for --actuator local")
        return NoActuator()
    if args.actuator == "local":
        templates = {}
        for item in args.templates:
            service, sep, template = item.partition("=")
            if not sep or not template.strip():
                raise ConfigError(f"--command {item!r}: expected SERVICE=TEMPLATE")
            templates[validate_service(service)] = template
        if not templates:
            raise ConfigError("--actuator local needs at least one --command SERVICE=TEMPLATE")
        return LocalActuator(CommandLauncher(templates, etcd=args.etcd, prefix=args.prefix))
    from scaler.kubernetes import KubernetesActuator, load_apps_api

    return KubernetesActuator(load_apps_api(), namespace=args.namespace)
