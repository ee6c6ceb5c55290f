"""Command-line options with environment fallbacks: every flag reads RINGMESH_<FLAG>.

The environment is read here and nowhere else, once, while the parser is built
(plus OpenTelemetry's OTEL_EXPORTER_OTLP_ENDPOINT, read once at start-up).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any, NoReturn

from registry.etcd import DEFAULT_ETCD, EtcdConfig
from registry.keys import DEFAULT_PREFIX


def env_name(flag: str) -> str:
    return "RINGMESH_" + flag.lstrip("-").upper().replace("-", "_")


class EnvParser(argparse.ArgumentParser):
    """An ArgumentParser whose option defaults come from RINGMESH_* variables."""

    def __init__(self, *args: Any, environ: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.environ = os.environ if environ is None else environ

    def error(self, message: str) -> NoReturn:
        """One clear line on stderr and exit 2 (the contract), not argparse's usage dump."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def option(self, *flags: str, **kwargs: Any) -> argparse.Action:
        long_flag = next(f for f in flags if f.startswith("--"))
        name = env_name(long_flag)
        raw = self.environ.get(name)
        if raw is not None and raw != "":
            kwargs["default"] = self._from_env(name, raw, kwargs)
            kwargs["required"] = False
            if kwargs.get("action") == "append":
                kwargs["action"] = _AppendOverridingDefault
        help_text = kwargs.get("help", "")
        kwargs["help"] = f"{help_text} [env {name}]".strip()
        return self.add_argument(*flags, **kwargs)

    def _from_env(self, name: str, raw: str, kwargs: dict[str, Any]) -> Any:
        action = kwargs.get("action")
        if action == "store_true":
            word = raw.strip().lower()
            if word not in _TRUE | _FALSE:
                self.error(
                    f"invalid value in {name}: {raw!r} (expected 1/0, true/false, yes/no, on/off)"
                )
            return word in _TRUE
        if action == "append":
            return [v for v in raw.split(",") if v]
        kind = kwargs.get("type", str)
        try:
            value = kind(raw)
        except (TypeError, ValueError):
            self.error(f"invalid value in {name}: {raw!r}")
        choices = kwargs.get("choices")
        if choices is not None and value not in choices:
            self.error(
                f"invalid value in {name}: {raw!r} (choose from {', '.join(map(str, choices))})"
            )
        return value


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class _AppendOverridingDefault(argparse.Action):
    """Like ``append``, but flags given on the command line replace the env list."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        if current is self.default:
            current = []
        setattr(namespace, self.dest, [*(current or []), values])


def otlp_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """OpenTelemetry's own variable (not a RINGMESH_ flag): where to export over OTLP."""
    env = os.environ if environ is None else environ
    return env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


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
