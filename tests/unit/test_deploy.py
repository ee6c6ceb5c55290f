"""deploy/: the Kubernetes manifests, the Dockerfile, the compose file, the systemd units
and the Grafana dashboard, checked offline.

Every Kubernetes object validates against the Kubernetes schemas (kubernetes-validate,
strict: an unknown field is an error); every `ringmesh` command line in deploy/ is parsed
by the CLI's own parser, with the RINGMESH_* variables it would run with, and then
checked as the command would check it (SidecarConfig, ScalerConfig, the etcd URLs); the
dashboard queries only metrics, and labels, that the sidecar's /metrics serves (named by
sidecar/otel.py's own pipeline; tests/integration/test_deploy_live.py checks the same
against a running sidecar).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import io
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from registry.keys import validate_service
from ringmesh import certs, demo
from ringmesh.cli import build_parser
from ringmesh.options import env_name, etcd_config
from scaler.leader import ScalerConfig
from sidecar.config import SidecarConfig, split_hostport
from sidecar.otel import DURATION_BUCKETS_MS, build_pipeline

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
SYSTEMD = DEPLOY / "systemd"
DASHBOARD = DEPLOY / "grafana" / "ringmesh.json"

# The oldest Kubernetes the manifests are for (the preStop sleep action is on by
# default from 1.30) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
# The service name systemd's %i stands for in the template unit's checks.
TEMPLATE_INSTANCE = "orders"
# Labels Prometheus adds to every series it scrapes.
SCRAPE_LABELS = frozenset({"job", "instance"})


# -- reading deploy/ ------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(KUBERNETES.rglob("*.yaml"))


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_Loader) if doc]


@functools.cache
def _objects() -> str:
    return json.dumps([doc for path in manifest_files() for doc in documents(path)])


def all_objects() -> list[dict[str, Any]]:
    """Every object in deploy/kubernetes (a fresh copy: tests may not share changes)."""
    objects: list[dict[str, Any]] = json.loads(_objects())
    return objects


def schema_problems(path: Path, version: str) -> list[str]:
    """What the Kubernetes schemas of ``version`` say against the objects in ``path``."""
    try:
        docs = documents(path)
    except yaml.YAMLError as exc:
        return [f"{path.name}: not YAML: {exc}"]
    if not docs:
        return [f"{path.name}: no object"]
    problems = []
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            problems.append(f"{path.name}: not a Kubernetes object: {str(doc)[:80]}")
            continue
        what = f"{path.name}: {doc['kind']}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path) or "(top)"
            problems.append(f"{what}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{what}: {exc.message}")
    return problems


def find(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in all_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} in deploy/kubernetes"
    return found[0]


def workloads() -> list[dict[str, Any]]:
    return [o for o in all_objects() if o["kind"] in ("Deployment", "StatefulSet")]


def is_ringmesh_image(image: str) -> bool:
    repository = image.rsplit("@", 1)[0]
    name = repository.rsplit("/", 1)[-1].split(":", 1)[0]
    return name == "ringmesh"


def field_value(workload: dict[str, Any], path: str) -> str:
    """A downward-API fieldRef as it would be in a pod of ``workload``."""
    meta = workload["metadata"]
    values: dict[str, str] = {
        "metadata.name": f"{meta['name']}-7d9f8c6b5-x2x4z",
        "metadata.namespace": meta.get("namespace", "default"),
        "status.podIP": "10.244.1.7",
        "status.hostIP": "10.0.0.2",
        "spec.nodeName": "node-1",
    }
    assert path in values, f"{meta['name']}: no sample value for fieldRef {path}"
    return values[path]


def container_env(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = field_value(workload, var["valueFrom"]["fieldRef"]["fieldPath"])
        else:
            env[var["name"]] = "from-a-secret"
    return env


def expand_kubernetes(arg: str, env: Mapping[str, str], where: str) -> str:
    """$(VAR) as the kubelet expands it in command and args; an undefined one is a bug
    (the kubelet would pass it on literally)."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in env, f"{where}: $({name}) is not an env var of the container"
        return env[name]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg)


# -- ringmesh command lines -------------------------------------------------------------


@dataclass
class Invocation:
    """One way deploy/ starts a `ringmesh` command."""

    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    unreadable: str | None = None  # why its source could not be read


@dataclass
class DemoApp:
    """One way deploy/ starts the demo app (`python -m ringmesh.demo`)."""

    where: str
    argv: list[str]


class BadCommand(AssertionError):
    pass


def parse(argv: list[str], env: Mapping[str, str]) -> argparse.Namespace:
    """The CLI parser's reading of ``argv`` with exactly ``env``'s RINGMESH_* variables."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("RINGMESH_"):
                patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                return build_parser().parse_args(argv)
        except SystemExit as exc:
            raise BadCommand(
                f"ringmesh {shlex.join(argv)}: exit {exc.code}: {errors.getvalue().strip()}"
            ) from None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _variables(parser: argparse.ArgumentParser) -> set[str]:
    return {
        env_name(flag)
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    }


def flag_variables(args: argparse.Namespace) -> set[str]:
    """The RINGMESH_* variables the command ``args`` came from reads."""
    parser: argparse.ArgumentParser = build_parser()
    names = _variables(parser)
    for word in (args.command, getattr(args, "action", None)):
        if word is None:
            break
        parser = _subparsers(parser)[word]
        names |= _variables(parser)
    return names


def check_command(argv: list[str], env: Mapping[str, str]) -> argparse.Namespace:
    """Parse as the CLI does, then check what the command itself checks at start-up."""
    args = parse(argv, env)
    unknown = {n for n in env if n.startswith("RINGMESH_")} - flag_variables(args)
    if unknown:
        raise BadCommand(f"ringmesh {shlex.join(argv)}: no flag reads {sorted(unknown)}")
    try:
        if args.command != "certs" and args.command != "up":
            etcd_config(args)
        if args.command == "sidecar":
            SidecarConfig(
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
                report_interval=args.report_interval,
                tls_dir=args.tls_dir,
            )
        if args.command == "scaler":
            ScalerConfig(
                scaler_id=args.scaler_id or "scaler-1",
                etcd=etcd_config(args),
                prefix=args.prefix,
                interval=args.interval,
                ttl=args.ttl,
                max_total_replicas=args.max_total_replicas,
            )
            if args.actuator == "local":
                assert args.templates, "--actuator local needs --command"
            else:
                assert not args.templates, "--command is for --actuator local"
        if args.command in ("policy", "authz", "route"):
            validate_service(args.service)
    except Exception as exc:
        raise BadCommand(f"ringmesh {shlex.join(argv)}: {exc}") from exc
    return args


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) in order: comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerfile_exec_form(instruction: str) -> list[str]:
    values = [rest for word, rest in dockerfile_instructions() if word == instruction]
    assert values, f"the Dockerfile has no {instruction}"
    argv = json.loads(values[-1])  # the exec form; the shell form would not take signals
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def image_default_argv() -> list[str]:
    """What the image runs without a command: ENTRYPOINT + CMD."""
    return dockerfile_exec_form("ENTRYPOINT") + dockerfile_exec_form("CMD")


def kubernetes_commands() -> tuple[list[Invocation], list[DemoApp]]:
    invocations, apps = [], []
    for workload in workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if not is_ringmesh_image(container["image"]):
                continue
            where = f"{workload['kind']}/{workload['metadata']['name']} {container['name']}"
            env = container_env(workload, container)
            command = [expand_kubernetes(a, env, where) for a in container.get("command", [])]
            args = [expand_kubernetes(a, env, where) for a in container.get("args", [])]
            if command:
                argv = command + args
            elif args:
                argv = dockerfile_exec_form("ENTRYPOINT") + args
            else:
                argv = image_default_argv()
            if argv[:3] == ["python", "-m", "ringmesh.demo"]:
                apps.append(DemoApp(where, argv[3:]))
                continue
            assert Path(argv[0]).name == "ringmesh", f"{where}: runs {argv[0]}, not ringmesh"
            invocations.append(Invocation(where, argv[1:], env))
    return invocations, apps


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.load(COMPOSE.read_text(), Loader=_Loader)
    return doc


def compose_list(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return pairs([str(item) for item in env])
    return {str(k): str(v) for k, v in env.items()}


def compose_commands() -> tuple[list[Invocation], list[DemoApp]]:
    invocations, apps = [], []
    for name, service in compose()["services"].items():
        if not is_ringmesh_image(service.get("image", "")):
            continue
        entrypoint = compose_list(service.get("entrypoint")) or dockerfile_exec_form("ENTRYPOINT")
        command = compose_list(service.get("command"))
        if "command" not in service and "entrypoint" not in service:
            command = dockerfile_exec_form("CMD")
        argv = entrypoint + command
        where = f"compose service {name}"
        if argv[:3] == ["python", "-m", "ringmesh.demo"]:
            apps.append(DemoApp(where, argv[3:]))
            continue
        assert Path(argv[0]).name == "ringmesh", f"{where}: runs {argv[0]}, not ringmesh"
        invocations.append(Invocation(where, argv[1:], compose_env(service)))
    return invocations, apps


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def expand_specifiers(value: str, unit: Path) -> str:
    """systemd's %i (the instance name) and %%; any other specifier is unexpected here."""

    def one(match: re.Match[str]) -> str:
        letter = match.group(1)
        if letter == "%":
            return "%"
        assert letter == "i", f"{unit.name}: unexpected specifier %{letter}"
        assert "@" in unit.name, f"{unit.name}: %i in a unit that is not a template"
        return TEMPLATE_INSTANCE

    return re.sub(r"%(.)", one, value)


def env_file(path: Path) -> dict[str, str]:
    """A systemd EnvironmentFile: KEY=VALUE lines, # and ; comments, optional quotes."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def unit_environment(unit: Path, service: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in service.get("EnvironmentFile", []):
        target = expand_specifiers(item.lstrip("-"), unit)
        example = SYSTEMD / Path(target).name
        assert example.is_file(), f"{unit.name}: no example {example.name} for {target}"
        env.update(env_file(example))
    for item in service.get("Environment", []):
        for pair in shlex.split(expand_specifiers(item, unit)):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def systemd_units() -> list[Path]:
    return sorted(SYSTEMD.glob("*.service"))


def systemd_commands() -> list[Invocation]:
    invocations = []
    for unit in systemd_units():
        service = unit_file(unit)["Service"]
        (exec_start,) = service["ExecStart"]
        argv = shlex.split(expand_specifiers(exec_start.lstrip("@-:+!"), unit))
        assert Path(argv[0]).name == "ringmesh", f"{unit.name}: runs {argv[0]}, not ringmesh"
        invocations.append(Invocation(unit.name, argv[1:], unit_environment(unit, service)))
    return invocations


def readme_commands() -> list[Invocation]:
    """`ringmesh ...` in deploy/README.md's shell blocks (also after `kubectl exec ... --`)."""
    invocations = []
    text = DEPLOY.joinpath("README.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            # ringmesh ..., kubectl exec POD -- ringmesh ..., docker compose exec SVC ringmesh ...
            starts = [
                i
                for i, word in enumerate(words)
                if word == "ringmesh"
                and (i == 0 or words[i - 1] == "--" or (i >= 2 and words[i - 2] == "exec"))
            ]
            if starts:
                argv = words[starts[0] + 1 :]
                invocations.append(Invocation(f"README.md: ringmesh {' '.join(argv[:2])}", argv))
    return invocations


def _dockerfile_commands() -> list[Invocation]:
    # As documented in the Dockerfile: docker run -e RINGMESH_SERVICE=orders -e RINGMESH_APP=...
    env = {"RINGMESH_SERVICE": "orders", "RINGMESH_APP": "app:50051"}
    return [Invocation("Dockerfile ENTRYPOINT + CMD", image_default_argv()[1:], env)]


def every_invocation() -> list[Invocation]:
    """Every ringmesh command line in deploy/ (a source that cannot be read is one that
    fails, in the test rather than at collection)."""
    sources = {
        "deploy/kubernetes": lambda: kubernetes_commands()[0],
        "deploy/compose.yaml": lambda: compose_commands()[0],
        "deploy/docker/Dockerfile": _dockerfile_commands,
        "deploy/systemd": systemd_commands,
        "deploy/README.md": readme_commands,
    }
    invocations = []
    for name, read in sources.items():
        try:
            invocations += read()
        except Exception as exc:
            invocations.append(Invocation(name, [], unreadable=f"{type(exc).__name__}: {exc}"))
    return invocations


def pairs(items: list[str], separator: str = "=") -> dict[str, str]:
    """["a=1", "--b=2"] as {"a": "1", "b": "2"}."""
    out = {}
    for item in items:
        key, sep, value = item.removeprefix("--").partition(separator)
        assert sep, f"{item!r} is not KEY{separator}VALUE"
        out[key] = value
    return out


def seconds(value: str) -> float:
    """A systemd or compose duration: "30", "30s", "1m30s", "1min"."""
    total = 0.0
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip()):
        total += float(number) * units[unit]
    return total


# -- the dashboard's queries --------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"(?<![\w:$.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {
        *("by", "without", "on", "ignoring", "group_left", "group_right"),
        *("and", "or", "unless", "bool", "offset"),
        *("sum", "min", "max", "avg", "count", "group", "stddev", "stdvar"),
        *("topk", "bottomk", "quantile", "count_values"),
    }
)
_LABEL_VALUES = re.compile(r"label_values\(\s*(?:(.*),)?\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")


@dataclass(frozen=True)
class Query:
    where: str
    metrics: frozenset[str]
    labels: frozenset[str]


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses."""
    text = _STRING.sub('""', expr)
    labels: set[str] = set()
    for match in _MATCHERS.finditer(text):
        labels |= set(_MATCHER_LABEL.findall(match.group(1)))
    text = _MATCHERS.sub(" ", text)
    for match in _GROUPING.finditer(text):
        labels |= {name.strip() for name in match.group(1).split(",") if name.strip()}
    text = _RANGE.sub(" ", _GROUPING.sub(" ", text))
    metrics = {
        m.group(1)
        for m in _IDENTIFIER.finditer(text)
        if not m.group(2) and m.group(1) not in _KEYWORDS
    }
    return metrics, labels


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    queries = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            metrics, labels = promql_names(target["expr"])
            where = f"panel {panel.get('title')!r} {target.get('refId')}"
            queries.append(Query(where, frozenset(metrics), frozenset(labels)))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.fullmatch(text.strip())
        assert match, f"variable {variable['name']}: not label_values(...): {text!r}"
        metrics, labels = promql_names(match.group(1) or "")
        queries.append(
            Query(
                f"variable {variable['name']}",
                frozenset(metrics),
                frozenset(labels | {match.group(2)}),
            )
        )
    return queries


def load_dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def served_series(prometheus_text: str) -> dict[str, set[str]]:
    """{sample name: its label names} of a /metrics page."""
    served: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(prometheus_text):
        for sample in family.samples:
            served.setdefault(sample.name, set()).update(sample.labels)
    return served


def dashboard_problems(dashboard: dict[str, Any], served: Mapping[str, set[str]]) -> list[str]:
    """Each query's metrics must be served, and its labels be labels of those metrics."""
    problems = []
    for query in dashboard_queries(dashboard):
        if not query.metrics:
            problems.append(f"{query.where}: queries no metric")
        for metric in sorted(query.metrics - set(served)):
            problems.append(f"{query.where}: {metric} is not served")
        known = set(SCRAPE_LABELS).union(*(served.get(m, set()) for m in query.metrics))
        for label in sorted(query.labels - known):
            problems.append(f"{query.where}: no label {label} on {sorted(query.metrics)}")
    return problems


def offline_metrics_text() -> str:
    """/metrics of a sidecar pipeline fed one of everything the data plane counts."""
    buckets = [1] + [0] * len(DURATION_BUCKETS_MS)
    stats = {
        "server": [("/ringmesh.demo.v1.Demo/Echo", 0, 1, 0.1, buckets)],
        "client": [("/ringmesh.demo.v1.Demo/Echo", 14, 1, 0.1, buckets)],
        "inflight": {"inbound": 0, "outbound": 0},
        "retries": {"not_processed": 1},
        "ejections": 1,
        "retry_budget_waits": 1,
        "retry_budget_exhausted": 1,
        "authz_denied": 1,
    }

    def no_spans() -> list[object]:
        return []

    pipeline = build_pipeline(
        service="orders",
        instance_id="orders-1",
        otlp_endpoint=None,
        read_stats=lambda: stats,
        take_spans=no_spans,
    )
    return pipeline.prometheus_text().decode()


# -- Kubernetes ---------------------------------------------------------------------------


def test_deploy_has_every_piece() -> None:
    for path in (DOCKERFILE, DOCKERIGNORE, COMPOSE, DASHBOARD, DEPLOY / "README.md"):
        assert path.is_file(), path
    assert {p.name for p in systemd_units()} == {
        "ringmesh-sidecar@.service",
        "ringmesh-scaler.service",
    }
    kinds = {(o["kind"], o["metadata"]["name"]) for o in all_objects()}
    assert {
        ("Namespace", "shop"),
        ("Service", "etcd"),
        ("StatefulSet", "etcd"),
        ("PodDisruptionBudget", "etcd"),
        ("Secret", "orders-tls"),
        ("Deployment", "orders"),
        ("ServiceAccount", "ringmesh-scaler"),
        ("Role", "ringmesh-scaler"),
        ("RoleBinding", "ringmesh-scaler"),
        ("Deployment", "ringmesh-scaler"),
    } <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    assert schema_problems(path, version) == []


@pytest.mark.parametrize(
    ("good", "bad", "complaint"),
    [
        # a number, not a port name
        ("containerPort: 15002", "containerPort: inbound", "'inbound' is not of type 'integer'"),
        # no such field (strict schemas)
        (
            "imagePullPolicy: IfNotPresent",
            "imagePulPolicy: IfNotPresent",
            "'imagePulPolicy' was unexpected",
        ),
        # a required field gone
        ("  selector:\n", "  selectr:\n", "'selector' is a required property"),
        # no such kind in apps/v1
        ("kind: Deployment", "kind: Deploymnet", "Couldn't find schema for kind Deploymnet"),
        # not YAML at all
        ("      containers:\n", "      containers: [\n", "not YAML"),
    ],
)
def test_a_broken_manifest_fails_validation(
    tmp_path: Path, good: str, bad: str, complaint: str
) -> None:
    original = KUBERNETES / "30-orders.yaml"
    assert schema_problems(original, "1.30") == []
    text = original.read_text()
    assert good in text
    broken = tmp_path / original.name
    broken.write_text(text.replace(good, bad, 1))
    problems = schema_problems(broken, "1.30")
    assert problems and complaint in problems[0], problems


def test_kubernetes_objects_reference_each_other() -> None:
    objects = all_objects()
    namespaces = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"}
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") in namespaces, f"{o['kind']}: its namespace"
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    pods = {w["metadata"]["name"]: w["spec"]["template"] for w in workloads()}

    def selects(selector: dict[str, str]) -> list[str]:
        return [
            name
            for name, template in pods.items()
            if selector.items() <= template["metadata"]["labels"].items()
        ]

    for workload in workloads():
        name = workload["metadata"]["name"]
        assert selects(workload["spec"]["selector"]["matchLabels"]) == [name]
    for service in by_kind["Service"].values():
        assert selects(service["spec"]["selector"]), f"Service {service['metadata']['name']}"
    for pdb in by_kind["PodDisruptionBudget"].values():
        assert selects(pdb["spec"]["selector"]["matchLabels"]), pdb["metadata"]["name"]
    for sts in by_kind["StatefulSet"].values():
        governing = by_kind["Service"][sts["spec"]["serviceName"]]
        assert governing["spec"]["clusterIP"] == "None", "a StatefulSet needs a headless Service"
        assert sts["metadata"]["name"] in selects(governing["spec"]["selector"])
        pod_ports = {
            p["name"]: p["containerPort"]
            for c in sts["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in governing["spec"]["ports"]:
            assert port["targetPort"] in pod_ports, port
            assert pod_ports[port["targetPort"]] == port["port"], port
    for workload in workloads():
        spec = workload["spec"]["template"]["spec"]
        where = workload["metadata"]["name"]
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"] in by_kind["Secret"], volume
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in by_kind["ServiceAccount"]
        for container in spec["containers"]:
            what = f"{where} {container['name']}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes.keys() | claims, f"{what}: {mount['name']}"
                assert "subPath" not in mount, f"{what}: subPath mounts never see updates"
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(kind, {})
                for handler in ("httpGet", "grpc", "tcpSocket"):
                    if handler in probe:
                        port = probe[handler]["port"]
                        assert port in ports or port in ports.values(), f"{what} {kind}: {port}"
            resources = container.get("resources", {})
            assert resources.get("requests"), f"{what}: no resource requests"
            assert resources.get("limits", {}).get("memory"), f"{what}: no memory limit"
    for binding in by_kind["RoleBinding"].values():
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["roleRef"]["name"] in by_kind["Role"]
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert subject["name"] in by_kind["ServiceAccount"]
            assert subject["namespace"] == binding["metadata"]["namespace"]


def etcd_client_urls() -> list[str]:
    """What each member of the etcd StatefulSet is reached at by its clients."""
    sts = find("StatefulSet", "etcd")
    service = find("Service", sts["spec"]["serviceName"])
    (client,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "client"]
    name = sts["metadata"]["name"]
    return [
        f"http://{name}-{i}.{service['metadata']['name']}:{client}"
        for i in range(sts["spec"]["replicas"])
    ]


def test_etcd_is_three_members_that_know_each_other() -> None:
    sts = find("StatefulSet", "etcd")
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert find("Service", "etcd")["spec"]["publishNotReadyAddresses"] is True
    assert find("PodDisruptionBudget", "etcd")["spec"]["maxUnavailable"] == 1
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    args = pairs(container["args"])
    members = pairs(args["initial-cluster"].split(","))
    peer = [p["port"] for p in find("Service", "etcd")["spec"]["ports"] if p["name"] == "peer"]
    assert members == {f"etcd-{i}": f"http://etcd-{i}.etcd:{peer[0]}" for i in range(3)}
    for i in range(3):
        pod = f"etcd-{i}"
        assert args["initial-advertise-peer-urls"].replace("$(POD_NAME)", pod) == members[pod]
        assert args["advertise-client-urls"].replace("$(POD_NAME)", pod) == etcd_client_urls()[i]
    assert container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def sidecars() -> Iterator[tuple[dict[str, Any], dict[str, Any], argparse.Namespace]]:
    """(workload, sidecar container, its parsed command line) in the manifests."""
    invocations = {i.where: i for i in kubernetes_commands()[0]}
    for workload in workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            where = f"{workload['kind']}/{workload['metadata']['name']} {container['name']}"
            if where in invocations and invocations[where].argv[0] == "sidecar":
                invocation = invocations[where]
                yield workload, container, check_command(invocation.argv, invocation.env)


def port_of(address: str) -> int:
    return split_hostport(address, what="address")[1]


def test_sidecars_in_kubernetes_are_probed_reachable_and_drained() -> None:
    found = list(sidecars())
    assert [w["metadata"]["name"] for w, _, _ in found] == ["orders"]
    for workload, container, args in found:
        where = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        # The kubernetes actuator scales the Deployment named like the service.
        assert workload["kind"] == "Deployment" and where == args.service
        assert "replicas" not in workload["spec"], f"{where}: the scaler owns spec.replicas"
        assert args.etcd.split(",") == etcd_client_urls()
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["inbound"] == port_of(args.inbound)
        assert ports["admin"] == port_of(args.admin)
        # The kubelet probes, and Prometheus scrapes, the pod's address, not loopback.
        assert split_hostport(args.admin, what="--admin")[0] == "0.0.0.0"
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(ports["admin"])
        assert ipaddress.ip_address(args.advertise.rpartition(":")[0])  # $(POD_IP), expanded
        readiness, liveness = container["readinessProbe"], container["livenessProbe"]
        assert liveness["httpGet"]["path"] == "/healthz"
        assert liveness["httpGet"]["port"] in ("admin", ports["admin"])
        if "grpc" in readiness:
            # The kubelet's gRPC probe is plaintext: it cannot pass an mTLS inbound port.
            assert args.tls_dir is None, f"{where}: a grpc probe on an mTLS inbound port"
            assert readiness["grpc"]["port"] == ports["inbound"]
        else:
            assert readiness["httpGet"]["path"] == "/ready"
            assert readiness["httpGet"]["port"] in ("admin", ports["admin"])
        # The drain: SIGTERM reaches every container at once, after its preStop. The
        # app must outlive the drain (--drain-grace, then 1 s of shutdown), and the
        # kubelet's SIGKILL must come after both.
        assert "lifecycle" not in container, f"{where}: the sidecar drains on SIGTERM itself"
        drain = args.drain_grace + 1
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > drain + 5
        others = [c for c in pod["containers"] if c is not container]
        assert others, f"{where}: no app beside the sidecar"
        for app in others:
            pause = app["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert drain <= pause < grace - 5, f"{where} {app['name']}: preStop {pause} s"
        # mTLS: the Secret mounted whole at --tls-dir.
        if args.tls_dir is not None:
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == args.tls_dir]
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            assert volume["secret"]["secretName"] == f"{args.service}-tls"
            assert mount.get("readOnly") is True


def test_the_tls_secret_holds_the_files_certs_issue_writes(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    certs.init_ca(tmp_path, now=now, force=False)
    certs.issue_into(tmp_path, "orders", now=now, force=False)
    issued = {p.name for p in (tmp_path / "orders").iterdir()}
    secret = find("Secret", "orders-tls")
    assert set(secret["stringData"]) == issued == {"cert.pem", "key.pem", "ca.pem"}
    # The pod runs as a non-root user: the key must be readable by its group (fsGroup).
    orders = find("Deployment", "orders")["spec"]["template"]["spec"]
    (volume,) = [v for v in orders["volumes"] if "secret" in v]
    assert volume["secret"]["defaultMode"] & 0o040
    assert orders["securityContext"]["fsGroup"]


_VERBS = {"read": "get", "patch": "patch", "replace": "update", "list": "list", "create": "create"}


def actuator_permissions() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every AppsV1Api call in scaler/kubernetes.py."""
    tree = ast.parse((ROOT / "scaler" / "kubernetes.py").read_text())
    calls = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "_api"
    }
    permissions = set()
    for call in calls:
        match = re.fullmatch(r"([a-z]+)_namespaced_deployment(_scale|_status)?", call)
        assert match, f"scaler/kubernetes.py calls {call}: which permission is that?"
        resource = "deployments" + (match.group(2) or "").replace("_", "/")
        permissions.add(("apps", resource, _VERBS[match.group(1)]))
    return permissions


def test_the_scaler_may_do_exactly_what_its_actuator_calls() -> None:
    role = find("Role", "ringmesh-scaler")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert (
        granted
        == actuator_permissions()
        == {
            ("apps", "deployments/scale", "get"),
            ("apps", "deployments/scale", "patch"),
        }
    )
    deployment = find("Deployment", "ringmesh-scaler")
    binding = find("RoleBinding", "ringmesh-scaler")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert [s["name"] for s in binding["subjects"]] == [account]
    (invocation,) = [i for i in kubernetes_commands()[0] if i.argv[0] == "scaler"]
    args = check_command(invocation.argv, invocation.env)
    assert args.actuator == "kubernetes"
    # It scales Deployments in its own namespace, where its Role is.
    assert args.namespace == role["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert args.etcd.split(",") == etcd_client_urls()
    assert deployment["spec"]["replicas"] >= 2, "one scaler leads, another stands by"


# -- every ringmesh command line ------------------------------------------------------------


@pytest.mark.parametrize("invocation", every_invocation(), ids=lambda i: i.where)
def test_every_ringmesh_command_line_is_one_the_cli_takes(invocation: Invocation) -> None:
    assert invocation.unreadable is None, invocation.unreadable
    check_command(invocation.argv, invocation.env)


@pytest.mark.parametrize(
    ("argv", "env", "why"),
    [
        (["sidecar", "--service", "orders", "--drain-grace", "soon"], {}, "invalid float"),
        (["sidecar", "--service", "orders", "--sevrice", "x"], {}, "unrecognized arguments"),
        (["sidecar"], {}, "--service"),
        (["sidecar", "--service", "Orders!"], {}, "invalid service name"),
        (["sidecar", "--service", "orders", "--outbound", "0.0.0.0:15001"], {}, "loopback"),
        (["sidecar", "--service", "orders"], {"RINGMESH_DRAIN_GRACEE": "10"}, "no flag reads"),
        (["sidecar", "--service", "orders"], {"RINGMESH_WEIGHT": "heavy"}, "RINGMESH_WEIGHT"),
        (["scaler", "--actuator", "kubernetes"], {"RINGMESH_APP": "x:1"}, "no flag reads"),
        (["scaler", "--actuator", "k8s"], {}, "invalid choice"),
        (
            ["sidecar", "--service", "orders", "--etcd", "http://etcd-0.etcd:2379/v3"],
            {},
            "invalid etcd endpoint",
        ),
    ],
)
def test_the_command_line_check_refuses_what_the_cli_would(
    argv: list[str], env: dict[str, str], why: str
) -> None:
    with pytest.raises(BadCommand, match=re.escape(why)):
        check_command(argv, env)


def demo_args(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, int, str]:
    """The demo app's own parser's reading of ``argv`` (it is not started)."""
    seen: list[tuple[str, int, str]] = []

    async def serve(host: str, port: int, instance: str) -> None:
        seen.append((host, port, instance))

    monkeypatch.setattr(demo, "serve", serve)
    try:
        with contextlib.redirect_stderr(io.StringIO()) as errors:
            demo.main(argv)
    except SystemExit:
        raise BadCommand(
            f"python -m ringmesh.demo {shlex.join(argv)}: {errors.getvalue().strip()}"
        ) from None
    (args,) = seen
    return args


def test_demo_apps_listen_where_their_sidecar_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each demo app (Kubernetes pod, compose network namespace) is its sidecar's --app."""
    k8s_invocations, k8s_apps = kubernetes_commands()
    (app,) = k8s_apps
    assert app.where == "Deployment/orders app"
    (sidecar,) = [i for i in k8s_invocations if i.argv[0] == "sidecar"]
    host, port, _ = demo_args(app.argv, monkeypatch)
    assert f"{host}:{port}" == check_command(sidecar.argv, sidecar.env).app
    compose_invocations, compose_apps = compose_commands()
    services = compose()["services"]
    assert len(compose_apps) == 2
    for app in compose_apps:
        name = app.where.removeprefix("compose service ")
        host, port, instance = demo_args(app.argv, monkeypatch)
        assert instance == name
        (sidecar,) = [
            i
            for i in compose_invocations
            if services[i.where.removeprefix("compose service ")].get("network_mode")
            == f"service:{name}"
        ]
        args = check_command(sidecar.argv, sidecar.env)
        assert args.app == f"{host}:{port}" and ipaddress.ip_address(host).is_loopback


# -- Docker ---------------------------------------------------------------------------------


def docker_ignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out (the last matching pattern wins; a
    pattern matching a directory matches what is in it)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.strip("/").split("/")
    ignored = False
    for raw in patterns:
        negated = raw.startswith("!")
        compiled = regex(raw.removeprefix("!").strip("/"))
        if any(compiled.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negated
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_the_dockerfile_builds_the_wheel_and_installs_it_in_a_slim_python() -> None:
    instructions = dockerfile_instructions()
    first_stage = [word for word, _ in instructions].index("FROM")
    args = pairs([rest for word, rest in instructions[:first_stage] if word == "ARG"])
    stages = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest).split()
        for word, rest in instructions
        if word == "FROM"
    ]
    assert len(stages) >= 2, "a multi-stage build"
    assert stages[0][0].startswith("rust:") and stages[0][-2:] == ["AS", "build"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stages[-1][0]), stages[-1]
    runs = [rest for word, rest in instructions if word == "RUN"]
    assert any("pip wheel" in run and "[kubernetes]" in run for run in runs)
    assert any("pip install" in run and "from=build" in run for run in runs)
    assert dockerfile_exec_form("ENTRYPOINT") == ["ringmesh"]
    (user,) = [rest for word, rest in instructions if word == "USER"]
    assert user not in ("root", "0")
    pod_user = find("Deployment", "orders")["spec"]["template"]["spec"]["securityContext"]
    assert str(pod_user["runAsUser"]) == user
    # What is copied exists, and the context holds it; host build output stays out.
    patterns = dockerignore_patterns()
    copied = [rest.split()[:-1] for word, rest in instructions if word == "COPY"]
    sources = [s for group in copied for s in group if not s.startswith("--")]
    assert {"pyproject.toml", "dataplane/", "ringmesh/", "sidecar/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not docker_ignored(source, patterns), f"{source} is not in the build context"
    for kept in ("dataplane/src/lib.rs", "dataplane/Cargo.lock", "proto/demo_pb2.py"):
        assert not docker_ignored(kept, patterns), kept
    for left_out in (
        ".venv/bin/python",
        "dataplane/target/release/libringmesh_dataplane.so",
        "dataplane/_native.abi3.so",
        "ringmesh/__pycache__/cli.cpython-311.pyc",
        ".git/HEAD",
        "tests/conftest.py",
    ):
        assert docker_ignored(left_out, patterns), left_out


def test_what_the_dockerfile_copies_is_a_complete_package_source(tmp_path: Path) -> None:
    """The files the build stage gets (its COPY sources, less what the ignore file leaves
    out of the context) make a package maturin accepts, Rust crate included."""
    # The venv's maturin (the dev extra's), else one on PATH.
    maturin = shutil.which("maturin", path=str(Path(sys.executable).parent)) or shutil.which(
        "maturin"
    )
    if maturin is None:
        pytest.skip("no maturin")
    patterns = dockerignore_patterns()
    copies = [rest.split() for word, rest in dockerfile_instructions() if word == "COPY"]
    context = tmp_path / "context"
    for *sources, _ in copies:
        for source in (s for s in sources if not s.startswith("--")):
            top = ROOT / source
            for path in [top] if top.is_file() else sorted(top.rglob("*")):
                relative = path.relative_to(ROOT).as_posix()
                if path.is_file() and not docker_ignored(relative, patterns):
                    (context / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, context / relative)
    assert not list(context.rglob("target")), "no Rust build output in the context"
    result = subprocess.run(
        [maturin, "sdist", "--out", str(tmp_path / "dist")],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CARGO_NET_OFFLINE": "true"},
    )
    if result.returncode != 0 and "failed to download" in result.stderr:
        pytest.skip("the crates are not in cargo's cache (offline)")
    assert result.returncode == 0, result.stderr[-2000:]
    (sdist,) = [p.name for p in (tmp_path / "dist").iterdir()]
    assert sdist.startswith("ringmesh-") and sdist.endswith(".tar.gz")


def test_the_image_without_a_command_needs_its_service() -> None:
    with pytest.raises(BadCommand, match="--service"):
        check_command(image_default_argv()[1:], {})


def test_the_builder_rust_is_new_enough_for_the_lock_file() -> None:
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("no cargo")
    result = subprocess.run(
        [
            cargo,
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--features",
            "python",
            "--manifest-path",
            str(ROOT / "dataplane" / "Cargo.toml"),
            "--filter-platform",
            "x86_64-unknown-linux-gnu",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        pytest.skip(f"cargo metadata (offline): {result.stderr.strip()[-200:]}")
    metadata = json.loads(result.stdout)
    packages = {p["id"]: p for p in metadata["packages"]}
    nodes = {n["id"]: n for n in metadata["resolve"]["nodes"]}
    built, todo = set(), [metadata["resolve"]["root"]]
    while todo:  # what the release build compiles: normal and build dependencies
        node = todo.pop()
        if node not in built:
            built.add(node)
            todo += [
                dep["pkg"]
                for dep in nodes[node]["deps"]
                if any(k["kind"] in (None, "build") for k in dep["dep_kinds"])
            ]

    def version(text: str) -> tuple[int, int, int]:
        major, minor, patch = ([int(part) for part in text.split(".")] + [0, 0])[:3]
        return major, minor, patch

    needed = max(
        (version(packages[p]["rust_version"]), packages[p]["name"])
        for p in built
        if packages[p].get("rust_version")
    )
    rust = pairs([r for w, r in dockerfile_instructions() if w == "ARG"])["RUST_VERSION"]
    assert version(rust) >= needed[0], f"{needed[1]} needs Rust {needed[0]}, the image has {rust}"


# -- Docker Compose ---------------------------------------------------------------------------


def test_the_compose_file_runs_etcd_two_instances_and_a_scaler() -> None:
    doc = compose()
    services = doc["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on {dependency}"
        if "build" in service:
            build = service["build"]
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == ROOT and context / build["dockerfile"] == DOCKERFILE
        if "network_mode" in service:
            assert "ports" not in service, f"{name}: ports belong to the namespace's owner"
    etcd = services["etcd"]
    assert etcd["healthcheck"]["test"][0] == "CMD"
    assert "--advertise-client-urls=http://etcd:2379" in etcd["command"]
    invocations, apps = compose_commands()
    sidecars = [i for i in invocations if i.argv[0] == "sidecar"]
    assert len(apps) == 2 and len(sidecars) == 2
    ids, addresses = set(), set()
    for invocation in sidecars:
        name = invocation.where.removeprefix("compose service ")
        service = services[name]
        args = check_command(invocation.argv, invocation.env)
        assert args.service == "orders"
        assert args.etcd == "http://etcd:2379"
        owner = service["network_mode"].removeprefix("service:")
        assert owner in services and services[owner]["entrypoint"][:3] == [
            "python",
            "-m",
            "ringmesh.demo",
        ]
        # Peers dial the namespace owner's name on the compose network.
        assert args.advertise == f"{owner}:{port_of(args.inbound)}"
        assert split_hostport(args.admin, what="--admin")[0] == "0.0.0.0"
        published = [p.split(":") for p in services[owner]["ports"]]
        assert [int(inside) for _, inside in published] == [port_of(args.admin)]
        assert seconds(service["stop_grace_period"]) > args.drain_grace + 1
        assert service["depends_on"]["etcd"]["condition"] == "service_healthy"
        health = service["healthcheck"]["test"]
        assert health[:3] == ["CMD", "python", "-c"]
        assert f"127.0.0.1:{port_of(args.inbound)}" in health[3]
        ids.add(args.instance_id)
        addresses.add(args.advertise)
    assert len(ids) == len(addresses) == 2
    (scaler,) = [i for i in invocations if i.argv[0] == "scaler"]
    assert check_command(scaler.argv, scaler.env).actuator == "none"


# -- systemd --------------------------------------------------------------------------------


def test_systemd_units_drain_before_they_are_killed() -> None:
    for unit in systemd_units():
        service = unit_file(unit)["Service"]
        (invocation,) = [i for i in systemd_commands() if i.where == unit.name]
        args = check_command(invocation.argv, invocation.env)
        assert service["KillSignal"] == ["SIGTERM"]
        assert service["Restart"] == ["on-failure"]
        assert service["User"] != ["root"]
        if args.command == "sidecar":
            assert "@" in unit.name and args.service == TEMPLATE_INSTANCE
            (timeout,) = service["TimeoutStopSec"]
            assert seconds(timeout) > args.drain_grace + 1, unit.name
            after = [w for v in unit_file(unit)["Unit"]["After"] for w in v.split()]
            assert "%i.service" in after, "stopped before the app it fronts"


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze")
    names = []
    for unit in systemd_units():
        # ExecStart must name an executable that exists here.
        text = unit.read_text().replace("/opt/ringmesh/bin/ringmesh", sys.executable)
        (tmp_path / unit.name).write_text(text)
        names.append(str(tmp_path / unit.name.replace("@.", f"@{TEMPLATE_INSTANCE}.")))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *names], capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stderr.strip()) == (0, "")


# -- Grafana --------------------------------------------------------------------------------


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(dashboard["panels"]))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
    titles = " ".join(p["title"] for p in panels).lower()
    for signal in ("calls served", "errors", "latency", "in flight", "retries", "ejections"):
        assert signal in titles
    assert "authorization" in titles and "replicas" in titles


def test_the_dashboard_queries_only_what_the_sidecar_serves() -> None:
    served = served_series(offline_metrics_text())
    assert dashboard_problems(load_dashboard(), served) == []
    used = set().union(*(q.metrics for q in dashboard_queries(load_dashboard())))
    for golden in (
        "rpc_server_duration_milliseconds_count",
        "rpc_server_duration_milliseconds_bucket",
        "ringmesh_inflight",
        "ringmesh_retries_total",
        "ringmesh_ejections_total",
        "ringmesh_authz_denied_total",
    ):
        assert golden in used


def test_the_metric_check_catches_a_wrong_name_or_label() -> None:
    served = served_series(offline_metrics_text())
    wrong = {
        "panels": [
            {"title": "a", "targets": [{"refId": "A", "expr": "rate(ringmesh_retries[5m])"}]},
            {
                "title": "b",
                "targets": [
                    {"refId": "A", "expr": 'sum by (service) (ringmesh_inflight{dir="in"})'}
                ],
            },
        ]
    }
    assert dashboard_problems(wrong, served) == [
        "panel 'a' A: ringmesh_retries is not served",
        "panel 'b' A: no label dir on ['ringmesh_inflight']",
        "panel 'b' A: no label service on ['ringmesh_inflight']",
    ]


def test_promql_names_reads_metrics_and_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (service_name, le) (rate(x_bucket{code!="0", a=~"$v"}'
        "[$__rate_interval] offset 5m)) * on (job) group_left (service_name) target_info) / "
        "ignoring (le) count(y) > bool 2"
    )
    assert promql_names(expr) == (
        {"x_bucket", "target_info", "y"},
        {"service_name", "le", "code", "a", "job"},
    )
