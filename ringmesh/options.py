"""Command-line options with environment fallbacks: every flag reads RINGMESH_<FLAG>.

The environment is read here and nowhere else, once, while the parser is built.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from registry.etcd import DEFAULT_ETCD, EtcdConfig
from registry.keys import DEFAULT_PREFIX


def env_name(flag: str) -> str:
    return "RINGMESH_" + flag.lstrip("-").upper().replace("-", "_")


class EnvParser(argparse.ArgumentParser):
    """An ArgumentParser whose option defaults come from RINGMESH_* variables."""

    def __init__(self, *args: Any, environ: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.environ = os.environ if environ is None else environ

    def option(self, *flags: str, **kwargs: Any) -> argparse.Action:
        long_flag = next(f for f in flags if f.startswith("--"))
        name = env_name(long_flag)
        raw = self.environ.get(name)
        if raw is not None and raw != "":
            if kwargs.get("action") == "store_true":
                kwargs["default"] = raw.lower() in ("1", "true", "yes", "on")
            elif kwargs.get("action") == "append":
                kwargs["default"] = [v for v in raw.split(",") if v]
            else:
                kind = kwargs.get("type", str)
                try:
                    kwargs["default"] = kind(raw)
                except (TypeError, ValueError):
                    self.error(f"invalid value in {name}: {raw!r}")
            kwargs["required"] = False
        help_text = kwargs.get("help", "")
        kwargs["help"] = f"{help_text} [env {name}]".strip()
        return self.add_argument(*flags, **kwargs)


def add_etcd_options(parser: EnvParser) -> None:
    parser.option("--etcd", default=DEFAULT_ETCD, metavar="URL[,URL...]", help="etcd endpoints")
    parser.option("--prefix", default=DEFAULT_PREFIX, help="key prefix in etcd")
    parser.option("--etcd-ca", metavar="FILE", help="CA bundle for etcd TLS")
    parser.option("--etcd-cert", metavar="FILE", help="client certificate for etcd mTLS")
    parser.option("--etcd-key", metavar="FILE", help="client key for etcd mTLS")
    parser.option("--etcd-user", metavar="USER", help="etcd user")
    parser.option("--etcd-password", metavar="PASSWORD", help="etcd password")
    parser.option(
        "--etcd-timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="deadline of each etcd request",
    )


def etcd_config(args: argparse.Namespace) -> EtcdConfig:
    return EtcdConfig.from_urls(
        args.etcd,
        timeout=args.etcd_timeout,
        ca_file=args.etcd_ca,
        cert_file=args.etcd_cert,
        key_file=args.etcd_key,
        user=args.etcd_user,
        password=args.etcd_password,
    )
