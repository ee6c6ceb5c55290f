"""`ringmesh up -f mesh.yaml`: the mesh file, parsed and checked (running it: meshrun.py).

```yaml
services:
  backend:
    command: "{python} -m ringmesh.demo --port {port} --instance {instance}"
    replicas: 2
    idempotent: ["/ringmesh.demo.v1.Demo/*"]
  frontend:
    command: "{python} frontend.py --port {port} --backend {outbound}"
    policy: {min: 1, max: 3, metric: inflight, target: 5}
```

Every mistake is one ConfigError line naming the file, the line and the
field: ``mesh.yaml:7: services.frontend.replicas: must be an integer >= 1,
got 'two'``. Lines come from PyYAML's node marks (the file is composed, not
loaded, so each value keeps where it was written).
"""

from __future__ import annotations

import difflib
import shlex
import shutil
import string
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from registry.errors import ConfigError
from registry.keys import validate_service
from registry.records import MAX_WEIGHT, describe, validate_weight
from registry.scaling import MAX_REPLICAS, Policy

# What a command may use; each is filled in per instance (ringmesh/instance.py).
PLACEHOLDERS = {
    "port": "the port the app must listen on (on 127.0.0.1), chosen free by ringmesh",
    "outbound": "host:port of this instance's sidecar outbound port, where the app calls peers",
    "etcd": "the etcd URLs, comma separated",
    "service": "the service's name",
    "instance": "the instance id, e.g. backend-2",
    "python": "the Python running ringmesh (sys.executable)",
}
SERVICE_KEYS = ("command", "replicas", "policy", "idempotent", "weight", "zone")
# Policy keys as `ringmesh policy set` flags, and the Policy fields they fill.
POLICY_FIELDS = {
    "min": "min_replicas",
    "max": "max_replicas",
    "metric": "metric",
    "target": "target",
    "tolerance": "tolerance",
    "scale_up_window": "scale_up_window_s",
    "scale_down_window": "scale_down_window_s",
    "mode": "mode",
}
POLICY_REQUIRED = ("min", "max", "metric", "target")


@dataclass(frozen=True)
class ServiceSpec:
    """One service of a mesh file: how to run an instance, and how many."""

    name: str
    command: tuple[str, ...]  # the words, placeholders not yet filled in
    command_text: str  # as written (a list's words joined)
    replicas: int | None = None  # exactly one of replicas and policy is set
    policy: Policy | None = None
    idempotent: tuple[str, ...] = ()
    weight: int | None = None
    zone: str | None = None

    @property
    def command_line(self) -> str:
        """The words as one line that shlex splits back into them."""
        return shlex.join(self.command)

    def sidecar_args(self) -> list[str]:
        """The sidecar flags this service's settings ask for."""
        args: list[str] = []
        for glob in self.idempotent:
            args += ["--idempotent", glob]
        if self.weight is not None:
            args += ["--weight", str(self.weight)]
        if self.zone is not None:
            args += ["--zone", self.zone]
        return args


@dataclass(frozen=True)
class MeshFile:
    path: Path  # as given: error messages name it so
    services: tuple[ServiceSpec, ...]  # in file order

    @property
    def directory(self) -> Path:
        """Where commands run (absolute)."""
        return self.path.resolve().parent

    def service(self, name: str) -> ServiceSpec:
        return next(s for s in self.services if s.name == name)


def expand_command(words: tuple[str, ...] | list[str], values: Mapping[str, str]) -> list[str]:
    """Fill in the placeholders of a checked command, word by word (after the shlex split,
    so a value with spaces stays one argument)."""
    return [word.format_map(values) for word in words]


def run_meshfile(path: Path, *, duration: float | None, as_json: bool, etcd_members: int) -> int:
    """`ringmesh up -f PATH`: parse (ConfigError: exit 2), then run the services."""
    mesh = load_meshfile(path)
    from ringmesh.meshrun import run_mesh

    return run_mesh(mesh, duration=duration, as_json=as_json, etcd_members=etcd_members)


def load_meshfile(path: Path) -> MeshFile:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read mesh file {str(path)!r}: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text") from exc
    return parse_meshfile(text, path)


def parse_meshfile(text: str, path: Path) -> MeshFile:
    return _Parser(text, path).parse()


class _Parser:
    def __init__(self, text: str, path: Path) -> None:
        self.text = text
        self.path = path
        self.loader: yaml.SafeLoader
        self._mappings: dict[int, dict[str, tuple[ScalarNode, Node]]] = {}

    # -- errors ------------------------------------------------------------------------

    def fail(self, node: Node, field: str, message: str) -> NoReturn:
        where = f"{field}: " if field else ""
        raise ConfigError(f"{self.path}:{node.start_mark.line + 1}: {where}{message}")

    # -- YAML --------------------------------------------------------------------------

    def parse(self) -> MeshFile:
        try:
            self.loader = yaml.SafeLoader(self.text)  # reads every character first
            try:
                root = self.loader.get_single_node()
                if root is None:
                    raise ConfigError(
                        f"{self.path}:1: the file is empty: expected a mapping with 'services'"
                    )
                return self._mesh(root)
            finally:
                self.loader.dispose()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            problem = ": ".join(str(part) for part in (exc.context, exc.problem) if part)
            raise ConfigError(f"{self.path}:{line}: invalid YAML: {problem}") from None
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow
            line = self.text.count("\n", 0, exc.position) + 1
            raise ConfigError(
                f"{self.path}:{line}: invalid YAML: character U+{exc.character:04X} is not allowed"
            ) from None

    def value(self, node: Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: Node, field: str, what: str) -> dict[str, tuple[ScalarNode, Node]]:
        """A mapping's entries by key text, YAML merge keys (``<<: *anchor``) applied;
        a key written twice is an error (YAML loaders silently keep the last)."""
        if not isinstance(node, MappingNode):
            self.fail(node, field, f"must be a mapping ({what}), got {self.shown(node)}")
        cached = self._mappings.get(id(node))  # an alias: the same node again
        if cached is not None:
            return cached
        merge = "tag:yaml.org,2002:merge"
        own: dict[str, ScalarNode] = {}
        for key, _ in node.value:
            if key.tag == merge:
                continue
            name = self.key(key, field)
            if name in own:
                first = own[name].start_mark.line + 1
                self.fail(key, _join(field, name), f"written twice (first on line {first})")
            own[name] = key
        self.loader.flatten_mapping(node)
        entries = {self.key(key, field): (key, value) for key, value in node.value}
        self._mappings[id(node)] = entries
        return entries

    def key(self, node: Node, field: str) -> str:
        if not isinstance(node, ScalarNode):
            self.fail(node, field, "a key must be a plain name")
        # The text as written: a service named `on` or `123` stays a name.
        return str(node.value)

    def shown(self, node: Node) -> str:
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        return describe(self.value(node))

    def unknown(self, key: ScalarNode, field: str, name: str, known: tuple[str, ...]) -> NoReturn:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(known)}"
        self.fail(key, _join(field, name), f"unknown key ({hint})")

    # -- the file ------------------------------------------------------------------------

    def _mesh(self, root: Node) -> MeshFile:
        if not isinstance(root, MappingNode):
            self.fail(root, "", f"expected a mapping with 'services', got {self.shown(root)}")
        top = self.mapping(root, "", "with 'services'")
        for name, (key, _) in top.items():
            # `x-...` keys hold YAML anchors for services to merge, as in compose files.
            if name != "services" and not name.startswith("x-"):
                self.unknown(key, "", name, ("services",))
        if "services" not in top:
            self.fail(root, "services", "missing: list your services under 'services:'")
        key, node = top["services"]
        entries = self.mapping(node, "services", "service name: settings")
        if not entries:
            self.fail(key, "services", "no services")
        services = tuple(
            self._service(name, name_node, value) for name, (name_node, value) in entries.items()
        )
        return MeshFile(self.path, services)

    def _service(self, name: str, name_node: ScalarNode, node: Node) -> ServiceSpec:
        field = f"services.{name}"
        try:
            validate_service(name)
        except ConfigError as exc:
            self.fail(name_node, field, str(exc))
        entries = self.mapping(node, field, "command, replicas or policy, ...")
        for key_name, (key, _) in entries.items():
            if key_name not in SERVICE_KEYS:
                self.unknown(key, field, key_name, SERVICE_KEYS)
        if "command" not in entries:
            self.fail(name_node, f"{field}.command", "missing: the command that runs the app")
        sizing = [k for k in ("replicas", "policy") if k in entries]
        if len(sizing) == 2:
            later = max(entries["replicas"][0], entries["policy"][0], key=_line)
            self.fail(
                later, f"{field}.{later.value}", "give either 'replicas' or 'policy', not both"
            )
        if not sizing:
            self.fail(name_node, field, "missing 'replicas' (how many instances) or 'policy'")
        replicas = policy = None
        if "replicas" in entries:
            replicas = self._replicas(entries["replicas"][1], f"{field}.replicas")
        else:
            policy = self._policy(entries["policy"][1], f"{field}.policy")
        command = self._command(entries["command"][1], f"{field}.command")
        return ServiceSpec(
            name=name,
            command=command,
            command_text=_text(entries["command"][1], command),
            replicas=replicas,
            policy=policy,
            idempotent=self._idempotent(entries, f"{field}.idempotent"),
            weight=self._weight(entries, f"{field}.weight"),
            zone=self._zone(entries, f"{field}.zone"),
        )

    def _command(self, node: Node, field: str) -> tuple[str, ...]:
        """A string split as a shell would (no shell runs it), or a list of words."""
        if isinstance(node, SequenceNode):
            words = []
            for i, item in enumerate(node.value):
                word = self.value(item)
                if not isinstance(word, str):
                    self.fail(item, f"{field}[{i}]", f"must be a string, got {self.shown(item)}")
                words.append(word)
        else:
            text = self.value(node) if isinstance(node, ScalarNode) else None
            if not isinstance(text, str):
                self.fail(node, field, f"must be a string or a list, got {self.shown(node)}")
            try:
                words = shlex.split(text)
            except ValueError as exc:  # "No closing quotation"
                self.fail(node, field, f"cannot split it into words: {exc}")
        if not words:
            self.fail(node, field, "is empty")
        used: set[str] = set()
        for word in words:
            used |= self._placeholders(node, field, word)
        if "port" not in used:
            self.fail(node, field, "must use {port}: the app listens where its sidecar expects it")
        self._check_program(node, field, words[0])
        return tuple(words)

    def _placeholders(self, node: Node, field: str, word: str) -> set[str]:
        known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
        try:
            parts = list(string.Formatter().parse(word))
        except ValueError as exc:
            self.fail(
                node, field, f"a lone brace in {word!r} ({exc}): write {{{{ and }}}} for a brace"
            )
        used = set()
        for _, name, spec, conversion in parts:
            if name is None:
                continue
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (
                f":{spec}" if spec else ""
            ) + "}"  # fmt: skip
            if name not in PLACEHOLDERS:
                self.fail(node, field, f"unknown placeholder {shown} (known: {known})")
            if spec or conversion:
                self.fail(node, field, f"{shown}: a placeholder is just {{{name}}}")
            used.add(name)
        return used

    def _check_program(self, node: Node, field: str, word: str) -> None:
        """The program must exist: better said now than as an instance dying later."""
        try:
            program = word.format_map({"python": sys.executable})
        except (KeyError, ValueError, IndexError):
            return  # made of other placeholders: known only per instance
        if "/" in program:
            found = (self.path.resolve().parent / program).is_file()
        else:
            found = shutil.which(program) is not None
        if not found:
            where = "" if "/" in program else " on PATH"
            self.fail(node, field, f"program {program!r} not found{where}")

    def _replicas(self, node: Node, field: str) -> int:
        value = self.value(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            self.fail(node, field, f"must be an integer >= 1, got {self.shown(node)}")
        if value > MAX_REPLICAS:
            self.fail(node, field, f"must be at most {MAX_REPLICAS}, got {value}")
        return value

    def _policy(self, node: Node, field: str) -> Policy:
        """Checked by Policy itself, as `ringmesh policy set` checks it."""
        entries = self.mapping(node, field, "min, max, metric, target, ...")
        keys = tuple(POLICY_FIELDS)
        for name, (key, _) in entries.items():
            if name not in POLICY_FIELDS:
                self.unknown(key, field, name, keys)
        for name in POLICY_REQUIRED:
            if name not in entries:
                self.fail(
                    node, f"{field}.{name}", "missing (a policy needs min, max, metric and target)"
                )
        values = {POLICY_FIELDS[name]: self.value(value) for name, (_, value) in entries.items()}
        try:
            return Policy(**values)
        except (ConfigError, TypeError, ValueError, OverflowError) as exc:
            self._policy_error(str(exc), entries, node, field)

    def _policy_error(
        self, message: str, entries: dict[str, tuple[ScalarNode, Node]], node: Node, field: str
    ) -> NoReturn:
        """Policy's message, in the file's words, at the line of the value it is about."""
        message = message.removeprefix("invalid policy: ")
        by_field = {policy_field: name for name, policy_field in POLICY_FIELDS.items()}
        mentioned = sorted(
            (message.find(policy_field), name)
            for policy_field, name in by_field.items()
            if policy_field in message
        )
        for policy_field in sorted(by_field, key=len, reverse=True):
            message = message.replace(policy_field, by_field[policy_field])
        if not mentioned:
            self.fail(node, field, message)
        name = mentioned[0][1]
        message = (
            message.removeprefix(f"{name} ") if message.startswith(f"{name} must") else message
        )
        target = entries[name][1] if name in entries else node
        self.fail(target, f"{field}.{name}", message)

    def _idempotent(
        self, entries: dict[str, tuple[ScalarNode, Node]], field: str
    ) -> tuple[str, ...]:
        if "idempotent" not in entries:
            return ()
        node = entries["idempotent"][1]
        if not isinstance(node, SequenceNode):
            self.fail(node, field, f"must be a list of method globs, got {self.shown(node)}")
        globs = []
        for i, item in enumerate(node.value):
            glob = self.value(item)
            if not isinstance(glob, str) or not glob:
                self.fail(item, f"{field}[{i}]", f"must be a method glob, got {self.shown(item)}")
            if glob[0] not in "/*?[":  # a method path is /package.Service/Method
                self.fail(
                    item,
                    f"{field}[{i}]",
                    f"{glob!r} matches no method: paths look like '/pkg.Svc/*'",
                )
            globs.append(glob)
        return tuple(globs)

    def _weight(self, entries: dict[str, tuple[ScalarNode, Node]], field: str) -> int | None:
        if "weight" not in entries:
            return None
        node = entries["weight"][1]
        value = self.value(node) if isinstance(node, ScalarNode) else None
        try:
            return validate_weight(value)  # type: ignore[arg-type]
        except ConfigError:
            self.fail(
                node, field, f"must be an integer from 1 to {MAX_WEIGHT}, got {self.shown(node)}"
            )

    def _zone(self, entries: dict[str, tuple[ScalarNode, Node]], field: str) -> str | None:
        if "zone" not in entries:
            return None
        node = entries["zone"][1]
        value = self.value(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, str):
            self.fail(node, field, f"must be a string, got {self.shown(node)}")
        return value


def _text(node: Node, words: tuple[str, ...]) -> str:
    return str(node.value) if isinstance(node, ScalarNode) else shlex.join(words)


def _join(field: str, name: str) -> str:
    return f"{field}.{name}" if field else name


def _line(node: Node) -> int:
    return int(node.start_mark.line)
