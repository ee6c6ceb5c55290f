"""Flags with RINGMESH_* fallbacks, etcd endpoint parsing, and the sidecar's configuration."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.errors import ConfigError, InvalidName
from registry.etcd import DEFAULT_ETCD, EtcdConfig
from registry.keys import DEFAULT_PREFIX
from ringmesh.cli import build_parser, main
from ringmesh.options import EnvParser, add_etcd_options, env_name, etcd_config
from sidecar.config import SidecarConfig, is_loopback, join_hostport, split_hostport


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """build_parser() reads os.environ: start every test without RINGMESH_* variables."""
    for name in list(os.environ):
        if name.startswith("RINGMESH_"):
            monkeypatch.delenv(name)
    yield


def parser_with(environ: dict[str, str]) -> EnvParser:
    parser = EnvParser(prog="t", environ=environ)
    parser.option("--name", required=True)
    parser.option("--count", type=int, default=1)
    parser.option("--ratio", type=float, default=0.5)
    parser.option("--verbose", action="store_true")
    parser.option("--tag", action="append", default=[])
    parser.option("--drain-grace", type=float, default=10.0)
    return parser


# -- EnvParser ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "variable"),
    [
        ("--etcd", "RINGMESH_ETCD"),
        ("--etcd-ca", "RINGMESH_ETCD_CA"),
        ("--drain-grace", "RINGMESH_DRAIN_GRACE"),
        ("--for", "RINGMESH_FOR"),
    ],
)
def test_env_name(flag: str, variable: str) -> None:
    assert env_name(flag) == variable


def test_environment_supplies_defaults() -> None:
    parser = parser_with(
        {
            "RINGMESH_NAME": "echo",
            "RINGMESH_COUNT": "7",
            "RINGMESH_RATIO": "0.25",
            "RINGMESH_VERBOSE": "yes",
            "RINGMESH_TAG": "a\n\n b \r\n",
            "RINGMESH_DRAIN_GRACE": "2.5",
        }
    )
    args = parser.parse_args([])  # --name is required, but the environment gives it
    assert args.name == "echo"
    assert args.count == 7
    assert args.ratio == 0.25
    assert args.verbose is True
    assert args.tag == ["a", "b"]
    assert args.drain_grace == 2.5


def test_without_environment_the_declared_defaults_apply() -> None:
    parser = parser_with({})
    args = parser.parse_args(["--name", "x"])
    assert (args.count, args.ratio, args.verbose, args.tag, args.drain_grace) == (
        1,
        0.5,
        False,
        [],
        10.0,
    )
    with pytest.raises(SystemExit) as info:
        parser.parse_args([])  # still required when the environment does not give it
    assert info.value.code == 2


def test_empty_environment_value_is_ignored() -> None:
    args = parser_with({"RINGMESH_NAME": "n", "RINGMESH_COUNT": ""}).parse_args([])
    assert args.count == 1


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on"])
def test_true_boolean_environment_values(value: str) -> None:
    assert parser_with({"RINGMESH_NAME": "n", "RINGMESH_VERBOSE": value}).parse_args([]).verbose


@pytest.mark.parametrize("value", ["0", "false", "no", "off"])
def test_false_boolean_environment_values(value: str) -> None:
    args = parser_with({"RINGMESH_NAME": "n", "RINGMESH_VERBOSE": value}).parse_args([])
    assert args.verbose is False


def test_flags_override_the_environment() -> None:
    parser = parser_with({"RINGMESH_NAME": "env", "RINGMESH_COUNT": "7", "RINGMESH_RATIO": "0.1"})
    args = parser.parse_args(["--name", "flag", "--count", "9"])
    assert args.name == "flag"
    assert args.count == 9
    assert args.ratio == 0.1  # not given as a flag: the environment still applies


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RINGMESH_COUNT", "seven"), ("RINGMESH_COUNT", "1.5"), ("RINGMESH_RATIO", "half")],
)
def test_invalid_environment_value_is_a_usage_error(
    variable: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = parser_with({"RINGMESH_NAME": "n", variable: value})  # building reads nothing
    with pytest.raises(SystemExit) as info:
        parser.parse_args([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert variable in err and repr(value) in err


def test_a_flag_given_on_the_command_line_makes_its_bad_variable_harmless() -> None:
    parser = parser_with({"RINGMESH_NAME": "n", "RINGMESH_COUNT": "seven", "RINGMESH_VERBOSE": "x"})
    args = parser.parse_args(["--count", "3", "--verbose"])
    assert (args.count, args.verbose) == (3, True)


def test_help_works_with_a_bad_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser_with({"RINGMESH_COUNT": "seven"}).parse_args(["--help"])
    assert info.value.code == 0
    assert "[env RINGMESH_COUNT]" in capsys.readouterr().out


def test_help_names_the_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser_with({}).parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "[env RINGMESH_COUNT]" in out and "[env RINGMESH_DRAIN_GRACE]" in out


def test_add_etcd_options_defaults_and_environment() -> None:
    parser = EnvParser(prog="t", environ={})
    add_etcd_options(parser)
    args = parser.parse_args([])
    assert args.etcd == DEFAULT_ETCD
    assert args.prefix == DEFAULT_PREFIX
    assert args.etcd_timeout == 3.0
    config = etcd_config(args)
    assert config.endpoints == ("127.0.0.1:2379",)
    assert config.tls is False and config.timeout == 3.0

    parser = EnvParser(
        prog="t",
        environ={
            "RINGMESH_ETCD": "https://e1:2379,https://e2:2380",
            "RINGMESH_ETCD_TIMEOUT": "1.5",
            "RINGMESH_ETCD_USER": "root",
            "RINGMESH_ETCD_PASSWORD": "pw",
        },
    )
    add_etcd_options(parser)
    config = etcd_config(parser.parse_args([]))
    assert config.endpoints == ("e1:2379", "e2:2380")
    assert config.tls is True
    assert config.timeout == 1.5
    assert (config.user, config.password) == ("root", "pw")


# -- build_parser (reads os.environ) -----------------------------------------------


def test_cli_reads_ringmesh_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RINGMESH_ETCD", "http://10.0.0.1:2379")
    monkeypatch.setenv("RINGMESH_PREFIX", "/mesh")
    monkeypatch.setenv("RINGMESH_SERVICE", "echo")
    monkeypatch.setenv("RINGMESH_APP", "127.0.0.1:50051")
    monkeypatch.setenv("RINGMESH_TTL", "20")
    monkeypatch.setenv("RINGMESH_IDEMPOTENT", "/demo.Echo/*\n/pay.Billing/Get*")
    monkeypatch.setenv("RINGMESH_LOG_LEVEL", "debug")
    args = build_parser().parse_args(["sidecar"])
    assert args.command == "sidecar"
    assert args.log_level == "debug"
    assert args.service == "echo" and args.app == "127.0.0.1:50051"
    assert args.etcd == "http://10.0.0.1:2379" and args.prefix == "/mesh"
    assert args.ttl == 20
    assert args.idempotent == ["/demo.Echo/*", "/pay.Billing/Get*"]


def test_cli_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RINGMESH_ETCD", "http://10.0.0.1:2379")
    monkeypatch.setenv("RINGMESH_JSON", "1")
    monkeypatch.setenv("RINGMESH_WEIGHT", "5")
    args = build_parser().parse_args(["topology", "--etcd", "http://10.0.0.2:2379"])
    assert args.etcd == "http://10.0.0.2:2379"
    assert args.json is True and args.watch is False
    args = build_parser().parse_args(
        ["sidecar", "--service", "echo", "--app", "h:1", "--weight", "2"]
    )
    assert args.weight == 2


def test_cli_route_and_up_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RINGMESH_FOR", "2.5")
    monkeypatch.setenv("RINGMESH_JSON", "1")
    args = build_parser().parse_args(["up"])
    assert (args.duration, args.json) == (2.5, True)
    args = build_parser().parse_args(["route", "echo", "user-1", "--json"])
    assert (args.service, args.key, args.json) == ("echo", "user-1", True)


def test_cli_sidecar_requires_service_and_app_without_environment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["sidecar", "--app", "h:1"])
    assert info.value.code == 2
    assert "--service" in capsys.readouterr().err


SIDECAR = ["sidecar", "--service", "echo", "--app", "h:1"]


@pytest.mark.parametrize(
    ("variable", "value", "argv"),
    [
        ("RINGMESH_TTL", "ten", SIDECAR),
        ("RINGMESH_WEIGHT", "2.5", SIDECAR),
        ("RINGMESH_ETCD_TIMEOUT", "soon", ["topology"]),
        ("RINGMESH_ETCD_TIMEOUT", "nan", ["topology"]),
        ("RINGMESH_ETCD_TIMEOUT", "0", ["topology"]),
        (
            "RINGMESH_TARGET",
            "x",
            ["policy", "set", "s", "--min", "1", "--max", "2", "--metric", "rps"],
        ),
    ],
)
def test_cli_invalid_environment_value_exits_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    argv: list[str],
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert variable in err and repr(value) in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RINGMESH_WEIGHT", "x"), ("RINGMESH_TTL", "ten"), ("RINGMESH_ACTUATOR", "bogus")],
)
def test_cli_other_commands_variables_are_not_read(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """RINGMESH_WEIGHT belongs to `sidecar`: garbage in it must not break `policy get`."""
    monkeypatch.setenv(variable, value)
    args = build_parser().parse_args(["policy", "get", "a"])
    assert (args.command, args.action, args.service) == ("policy", "get", "a")
    assert build_parser().parse_args(["topology"]).command == "topology"


def test_cli_environment_applies_to_the_nested_command_that_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RINGMESH_ETCD", "http://10.0.0.9:2379")
    monkeypatch.setenv("RINGMESH_MIN", "bogus")  # a `policy set` flag: not read by `get`
    args = build_parser().parse_args(["policy", "get", "a"])
    assert args.etcd == "http://10.0.0.9:2379"


def test_cli_policy_set_reads_every_flag_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "RINGMESH_MIN": "2",
        "RINGMESH_MAX": "6",
        "RINGMESH_METRIC": "rps",
        "RINGMESH_TARGET": "50",
        "RINGMESH_TOLERANCE": "0.2",
        "RINGMESH_SCALE_UP_WINDOW": "15",
        "RINGMESH_SCALE_DOWN_WINDOW": "120",
        "RINGMESH_MODE": "predictive",
    }.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["policy", "set", "orders"])  # no flag needed
    assert (args.min, args.max, args.metric, args.mode) == (2, 6, "rps", "predictive")
    assert (args.target, args.tolerance) == (50.0, 0.2)
    assert (args.scale_up_window, args.scale_down_window) == (15.0, 120.0)
    args = build_parser().parse_args(["policy", "set", "orders", "--target", "7"])
    assert args.target == 7.0  # the flag still wins


def _options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif action.option_strings:
            yield parser.prog, action


def test_cli_every_flag_names_its_environment_variable() -> None:
    missing = [
        f"{prog} {action.option_strings[-1]}"
        for prog, action in _options(build_parser())
        if not isinstance(action, argparse._HelpAction)
        and action.option_strings != ["-f"]  # short only: `up -f`, no RINGMESH_ name
        and f"[env {env_name(action.option_strings[-1])}]" not in (action.help or "")
    ]
    assert missing == []


def test_cli_template_variable_keeps_commas_and_splits_on_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    templates = [
        "demo=python -m app --peers a,b --label {service},{index}",
        "web=python -m web --tags x,y,z",
    ]
    monkeypatch.setenv("RINGMESH_COMMAND", "\n".join(templates) + "\n")
    args = build_parser().parse_args(["scaler", "--actuator", "local"])
    assert args.templates == templates


def test_cli_environment_value_outside_choices_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RINGMESH_LOG_LEVEL", "bogus")
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["topology"])
    assert info.value.code == 2


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-3", "soon"])
def test_up_for_needs_a_finite_positive_duration(value: str) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["up", "--for", value])
    assert info.value.code == 2


def test_cli_garbage_boolean_environment_value_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RINGMESH_JSON", "banana")
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["topology"])
    assert info.value.code == 2


def test_cli_repeatable_flag_overrides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RINGMESH_IDEMPOTENT", "/env.Svc/*")
    args = build_parser().parse_args(
        ["sidecar", "--service", "echo", "--app", "h:1", "--idempotent", "/flag.Svc/*"]
    )
    assert args.idempotent == ["/flag.Svc/*"]


def test_watch_names_services_and_always_keeps_a_sidecar_s_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RINGMESH_WATCH", "users\norders")
    args = build_parser().parse_args(["sidecar", "--service", "web", "--app", "h:1"])
    assert args.watch == ["users", "orders"]
    with_app = SidecarConfig(service="web", app="h:1", watch=("users", "orders"))
    assert with_app.watched() == ("orders", "users", "web")  # it must see its own record
    assert SidecarConfig(service="job", watch=("users",)).watched() == ("users",)
    assert SidecarConfig(service="web", app="h:1").watched() == ()  # the whole mesh
    with pytest.raises(ConfigError, match="Bad_Name"):
        SidecarConfig(service="web", watch=("Bad_Name",))


# -- EtcdConfig.from_urls ----------------------------------------------------------


@pytest.mark.parametrize(
    ("urls", "endpoints", "tls"),
    [
        ("http://127.0.0.1:2379", ("127.0.0.1:2379",), False),
        ("127.0.0.1:2379", ("127.0.0.1:2379",), False),
        ("etcd-0", ("etcd-0:2379",), False),
        ("http://etcd-0", ("etcd-0:2379",), False),
        ("https://etcd-0:2379", ("etcd-0:2379",), True),
        ("HTTPS://Etcd-0:2379", ("etcd-0:2379",), True),
        (
            "http://10.0.0.1:2379, http://10.0.0.2:2379 ,http://10.0.0.3:22379",
            ("10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:22379"),
            False,
        ),
        ("https://a:1,https://b:2,", ("a:1", "b:2"), True),
        ("http://[::1]:2379", ("[::1]:2379",), False),
        ("http://[fd00::1]", ("[fd00::1]:2379",), False),
    ],
)
def test_from_urls(urls: str, endpoints: tuple[str, ...], tls: bool) -> None:
    config = EtcdConfig.from_urls(urls)
    assert config.endpoints == endpoints
    assert config.tls is tls


def test_from_urls_passes_options_through() -> None:
    config = EtcdConfig.from_urls("http://a:1", timeout=0.5, user="u", password="p")
    assert (config.timeout, config.user, config.password) == (0.5, "u", "p")


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ("http://a:2379,https://b:2379", "mix http and https"),
        ("b:2379,https://c:2379", "mix http and https"),
        ("", "no etcd endpoint"),
        (" , ,", "no etcd endpoint"),
        ("ftp://a:2379", "invalid etcd endpoint"),
        ("unix:///tmp/etcd.sock", "invalid etcd endpoint"),
        ("http://:2379", "invalid etcd endpoint"),
        ("http://a:port", "invalid etcd endpoint"),
        ("http://a:99999", "invalid etcd endpoint"),
        ("http://a:2379,http://b:-1", "invalid etcd endpoint"),
    ],
)
def test_from_urls_rejects_bad_input(urls: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EtcdConfig.from_urls(urls)


@pytest.mark.parametrize(
    "urls", ["http://[::1", "http://[zz]:1", "http://a:1,http://[::1", "[fd00::1"]
)
def test_from_urls_unparseable_url_is_a_config_error(urls: str) -> None:
    with pytest.raises(ConfigError, match="invalid etcd endpoint"):
        EtcdConfig.from_urls(urls)


@pytest.mark.parametrize(
    "urls", ["http://root:s3cret@[::1", "http://root:s3cret@[zz]:1", "http://root:s3cret@h:x"]
)
def test_from_urls_errors_hide_the_password(urls: str) -> None:
    with pytest.raises(ConfigError) as info:
        EtcdConfig.from_urls(urls)
    assert "s3cret" not in str(info.value) and "root:***@" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf")])
def test_from_urls_rejects_a_timeout_that_is_not_positive_and_finite(timeout: float) -> None:
    with pytest.raises(ConfigError, match="etcd timeout"):
        EtcdConfig.from_urls("http://a:1", timeout=timeout)


@pytest.mark.parametrize("value", ["nan", "0", "-1", "inf", "-inf", "soon"])
def test_cli_bad_etcd_timeout_flag_exits_2(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["topology", "--etcd-timeout", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--etcd-timeout" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("url", ["http://[::1", "http://[zz]:1", "http://u:s3cret@[::1"])
def test_cli_unparseable_etcd_url_exits_2(capsys: pytest.CaptureFixture[str], url: str) -> None:
    assert main(["topology", "--etcd", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ringmesh topology: invalid etcd endpoint")
    assert len(err.splitlines()) == 1 and "s3cret" not in err


def test_from_urls_rejects_port_zero() -> None:
    with pytest.raises(ConfigError):
        EtcdConfig.from_urls("http://etcd-0:0")


def test_from_urls_credentials_and_tls_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="user and password"):
        EtcdConfig.from_urls("http://a:1", user="root")
    with pytest.raises(ConfigError, match="user and password"):
        EtcdConfig.from_urls("http://a:1", password="pw")
    with pytest.raises(ConfigError, match="certificate and key"):
        EtcdConfig.from_urls("https://a:1", cert_file=str(tmp_path / "c.pem"))
    with pytest.raises(ConfigError, match="not found"):
        EtcdConfig.from_urls("https://a:1", ca_file=str(tmp_path / "missing.pem"))
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    # A CA file turns TLS on even for an http:// URL.
    config = EtcdConfig.from_urls("http://a:1", ca_file=str(ca))
    assert config.tls is True and config.ca_file == str(ca)


def test_from_urls_takes_credentials_from_the_url() -> None:
    config = EtcdConfig.from_urls("http://root:s%40cret@a:1,http://root:s%40cret@b:2")
    assert (config.user, config.password, config.endpoints) == ("root", "s@cret", ("a:1", "b:2"))
    # The same credentials as flags are fine; the endpoints without any share them.
    config = EtcdConfig.from_urls("http://a:1,http://u:p@b:2", user="u", password="p")
    assert (config.user, config.password) == ("u", "p")


@pytest.mark.parametrize(
    ("urls", "flags", "message"),
    [
        ("http://u:p@a:1,http://v:p@b:2", {}, "different credentials"),
        ("http://u:p@a:1", {"user": "u", "password": "other"}, "both in the URL and as flags"),
        ("http://u@a:1", {}, "names a user but no password"),
        ("http://a:1/v3", {}, "no path or query"),
        ("http://a:1?x=1", {}, "no path or query"),
    ],
)
def test_from_urls_rejects_conflicting_credentials(
    urls: str, flags: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        EtcdConfig.from_urls(urls, **flags)


def test_a_password_never_shows_in_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        EtcdConfig.from_urls("http://root:hunter2@a:port")
    assert "hunter2" not in str(info.value) and "root:***@a:port" in str(info.value)


# -- grpc_target -------------------------------------------------------------------


def test_grpc_target_of_one_endpoint_is_the_endpoint() -> None:
    assert EtcdConfig.from_urls("http://10.0.0.1:2379").grpc_target() == "10.0.0.1:2379"
    # One endpoint is never resolved: gRPC's own resolver handles a hostname.
    assert EtcdConfig.from_urls("http://etcd.example:2379").grpc_target() == "etcd.example:2379"


def test_grpc_target_of_several_ipv4_endpoints() -> None:
    config = EtcdConfig.from_urls("http://10.0.0.1:2379,http://10.0.0.2:2380,10.0.0.3")
    assert config.grpc_target() == "ipv4:10.0.0.1:2379,10.0.0.2:2380,10.0.0.3:2379"


def test_grpc_target_of_several_ipv6_endpoints() -> None:
    config = EtcdConfig.from_urls("http://[::1]:2379,http://[fd00::2]:2379")
    assert config.grpc_target() == "ipv6:[::1]:2379,[fd00::2]:2379"


def test_grpc_target_rejects_mixed_address_families() -> None:
    config = EtcdConfig.from_urls("http://10.0.0.1:2379,http://[::1]:2379")
    with pytest.raises(ConfigError, match="mix IPv4 and IPv6"):
        config.grpc_target()


def test_grpc_target_resolves_hostnames_of_several_endpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = {"etcd-0": "10.1.0.1", "etcd-1": "10.1.0.2"}

    def fake_getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in table:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (table[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    config = EtcdConfig.from_urls("http://etcd-0:2379,http://etcd-1:2379")
    assert config.grpc_target() == "ipv4:10.1.0.1:2379,10.1.0.2:2379"
    config = EtcdConfig.from_urls("http://etcd-0:2379,http://nowhere:2379")
    with pytest.raises(ConfigError, match="cannot resolve etcd endpoint 'nowhere:2379'"):
        config.grpc_target()


# -- host:port helpers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:15001", ("127.0.0.1", 15001)),
        ("[::1]:0", ("::1", 0)),
        (":15002", ("0.0.0.0", 15002)),
        ("host.example:65535", ("host.example", 65535)),
    ],
)
def test_split_hostport(value: str, expected: tuple[str, int]) -> None:
    assert split_hostport(value, what="x") == expected


@pytest.mark.parametrize("value", ["15001", "host", "host:", "host:65536", "host:-1", "h:x"])
def test_split_hostport_rejects(value: str) -> None:
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        split_hostport(value, what="--app address")


def test_join_hostport_brackets_ipv6() -> None:
    assert join_hostport("::1", 80) == "[::1]:80"
    assert join_hostport("10.0.0.1", 80) == "10.0.0.1:80"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.evil.example", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# -- SidecarConfig -----------------------------------------------------------------


def sidecar(**changes: Any) -> SidecarConfig:
    kwargs: dict[str, Any] = {"service": "echo", "app": "127.0.0.1:50051"}
    kwargs.update(changes)
    return SidecarConfig(**kwargs)


def test_sidecar_defaults_are_valid() -> None:
    config = sidecar()
    assert config.outbound == "127.0.0.1:15001"
    assert config.inbound == "0.0.0.0:15002"
    assert config.ttl == 10 and config.weight == 1
    assert config.etcd == EtcdConfig()


@pytest.mark.parametrize("outbound", ["127.0.0.1:0", "localhost:15001", "[::1]:15001"])
def test_sidecar_loopback_outbound_is_accepted(outbound: str) -> None:
    assert sidecar(outbound=outbound).outbound == outbound


@pytest.mark.parametrize(
    "outbound", ["0.0.0.0:15001", ":15001", "[::]:15001", "10.0.0.5:15001", "example.com:15001"]
)
def test_sidecar_non_loopback_outbound_is_rejected(outbound: str) -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        sidecar(outbound=outbound)


@pytest.mark.parametrize("ttl", [1, 0, -10])
def test_sidecar_bad_ttl(ttl: int) -> None:
    with pytest.raises(ConfigError, match="--ttl must be at least 2"):
        sidecar(ttl=ttl)


def test_sidecar_smallest_ttl() -> None:
    assert sidecar(ttl=2).ttl == 2


@pytest.mark.parametrize("weight", [0, -1, 1001])
def test_sidecar_bad_weight(weight: int) -> None:
    with pytest.raises(InvalidName, match="invalid weight"):
        sidecar(weight=weight)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"service": "Echo"}, "invalid service name"),
        ({"app": "nohostport"}, "--app address"),
        ({"app": "h:70000"}, "--app address"),
        ({"inbound": "0.0.0.0"}, "--inbound address"),
        ({"admin": "admin"}, "--admin address"),
        ({"advertise": "10.0.0.1"}, "--advertise address"),
        ({"advertise": "0.0.0.0:15002"}, "must be a reachable"),
        ({"advertise": "[::]:15002"}, "must be a reachable"),
        ({"advertise": "10.0.0.1:0"}, "must be a reachable"),
        ({"advertise": ":15002"}, "must be a reachable"),
        ({"instance_id": "-bad"}, "invalid instance id"),
        ({"drain_grace": -1.0}, "--drain-grace must be a finite number of seconds >= 0"),
        ({"drain_grace": float("nan")}, "--drain-grace must be a finite"),
        ({"drain_grace": float("inf")}, "--drain-grace must be a finite"),
    ],
)
def test_sidecar_invalid_configuration(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sidecar(**changes)


def test_sidecar_non_ascii_digit_port_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        sidecar(app="127.0.0.1:²")


def test_advertised_prefers_advertise() -> None:
    assert sidecar(advertise="echo-1.example:443").advertised(15002) == "echo-1.example:443"


def test_advertised_uses_the_inbound_host_and_the_bound_port() -> None:
    assert sidecar(inbound="10.0.0.7:0").advertised(41234) == "10.0.0.7:41234"
    assert sidecar(inbound="[fd00::7]:0").advertised(41234) == "[fd00::7]:41234"


def test_advertised_for_a_wildcard_inbound_uses_this_hosts_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: {"node-a": "192.168.1.20"}[name])
    assert sidecar(inbound="0.0.0.0:15002").advertised(15002) == "192.168.1.20:15002"
    assert sidecar(inbound=":0").advertised(40000) == "192.168.1.20:40000"
    assert sidecar(inbound="[::]:0").advertised(40000) == "192.168.1.20:40000"


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("node-a", "node-a-15002"),
        ("my host!", "my-host--15002"),
        ("..", "15002"),
        ("", "15002"),
    ],
)
def test_default_instance_id_is_a_valid_stable_id(
    monkeypatch: pytest.MonkeyPatch, hostname: str, expected: str
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    assert sidecar().default_instance_id(15002) == expected


def test_default_instance_id_of_a_long_hostname_is_trimmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 300)
    instance_id = sidecar().default_instance_id(15002)
    assert len(instance_id) == 128
    assert instance_id.endswith("-15002")  # the port part survives: ids stay distinct
