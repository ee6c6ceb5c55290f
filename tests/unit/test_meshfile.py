"""The mesh file of `ringmesh up -f`: what parses, and one line (file:line: field: ...) for
everything that does not."""

from __future__ import annotations

import shlex
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from registry.errors import ConfigError
from registry.scaling import Policy
from ringmesh.meshfile import MeshFile, ServiceSpec, expand_command, load_meshfile
from scaler.actuators import CommandLauncher

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "local" / "mesh.yaml"

GOOD = """\
services:
  backend:
    command: "{python} -m ringmesh.demo --port {port} --instance {instance}"
    replicas: 2
    idempotent: ["/ringmesh.demo.v1.Demo/*"]
  frontend:
    command: "{python} frontend.py --port {port} --backend {outbound}"
    policy: {min: 1, max: 3, metric: inflight, target: 5}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_meshfile(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_valid_file_parses_to_services_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    mesh = load_meshfile(path)
    assert mesh == MeshFile(
        path=path,
        services=(
            ServiceSpec(
                name="backend",
                command=("{python}", "-m", "ringmesh.demo", "--port", "{port}", "--instance",
                         "{instance}"),
                command_text="{python} -m ringmesh.demo --port {port} --instance {instance}",
                replicas=2,
                idempotent=("/ringmesh.demo.v1.Demo/*",),
            ),
            ServiceSpec(
                name="frontend",
                command=("{python}", "frontend.py", "--port", "{port}", "--backend", "{outbound}"),
                command_text="{python} frontend.py --port {port} --backend {outbound}",
                policy=Policy(min_replicas=1, max_replicas=3, metric="inflight", target=5.0),
            ),
        ),
    )  # fmt: skip
    assert mesh.directory == tmp_path.resolve()
    backend = mesh.service("backend")
    assert backend.sidecar_args() == ["--idempotent", "/ringmesh.demo.v1.Demo/*"]
    assert expand_command(backend.command, {"python": "/py", "port": "7", "instance": "b-1"}) == [
        "/py", "-m", "ringmesh.demo", "--port", "7", "--instance", "b-1",
    ]  # fmt: skip


def test_the_example_is_the_file_documented_here(tmp_path: Path) -> None:
    assert load_meshfile(EXAMPLE).services == load_meshfile(write(tmp_path, GOOD)).services


def test_every_setting_and_the_list_form_of_a_command(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        x-defaults: &defaults
          zone: eu-1
          weight: 3
        services:
          api:
            <<: *defaults
            weight: 5
            command: ["{python}", "-c", "print('{{}}')", "{port} {etcd}", "{service}"]
            policy:
              min: 0
              max: 4
              metric: p99_ms
              target: 250
              tolerance: 0.2
              scale_up_window: 5
              scale_down_window: 60
              mode: predictive
            idempotent: ["/a.B/Get*", "*"]
        """,
    )
    (api,) = load_meshfile(path).services
    assert api.command == ("{python}", "-c", "print('{{}}')", "{port} {etcd}", "{service}")
    assert shlex.split(api.command_line) == list(api.command)
    assert api.weight == 5 and api.zone == "eu-1"  # its own weight wins over the merged one
    assert api.policy == Policy(0, 4, "p99_ms", 250.0, 0.2, 5.0, 60.0, "predictive")
    assert api.sidecar_args() == [
        "--idempotent", "/a.B/Get*", "--idempotent", "*", "--weight", "5", "--zone", "eu-1",
    ]  # fmt: skip
    values = {"python": "py", "port": "1", "etcd": "http://e:1,http://f:2", "service": "api"}
    assert expand_command(api.command, values) == [
        "py", "-c", "print('{}')", "1 http://e:1,http://f:2", "api",
    ]  # fmt: skip


def test_the_scalers_template_hands_the_app_command_through_unchanged(tmp_path: Path) -> None:
    """The local actuator formats every word of its template: the app's own placeholders
    (and literal braces) must come out of it as written."""
    from ringmesh.meshrun import _Run

    path = write(tmp_path, GOOD.replace("--backend {outbound}", "--backend {outbound} '{{x}}'"))
    mesh = load_meshfile(path)
    run = _Run(mesh, stop=threading.Event(), hurry=threading.Event(), out=sys.stdout)
    run.run_dir = tmp_path / "run {dir}"
    frontend = mesh.service("frontend")
    launcher = CommandLauncher({"frontend": run.template(frontend)}, etcd="http://e:1", prefix="/p")
    argv = launcher._argv(launcher.templates["frontend"], "frontend", 3)
    assert argv[:3] == [sys.executable, "-m", "ringmesh.instance"]
    given = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert shlex.split(given["--command"]) == list(frontend.command)
    assert given["--announce-dir"] == str(tmp_path / "run {dir}")
    assert given["--cwd"] == str(tmp_path.resolve())
    assert (given["--service"], given["--index"], given["--etcd"]) == (
        "frontend",
        "3",
        "http://e:1",
    )
    # A replicas service: the same words, formatted here.
    backend = run.words(mesh.service("backend"))
    assert backend[-2:] == ["--idempotent", "/ringmesh.demo.v1.Demo/*"]


BAD = [
    # (what, the file, the line and field, the message) -- each file in full, so the lines show
    (
        "a wrong type",
        """\
        services:
          backend:
            command: "{python} -m ringmesh.demo --port {port}"
            replicas: 2
          frontend:
            command: "{python} frontend.py --port {port}"
            replicas: two
        """,
        "7: services.frontend.replicas",
        "must be an integer >= 1, got 'two'",
    ),
    ("replicas 0", "services:\n  a:\n    command: '{python} {port}'\n    replicas: 0\n",
     "4: services.a.replicas", "must be an integer >= 1, got 0"),
    ("replicas true", "services:\n  a:\n    command: '{python} {port}'\n    replicas: true\n",
     "4: services.a.replicas", "must be an integer >= 1, got True"),
    ("replicas 2.5", "services:\n  a:\n    command: '{python} {port}'\n    replicas: 2.5\n",
     "4: services.a.replicas", "must be an integer >= 1, got 2.5"),
    ("a missing command", "services:\n  a:\n    replicas: 1\n",
     "2: services.a.command", "missing: the command that runs the app"),
    ("a command of the wrong type", "services:\n  a:\n    command: 5\n    replicas: 1\n",
     "3: services.a.command", "must be a string or a list, got 5"),
    ("an empty command", "services:\n  a:\n    command: ''\n    replicas: 1\n",
     "3: services.a.command", "is empty"),
    ("an unclosed quote", "services:\n  a:\n    command: \"x '{port}\"\n    replicas: 1\n",
     "3: services.a.command", "cannot split it into words: No closing quotation"),
    ("both replicas and policy",
     "services:\n  a:\n    command: '{python} {port}'\n    replicas: 1\n"
     "    policy: {min: 1, max: 2, metric: rps, target: 9}\n",
     "5: services.a.policy", "give either 'replicas' or 'policy', not both"),
    ("neither replicas nor policy", "services:\n  a:\n    command: '{python} {port}'\n",
     "2: services.a", "missing 'replicas' (how many instances) or 'policy'"),
    ("an unknown key", "services:\n  a:\n    command: '{python} {port}'\n    replica: 1\n",
     "4: services.a.replica", "unknown key (did you mean 'replicas'?)"),
    ("an unknown top-level key", "version: '3'\nservices:\n  a:\n    command: x\n",
     "1: version", "unknown key (expected one of: services)"),
    ("an unknown placeholder",
     "services:\n  a:\n    command: '{python} --port {port} --peer {outbund}'\n    replicas: 1\n",
     "3: services.a.command", "unknown placeholder {outbund} (known: {port}, {outbound}, {etcd}, "
                              "{service}, {instance}, {python})"),
    ("a placeholder with a format spec",
     "services:\n  a:\n    command: '{python} {port:05}'\n    replicas: 1\n",
     "3: services.a.command", "{port:05}: a placeholder is just {port}"),
    ("an unmatched brace", "services:\n  a:\n    command: '{python} {port} }'\n    replicas: 1\n",
     "3: services.a.command", "a lone brace in '}' (Single '}' encountered in format string): "
                              "write {{ and }} for a brace"),
    ("no {port}", "services:\n  a:\n    command: '{python} app.py'\n    replicas: 1\n",
     "3: services.a.command", "must use {port}: the app listens where its sidecar expects it"),
    ("a program not on PATH",
     "services:\n  a:\n    command: 'no-such-program-x {port}'\n    replicas: 1\n",
     "3: services.a.command", "program 'no-such-program-x' not found on PATH"),
    ("a program not in the file's directory",
     "services:\n  a:\n    command: './missing.sh {port}'\n    replicas: 1\n",
     "3: services.a.command", "program './missing.sh' not found"),
    ("a bad service name", "services:\n  Back_End:\n    command: '{python} {port}'\n    replicas: 1\n",
     "2: services.Back_End", "invalid service name 'Back_End': must be a DNS label"),
    ("min above max",
     "services:\n  a:\n    command: '{python} {port}'\n"
     "    policy:\n      min: 5\n      max: 2\n      metric: rps\n      target: 9\n",
     "5: services.a.policy.min", "min (5) must not exceed max (2)"),
    ("a target of 0", "services:\n  a:\n    command: '{python} {port}'\n"
     "    policy: {min: 1, max: 2, metric: rps,\n             target: 0}\n",
     "5: services.a.policy.target", "must be a finite number > 0, got 0"),
    ("an unknown metric", "services:\n  a:\n    command: '{python} {port}'\n"
     "    policy: {min: 1, max: 2, metric: cpu, target: 1}\n",
     "4: services.a.policy.metric", "must be one of inflight, rps, p99_ms; got 'cpu'"),
    ("a policy's bad window", "services:\n  a:\n    command: '{python} {port}'\n"
     "    policy: {min: 1, max: 2, metric: rps, target: 1,\n"
     "             scale_down_window: soon}\n",
     "5: services.a.policy.scale_down_window", "must be a finite number >= 0 and <= 3600, got 'soon'"),
    ("a policy without a target", "services:\n  a:\n    command: '{python} {port}'\n"
     "    policy: {min: 1, max: 2, metric: rps}\n",
     "4: services.a.policy.target", "missing (a policy needs min, max, metric and target)"),
    ("a policy's unknown key", "services:\n  a:\n    command: '{python} {port}'\n"
     "    policy: {min: 1, max: 2, metric: rps, target: 1, maximum: 3}\n",
     "4: services.a.policy.maximum", "unknown key (did you mean 'max'?)"),
    ("a policy that is not a mapping", "services:\n  a:\n    command: '{python} {port}'\n"
     "    policy: 3\n",
     "4: services.a.policy", "must be a mapping (min, max, metric, target, ...), got 3"),
    ("idempotent not a list", "services:\n  a:\n    command: '{python} {port}'\n    replicas: 1\n"
     "    idempotent: /a.B/*\n",
     "5: services.a.idempotent", "must be a list of method globs, got '/a.B/*'"),
    ("a glob that matches no method", "services:\n  a:\n    command: '{python} {port}'\n"
     "    replicas: 1\n    idempotent:\n      - /a.B/*\n      - a.B/Get\n",
     "7: services.a.idempotent[1]", "'a.B/Get' matches no method: paths look like '/pkg.Svc/*'"),
    ("a weight out of range", "services:\n  a:\n    command: '{python} {port}'\n    replicas: 1\n"
     "    weight: 0\n",
     "5: services.a.weight", "must be an integer from 1 to 1000, got 0"),
    ("a zone that is not a string", "services:\n  a:\n    command: '{python} {port}'\n"
     "    replicas: 1\n    zone: [a]\n",
     "5: services.a.zone", "must be a string, got a list"),
    ("a key written twice", "services:\n  a:\n    command: '{python} {port}'\n    replicas: 1\n"
     "    replicas: 2\n",
     "5: services.a.replicas", "written twice (first on line 4)"),
    ("no services key", "x-note: nothing here\n", "1: services",
     "missing: list your services under 'services:'"),
    ("no services", "services: {}\n", "1: services", "no services"),
    ("services as a list", "services:\n  - a\n", "2: services",
     "must be a mapping (service name: settings), got a list"),
    ("a service that is not a mapping", "services:\n  a: run it\n", "2: services.a",
     "must be a mapping (command, replicas or policy, ...), got 'run it'"),
    ("not a mapping at all", "- services\n", "1", "expected a mapping with 'services', got a list"),
    ("an empty file", "# nothing\n", "1", "the file is empty: expected a mapping with 'services'"),
    ("a YAML syntax error", "services:\n  a:\n    command: '{python} {port}'\n"
     "    replicas: [1\n  b:\n", "5",
     "invalid YAML: while parsing a flow sequence: expected ',' or ']', but got ':'"),
    ("a YAML indentation error", "services:\n  a:\n    command: x\n   replicas: 1\n",
     "4", "expected <block end>, but found '<block mapping start>'"),
    ("two documents", "services: {}\n---\nservices: {}\n", "2",
     "invalid YAML: expected a single document in the stream: but found another document"),
    ("a character YAML refuses", "services:\n  a: \x07\n", "2",
     "invalid YAML: character U+0007 is not allowed"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "text", "where", "message"), BAD, ids=[b[0] for b in BAD])
def test_a_malformed_file_is_one_line_naming_the_file_the_line_and_the_field(
    tmp_path: Path, what: str, text: str, where: str, message: str
) -> None:
    path = write(tmp_path, text)
    got = error(path)
    assert got.startswith(f"{path}:{where}: "), got
    assert message in got, got


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert error(path) == f"cannot read mesh file {str(path)!r}: No such file or directory"
    assert error(tmp_path) == f"cannot read mesh file {str(tmp_path)!r}: Is a directory"


def test_a_file_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_bytes(b"services:\n  a:\n    command: '\xff'\n")
    assert error(path) == f"{path}:3: not UTF-8 text"
