"""The scaler's values in etcd: ``policy/``, ``load/`` and ``targets/`` (ARCHITECTURE.md).

Each record is a frozen dataclass that checks its own values (``ConfigError``
naming the field, as a user typing ``ringmesh policy set`` should see it) and
round-trips through compact JSON. ``from_json`` turns anything malformed into
``RecordError``: a record that does not parse is skipped and logged, never fatal.
Fields the contract does not name are ignored, so newer writers can add some.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Self, TypeVar

from registry.errors import ConfigError, RecordError
from registry.records import describe, load_object, record_error

INFLIGHT = "inflight"
RPS = "rps"
P99_MS = "p99_ms"
METRICS = (INFLIGHT, RPS, P99_MS)

REACTIVE = "reactive"
PREDICTIVE = "predictive"
MODES = (REACTIVE, PREDICTIVE)

MAX_REPLICAS = 10_000
MAX_WINDOW_S = 3600.0
MAX_TERM = 2**63 - 1  # a term is an etcd revision: an int64
DEFAULT_TOLERANCE = 0.1
DEFAULT_SCALE_UP_WINDOW_S = 0.0
DEFAULT_SCALE_DOWN_WINDOW_S = 300.0


@dataclass(frozen=True)
class Policy:
    """``policy/<service>``: how one service scales. Invalid values raise ConfigError."""

    min_replicas: int
    max_replicas: int
    metric: str
    target: float
    tolerance: float = DEFAULT_TOLERANCE
    scale_up_window_s: float = DEFAULT_SCALE_UP_WINDOW_S
    scale_down_window_s: float = DEFAULT_SCALE_DOWN_WINDOW_S
    mode: str = REACTIVE

    def __post_init__(self) -> None:
        what = "invalid policy"
        _check_int(self, what, "min_replicas", low=0, high=MAX_REPLICAS)
        _check_int(self, what, "max_replicas", low=1, high=MAX_REPLICAS)
        if self.min_replicas > self.max_replicas:
            raise ConfigError(
                f"{what}: min_replicas ({self.min_replicas}) must not exceed "
                f"max_replicas ({self.max_replicas})"
            )
        _check_choice(what, "metric", self.metric, METRICS)
        _check_float(self, what, "target", low=0.0, low_open=True)
        _check_float(self, what, "tolerance", low=0.0, high=1.0, high_open=True)
        _check_float(self, what, "scale_up_window_s", low=0.0, high=MAX_WINDOW_S)
        _check_float(self, what, "scale_down_window_s", low=0.0, high=MAX_WINDOW_S)
        _check_choice(what, "mode", self.mode, MODES)

    def to_json(self) -> bytes:
        return _dump(self)

    @classmethod
    def from_json(cls, raw: bytes) -> Self:
        """Parse a stored policy; raise RecordError on anything malformed."""
        doc = _load(raw)
        return _build(
            cls,
            min_replicas=_get(doc, "min_replicas", int),
            max_replicas=_get(doc, "max_replicas", int),
            metric=_get(doc, "metric", str),
            target=_get(doc, "target", float),
            tolerance=_get(doc, "tolerance", float, DEFAULT_TOLERANCE),
            scale_up_window_s=_get(doc, "scale_up_window_s", float, DEFAULT_SCALE_UP_WINDOW_S),
            scale_down_window_s=_get(
                doc, "scale_down_window_s", float, DEFAULT_SCALE_DOWN_WINDOW_S
            ),
            mode=_get(doc, "mode", str, REACTIVE),
        )


@dataclass(frozen=True)
class LoadReport:
    """``load/<service>/<id>``: one instance's load over its last report window.

    ``ts`` is the wall-clock time the window ended; the rest are finite and
    non-negative, ``error_rate`` a fraction from 0 to 1.
    """

    ts: float
    window_s: float = 0.0
    rps: float = 0.0
    inflight: float = 0.0
    error_rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0

    def __post_init__(self) -> None:
        what = "invalid load report"
        for name in ("ts", "window_s", "rps", "inflight", "p50_ms", "p99_ms"):
            _check_float(self, what, name, low=0.0)
        _check_float(self, what, "error_rate", low=0.0, high=1.0)

    def value(self, metric: str) -> float:
        """The reading a policy's ``metric`` names."""
        if metric == INFLIGHT:
            return self.inflight
        if metric == RPS:
            return self.rps
        if metric == P99_MS:
            return self.p99_ms
        raise ValueError(f"unknown metric {metric!r}: must be one of {METRICS}")

    def to_json(self) -> bytes:
        return _dump(self)

    @classmethod
    def from_json(cls, raw: bytes) -> Self:
        """Parse a stored load report (every field required); RecordError if malformed."""
        doc = _load(raw)
        names = ("ts", "window_s", "rps", "inflight", "error_rate", "p50_ms", "p99_ms")
        return _build(cls, **{name: _get(doc, name, float) for name in names})


@dataclass(frozen=True)
class Target:
    """``targets/<service>``: the replica count the leader decided, and why."""

    replicas: int
    previous: int
    reason: str
    metric: float
    decided_at: float
    term: int
    leader: str

    def __post_init__(self) -> None:
        what = "invalid target"
        _check_int(self, what, "replicas", low=0, high=MAX_REPLICAS)
        _check_int(self, what, "previous", low=0, high=MAX_REPLICAS)
        _check_int(self, what, "term", low=0, high=MAX_TERM)
        _check_float(self, what, "metric", low=0.0)
        _check_float(self, what, "decided_at", low=0.0)
        for name in ("reason", "leader"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{what}: {name} must be a string")

    def to_json(self) -> bytes:
        return _dump(self)

    @classmethod
    def from_json(cls, raw: bytes) -> Self:
        """Parse a stored target (every field required); RecordError if malformed."""
        doc = _load(raw)
        return _build(
            cls,
            replicas=_get(doc, "replicas", int),
            previous=_get(doc, "previous", int),
            reason=_get(doc, "reason", str),
            metric=_get(doc, "metric", float),
            decided_at=_get(doc, "decided_at", float),
            term=_get(doc, "term", int),
            leader=_get(doc, "leader", str),
        )


# -- checks --------------------------------------------------------------------------


def _check_int(record: object, what: str, name: str, *, low: int, high: int | None = None) -> None:
    value = getattr(record, name)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{what}: {name} must be an integer {bounds}, got {describe(value)}")


def _check_float(
    record: object,
    what: str,
    name: str,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Check a number's range and store it as a float (JSON may carry it as an int)."""
    value = getattr(record, name)
    bounds = f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        bounds += f" and {'<' if high_open else '<='} {high:g}"
    problem = f"{what}: {name} must be a finite number {bounds}, got {describe(value)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(problem)
    try:
        number = float(value)
    except OverflowError as exc:
        raise ConfigError(problem) from exc
    if (
        not math.isfinite(number)
        or number < low
        or (low_open and number == low)
        or (high is not None and (number > high or (high_open and number == high)))
    ):
        raise ConfigError(problem)
    object.__setattr__(record, name, number)


def _check_choice(what: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(
            f"{what}: {name} must be one of {', '.join(choices)}; got {describe(value)}"
        )


# -- JSON ------------------------------------------------------------------------------

_MISSING: Any = object()
R = TypeVar("R")


def _dump(record: object) -> bytes:
    doc = asdict(record)  # type: ignore[call-overload]
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


_load = load_object  # one set of JSON rules for every record (records.py)


def _get(doc: dict[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    """Fetch a field of the right JSON type; a float field also takes a JSON integer."""
    value = doc.get(name, default)
    if value is _MISSING:
        raise RecordError(f"missing field {name!r}")
    kinds: tuple[type, ...] = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RecordError(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _build(cls: type[R], **values: Any) -> R:
    try:
        return cls(**values)
    except (ConfigError, OverflowError, ValueError, TypeError) as exc:
        raise record_error(str(exc)) from exc
