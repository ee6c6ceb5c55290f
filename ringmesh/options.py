"""Command-line options with environment fallbacks: every flag reads RINGMESH_<FLAG>.

The environment is read here and nowhere else, once, when the command line is
parsed, and only for the (sub)command that runs: a bad RINGMESH_WEIGHT breaks
`ringmesh sidecar`, not `ringmesh policy get`. (OpenTelemetry's
OTEL_EXPORTER_OTLP_ENDPOINT is read once at start-up.)

A repeatable flag's variable holds one value per line (blank lines ignored):
commas and spaces stay inside a value, so a --command template survives whole.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from registry.etcd import DEFAULT_ETCD, EtcdConfig
from registry.keys import DEFAULT_PREFIX


def env_name(flag: str) -> str:
    return "RINGMESH_" + flag.lstrip("-").upper().replace("-", "_")


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (not 0, not nan, not inf)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


@dataclass(frozen=True)
class _EnvOption:
    """A flag's RINGMESH_ variable and what the flag declared without it."""

    action: argparse.Action
    variable: str
    kind: str  # "flag" (store_true), "list" (append) or "value"
    kwargs: dict[str, Any]
    default: Any
    required: bool


class EnvParser(argparse.ArgumentParser):
    """An ArgumentParser whose option defaults come from RINGMESH_* variables."""

    def __init__(self, *args: Any, environ: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.environ = os.environ if environ is None else environ
        self._env_options: list[_EnvOption] = []

    def error(self, message: str) -> NoReturn:
        """One clear line on stderr and exit 2 (the contract), not argparse's usage dump."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def option(self, *flags: str, **kwargs: Any) -> argparse.Action:
        """add_argument, plus the RINGMESH_<FLAG> fallback (read when this parser parses)."""
        long_flag = next(f for f in flags if f.startswith("--"))
        name = env_name(long_flag)
        kind = {"store_true": "flag", "append": "list"}.get(kwargs.get("action", ""), "value")
        if kind == "list":
            kwargs["action"] = _AppendOverridingDefault
        help_text = kwargs.get("help", "")
        kwargs["help"] = f"{help_text} [env {name}]".strip()
        action = self.add_argument(*flags, **kwargs)
        self._env_options.append(
            _EnvOption(action, name, kind, dict(kwargs), action.default, action.required)
        )
        return action

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # argparse calls this on the chosen subcommand's parser only, so the
        # variables of the other subcommands are never read, let alone parsed.
        self._apply_environment()
        parsed, extras = super().parse_known_args(args, namespace)
        # A bad variable matters only if its flag was not given (and --help,
        # which exits inside the parse, still works).
        for value in vars(parsed).values():
            if isinstance(value, _InvalidVariable):
                self.error(str(value))
        return parsed, extras

    def _apply_environment(self) -> None:
        for option in self._env_options:
            raw = self.environ.get(option.variable)
            if raw is None or raw == "":
                option.action.default = option.default
                option.action.required = option.required
                continue
            try:
                option.action.default = self._from_env(option, raw)
            except _InvalidVariable as invalid:
                option.action.default = invalid
            option.action.required = False

    def _from_env(self, option: _EnvOption, raw: str) -> Any:
        name = option.variable
        if option.kind == "flag":
            word = raw.strip().lower()
            if word not in _TRUE | _FALSE:
                raise _InvalidVariable(
                    f"invalid value in {name}: {raw!r} (expected 1/0, true/false, yes/no, on/off)"
                )
            return word in _TRUE
        if option.kind == "list":
            lines = [line.strip() for line in raw.splitlines()]
            return [self._value(option, line) for line in lines if line]
        return self._value(option, raw)

    def _value(self, option: _EnvOption, raw: str) -> Any:
        name = option.variable
        kind = option.kwargs.get("type", str)
        try:
            value = kind(raw)
        except argparse.ArgumentTypeError as exc:
            raise _InvalidVariable(f"invalid value in {name}: {exc}") from None
        except (TypeError, ValueError):
            raise _InvalidVariable(f"invalid value in {name}: {raw!r}") from None
        choices = option.kwargs.get("choices")
        if choices is not None and value not in choices:
            raise _InvalidVariable(
                f"invalid value in {name}: {raw!r} (choose from {', '.join(map(str, choices))})"
            )
        return value


class _InvalidVariable(Exception):
    """A RINGMESH_ variable that does not parse; it stands as its flag's default
    and is reported only when the flag was not given."""


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
        type=positive_seconds,
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
