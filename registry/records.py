"""Values stored in etcd: JSON documents an operator can read with etcdctl."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

from registry.errors import InvalidName, RecordError
from registry.keys import validate_instance_id, validate_service

SERVING = "serving"
DRAINING = "draining"
STATES = (SERVING, DRAINING)
MAX_WEIGHT = 1000


def validate_weight(weight: int) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise InvalidName(
            f"invalid weight {describe(weight)}: must be an integer from 1 to {MAX_WEIGHT}"
        )
    return weight


@dataclass(frozen=True)
class InstanceRecord:
    """``instances/<service>/<id>``: one live instance, kept under its lease."""

    id: str
    service: str
    address: str
    zone: str = ""
    weight: int = 1
    state: str = SERVING
    grpc_services: tuple[str, ...] = field(default=())
    version: str = ""
    started_at: float = 0.0
    # Extension to the contract's fields: full paths of the app's unary
    # methods (from its reflection service), so peers' sidecars can take the
    # cheaper unary proxy path for them.
    unary_methods: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        validate_instance_id(self.id)
        validate_service(self.service)
        validate_weight(self.weight)
        if self.state not in STATES:
            raise InvalidName(f"invalid state {describe(self.state)}: must be one of {STATES}")
        if not _is_host_port(self.address):
            raise InvalidName(f"invalid address {describe(self.address)}: must be HOST:PORT")

    @property
    def serving(self) -> bool:
        return self.state == SERVING

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["grpc_services"] = list(self.grpc_services)
        doc["unary_methods"] = list(self.unary_methods)
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> InstanceRecord:
        """Parse a stored record; raise RecordError on anything malformed."""
        doc = load_object(raw)
        try:
            return cls(
                id=_field(doc, "id", str),
                service=_field(doc, "service", str),
                address=_field(doc, "address", str),
                zone=_field(doc, "zone", str, ""),
                weight=_field(doc, "weight", int, 1),
                state=_field(doc, "state", str, SERVING),
                grpc_services=tuple(string_list(doc, "grpc_services")),
                version=_field(doc, "version", str, ""),
                started_at=float(_field(doc, "started_at", (int, float), 0.0)),
                unary_methods=tuple(string_list(doc, "unary_methods")),
            )
        except (InvalidName, OverflowError, ValueError, TypeError) as exc:
            # Whatever a field's validation raises, the record is skipped, never fatal.
            raise record_error(str(exc)) from exc


class _Stored(Protocol):
    @property
    def key(self) -> str: ...


S = TypeVar("S", bound=_Stored)
R = TypeVar("R")


def parse_or_skip(stored: Iterable[S], parse: Callable[[S], R], logger: logging.Logger) -> list[R]:
    """Parse each stored value; one that does not parse is logged and skipped, never fatal."""
    parsed = []
    for item in stored:
        try:
            parsed.append(parse(item))
        except (RecordError, InvalidName) as exc:
            logger.warning("skipping %s: %s", item.key, exc)
    return parsed


MAX_PORT_DIGITS = 5  # bounds the int() below: a longer string is never a port


def _is_host_port(address: object) -> bool:
    if not isinstance(address, str):
        return False
    host, sep, port = address.rpartition(":")
    return (
        bool(sep and host)
        and host.isprintable()
        and not any(c.isspace() for c in host)  # it ends up in dial strings and logs
        and port.isascii()
        and port.isdigit()
        and len(port) <= MAX_PORT_DIGITS
        and 0 < int(port) < 65536
    )


MAX_SHOWN = 80  # characters of a bad value quoted in an error message
MAX_MESSAGE = 300  # characters of a record error: one log line, whatever the record holds


def describe(value: object) -> str:
    """repr() of a bad value for an error message: one short line, whatever the value."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past the max-str-digits limit, deep nesting
        return f"<{type(value).__name__}>"
    return text if len(text) <= MAX_SHOWN else f"{text[: MAX_SHOWN - 3]}..."


def record_error(message: str) -> RecordError:
    """A RecordError whose message is one line of bounded length."""
    line = " ".join(message.splitlines())
    if len(line) > MAX_MESSAGE:
        line = f"{line[: MAX_MESSAGE - 3]}..."
    return RecordError(line)


# No record ringmesh writes comes near this (an instance record is ~300 bytes);
# a bigger value is someone else's, or hostile, and parsing it would cost every
# watcher's memory and CPU. (etcd itself takes values up to ~1.5 MiB.)
MAX_RECORD_BYTES = 256 * 1024


def load_object(raw: bytes) -> dict[str, Any]:
    """A stored value as a JSON object; RecordError (one bounded line) on anything else,
    a value over MAX_RECORD_BYTES included (skipped unread)."""
    if isinstance(raw, bytes | bytearray | str) and len(raw) > MAX_RECORD_BYTES:
        raise RecordError(f"{len(raw)} bytes, over the {MAX_RECORD_BYTES // 1024} KiB record limit")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise record_error(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RecordError(f"expected a JSON object, got {type(doc).__name__}")
    return doc


_MISSING: Any = object()


def _field(doc: dict[str, Any], name: str, kind: Any, default: Any = _MISSING) -> Any:
    value = doc.get(name, default)
    if value is _MISSING:
        raise RecordError(f"missing field {name!r}")
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RecordError(f"field {name!r} has the wrong type ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordError(f"field {name!r} is not finite")
    return value


def string_list(doc: dict[str, Any], name: str, *, required: bool = False) -> list[str]:
    """A field holding a JSON list of strings (absent: empty, unless ``required``)."""
    value = doc.get(name, _MISSING if required else [])
    if value is _MISSING:
        raise RecordError(f"missing field {name!r}")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"field {name!r} must be a list of strings")
    return value
