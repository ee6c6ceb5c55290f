"""The composition root of telemetry: exports what the Rust data plane recorded.

The data plane counts calls, retries and ejections and records call
durations and per-hop spans itself; Python only reads them
(``DataPlane.stats()``, cumulative since start, and ``take_spans()``).

Design rules:

- OpenTelemetry's Python SDK has no asynchronous histogram and no
  metric-producer API (opentelemetry-python#4768), so the histograms recorded
  in Rust reach exporters through a collector of the Rust snapshot:
  ``to_metrics_data`` turns one stats dict into the SDK's own data model
  (``MetricsData``: cumulative explicit-bucket histograms, monotonic sums for
  counters, a non-monotonic sum for ``ringmesh.inflight``), and every consumer
  reads that one value: ``/metrics`` (Prometheus' text format written here,
  named and labelled as the OpenTelemetry Prometheus exporter does it:
  prometheus_client alone was 4.6 MB of a sidecar's RSS), OTLP (``OTLPMetricExporter().export``) and the ``load/`` record
  (``server_totals``). One counting path.
- OTLP only when an endpoint is configured (the exporters read
  ``OTEL_EXPORTER_OTLP_*`` themselves; the endpoint is only the switch).
  Without it, spans are never taken: the data plane records none then.
  Metrics go out at most every ``OTEL_METRIC_EXPORT_INTERVAL`` (60 s by
  default, as the SDK's periodic reader did), spans on every ``export()``,
  both at ``shutdown()``.
- Telemetry never takes the sidecar down: a failed export, a stats dict that
  lacks a key or a malformed series or span is skipped, with one warning per
  kind of failure (later ones at debug level).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, TypeGuard, cast

from opentelemetry.sdk.environment_variables import OTEL_METRIC_EXPORT_INTERVAL
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from sidecar.load import HistogramTotals

if TYPE_CHECKING:  # the tracing SDK is loaded only when spans are exported (OTLP on)
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

RPC_SERVER_DURATION = "rpc.server.duration"
RPC_CLIENT_DURATION = "rpc.client.duration"
INFLIGHT = "ringmesh.inflight"
RETRIES = "ringmesh.retries"
EJECTIONS = "ringmesh.ejections"
BUDGET_EXHAUSTED = "ringmesh.retry_budget_exhausted"
BUDGET_WAITS = "ringmesh.retry_budget_waits"
AUTHZ_DENIED = "ringmesh.authz_denied"
# Milliseconds; fine enough below 1 ms, where a sidecar hop lives. The same
# bounds as the data plane's DURATION_BUCKETS_MS (dataplane/src/stats.rs).
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 25, 50, 75, 100, 250, 500, 1000, 2500, 5000, 10000,
)  # fmt: skip

# (name, stats key, description) of the duration histograms, unit "ms".
_HISTOGRAMS = (
    (RPC_SERVER_DURATION, "server", "Calls served through the inbound side"),
    (RPC_CLIENT_DURATION, "client", "Calls sent through the outbound side"),
)
# Counters that are one integer of the stats: (name, stats key, unit, description).
_PLAIN_COUNTERS = (
    (EJECTIONS, "ejections", "{ejection}", "Peers ejected"),
    (BUDGET_EXHAUSTED, "retry_budget_exhausted", "{retry}", "Retries refused by the retry budget"),
    (
        BUDGET_WAITS,
        "retry_budget_waits",
        "{retry}",
        "Retries that waited for a slot in the retry budget",
    ),
    (AUTHZ_DENIED, "authz_denied", "{call}", "Inbound calls an authz/ record refused"),
)
_GRPC_CODE_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip
_SPAN_KINDS = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT}
_DEFAULT_METRIC_INTERVAL_S = 60.0
# OTLP's histogram min and max are optional and Rust keeps neither: the encoder
# leaves a None unset (the SDK's type says float, hence the cast).
_ABSENT = cast(float, None)

ReadStats = Callable[[], Mapping[str, object]]
TakeSpans = Callable[[], Iterable[object]]
Skip = Callable[[str, str], None]  # (kind of problem, detail)


def _scope_version() -> str:
    try:
        return metadata.version("ringmesh")
    except metadata.PackageNotFoundError:
        return ""


SCOPE = InstrumentationScope("ringmesh.sidecar", _scope_version())


def _log_skip(kind: str, detail: str) -> None:
    log.warning("telemetry: %s: %s", kind, detail)


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def rpc_attributes(method: str) -> dict[str, str]:
    """Semantic-convention attributes of a method path ("/pkg.Svc/Method" or "pkg.Svc/Method")."""
    service, _, name = method.strip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _histogram_points(
    rows: object, key: str, start_ns: int, now_ns: int, skip: Skip
) -> list[HistogramDataPoint]:
    if not isinstance(rows, list | tuple):
        skip(f"stats lack the series {key!r}", _short(rows))
        return []
    points = []
    for row in rows:
        if not (isinstance(row, tuple | list) and len(row) == 5):
            skip(f"malformed {key!r} series", _short(row))
            continue
        fields: Sequence[object] = row
        method, code, count, sum_ms, buckets = fields
        if not (
            isinstance(method, str)
            and _is_count(code)
            and _is_count(count)
            and _is_number(sum_ms)
            and isinstance(buckets, list | tuple)
            and len(buckets) == len(DURATION_BUCKETS_MS) + 1
            and all(_is_count(n) for n in buckets)
        ):
            skip(f"malformed {key!r} series", _short(row))
            continue
        points.append(
            HistogramDataPoint(
                attributes={**rpc_attributes(method), "rpc.grpc.status_code": code},
                start_time_unix_nano=start_ns,
                time_unix_nano=now_ns,
                # The buckets' sum, not the count field: Rust loads the count
                # before the buckets, so under load the two can differ by the
                # calls being recorded; OTLP wants count == sum(bucket_counts)
                # and Prometheus takes _count from the +Inf bucket anyway.
                count=sum(buckets),
                sum=float(sum_ms),
                bucket_counts=list(buckets),
                explicit_bounds=DURATION_BUCKETS_MS,
                min=_ABSENT,
                max=_ABSENT,
            )
        )
    return points


def _number_points(
    values: object, key: str, label: str, start_ns: int, now_ns: int, skip: Skip
) -> list[NumberDataPoint]:
    """Points of a {label value: count} dict of the stats."""
    if not isinstance(values, Mapping):
        skip(f"stats lack the counts {key!r}", _short(values))
        return []
    points = []
    for name, n in values.items():
        if not (isinstance(name, str) and _is_count(n)):
            skip(f"malformed {key!r} count", _short((name, n)))
            continue
        points.append(NumberDataPoint({label: name}, start_ns, now_ns, n))
    return points


def to_metrics_data(
    stats: object,
    *,
    resource: Resource,
    start_time_unix_nano: int,
    time_unix_nano: int | None = None,
    scope: InstrumentationScope = SCOPE,
    skip: Skip = _log_skip,
) -> MetricsData:
    """One stats dict of the data plane as the SDK's data model (cumulative since start).

    What is missing or malformed is left out (and reported to ``skip``); a
    metric without points is left out, as the SDK leaves it out.
    """
    start_ns = start_time_unix_nano
    now_ns = time.time_ns() if time_unix_nano is None else time_unix_nano
    metrics: list[Metric] = []
    if not isinstance(stats, Mapping):
        skip("stats are not a dict", _short(stats))
    else:
        for name, key, description in _HISTOGRAMS:
            points = _histogram_points(stats.get(key), key, start_ns, now_ns, skip)
            if points:
                data = Histogram(points, AggregationTemporality.CUMULATIVE)
                metrics.append(Metric(name, description, "ms", data))
        inflight = _number_points(
            stats.get("inflight"), "inflight", "direction", start_ns, now_ns, skip
        )
        if inflight:
            # An up-down counter, as before: a gauge for Prometheus.
            gauge_like = Sum(inflight, AggregationTemporality.CUMULATIVE, is_monotonic=False)
            metrics.append(Metric(INFLIGHT, "Calls in flight", "{call}", gauge_like))
        retries = _number_points(stats.get("retries"), "retries", "reason", start_ns, now_ns, skip)
        if retries:
            by_reason = Sum(retries, AggregationTemporality.CUMULATIVE, is_monotonic=True)
            metrics.append(Metric(RETRIES, "Retries by reason", "{retry}", by_reason))
        for name, key, unit, description in _PLAIN_COUNTERS:
            value = stats.get(key)
            if not _is_count(value):
                skip(f"stats lack the count {key!r}", _short(value))
                continue
            point = NumberDataPoint(None, start_ns, now_ns, value)
            total = Sum([point], AggregationTemporality.CUMULATIVE, is_monotonic=True)
            metrics.append(Metric(name, description, unit, total))
    return MetricsData(
        [ResourceMetrics(resource, [ScopeMetrics(scope, metrics, "")] if metrics else [], "")]
    )


def histogram_totals(data: MetricsData, name: str, *, at: float) -> HistogramTotals:
    """One histogram's cumulative totals, summed over its series; errors are the
    calls of series whose status code is not 0."""
    count = errors = 0
    buckets = [0] * (len(DURATION_BUCKETS_MS) + 1)
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name or not isinstance(metric.data, Histogram):
                    continue
                for point in metric.data.data_points:
                    if tuple(point.explicit_bounds) != DURATION_BUCKETS_MS:
                        continue
                    count += point.count
                    if (point.attributes or {}).get("rpc.grpc.status_code", 0) != 0:
                        errors += point.count
                    buckets = [a + b for a, b in zip(buckets, point.bucket_counts, strict=True)]
    return HistogramTotals(at, count, errors, DURATION_BUCKETS_MS, tuple(buckets))


# Prometheus names and labels, as the OpenTelemetry Prometheus exporter makes them.
_UNIT_SUFFIXES = {"ms": "milliseconds", "s": "seconds", "us": "microseconds", "1": ""}
_INVALID_NAME = re.compile(r"[^a-zA-Z0-9:]+")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9]+")
_UNIT_ANNOTATION = re.compile(r"{.*}")


def _sanitize(name: str, *, label: bool = False) -> str:
    if name[:1].isdigit():
        name = "_" + name[1:]
    return (_INVALID_LABEL if label else _INVALID_NAME).sub("_", name)


def _prometheus_unit(unit: str) -> str:
    unit = _UNIT_ANNOTATION.sub("", unit)  # UCUM annotations ("{call}") make no suffix
    return _UNIT_SUFFIXES.get(unit, _sanitize(unit).strip("_"))


def _label_value(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _le(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


def _escape(text: str, *, quote: bool) -> str:
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if quote else text


def _number(value: float) -> str:
    """A sample value as Prometheus' text format writes it (Go's float formatting:
    exponents from 1e7 on, as prometheus_client's floatToGoString)."""
    value = float(value)
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _sample(name: str, labels: Mapping[str, str], value: float) -> str:
    rendered = ",".join(f'{k}="{_escape(v, quote=True)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{rendered}}} {_number(value)}\n" if rendered else f"{name} {_number(value)}\n"


def prometheus_text(data: MetricsData) -> str:
    """MetricsData in Prometheus' text format 0.0.4 (buckets made cumulative, ``le``),
    as the OpenTelemetry Prometheus exporter names and labels it."""
    out: list[str] = []

    def family(name: str, kind: str, doc: str, samples: Iterable[str]) -> None:
        out.append(f"# HELP {name} {_escape(doc, quote=False)}\n# TYPE {name} {kind}\n")
        out.extend(samples)

    for resource_metrics in data.resource_metrics:
        attributes = resource_metrics.resource.attributes
        target = {_sanitize(k, label=True): _label_value(v) for k, v in attributes.items()}
        family("target_info", "gauge", "Target metadata", [_sample("target_info", target, 1.0)])
        for scope_metrics in resource_metrics.scope_metrics:
            scope = scope_metrics.scope
            scope_labels = {
                "otel_scope_name": scope.name or "",
                "otel_scope_version": scope.version or "",
                "otel_scope_schema_url": scope.schema_url or "",
            }
            for metric in scope_metrics.metrics:
                _family(metric, scope_labels, family)
    return "".join(out)


def _family(
    metric: Metric,
    scope_labels: Mapping[str, str],
    family: Callable[[str, str, str, Iterable[str]], None],
) -> None:
    name = _sanitize(metric.name)
    unit = _prometheus_unit(metric.unit or "")
    if unit and not name.endswith(f"_{unit}"):
        name = f"{name}_{unit}"
    doc = metric.description or ""
    data = metric.data

    def labels_of(point: object) -> dict[str, str]:
        attributes = getattr(point, "attributes", None) or {}
        return {
            **scope_labels,
            **{_sanitize(k, label=True): _label_value(v) for k, v in attributes.items()},
        }

    if isinstance(data, Histogram):
        samples = []
        for point in data.data_points:
            labels = labels_of(point)
            cumulative = 0
            for bound, n in zip(
                (*map(_le, point.explicit_bounds), "+Inf"), point.bucket_counts, strict=True
            ):
                cumulative += n
                samples.append(
                    _sample(f"{name}_bucket", {**labels, "le": bound}, float(cumulative))
                )
            samples.append(_sample(f"{name}_count", labels, float(cumulative)))
            samples.append(_sample(f"{name}_sum", labels, float(point.sum)))
        family(name, "histogram", doc, samples)
    elif isinstance(data, Sum) and data.is_monotonic:
        total = name if name.endswith("_total") else f"{name}_total"
        family(
            total,
            "counter",
            doc,
            [_sample(total, labels_of(p), float(p.value)) for p in data.data_points],
        )
    elif isinstance(data, Sum | Gauge):
        family(
            name,
            "gauge",
            doc,
            [_sample(name, labels_of(p), float(p.value)) for p in data.data_points],
        )


def _span_id(value: object, size: int) -> int | None:
    if not isinstance(value, bytes | bytearray) or len(value) != size:
        return None
    return int.from_bytes(value, "big") or None


def readable_spans(
    rows: Iterable[object],
    *,
    resource: Resource,
    scope: InstrumentationScope = SCOPE,
    skip: Skip = _log_skip,
) -> list[ReadableSpan]:
    """The data plane's span tuples as SDK spans (malformed ones skipped)."""
    from opentelemetry.sdk.trace import ReadableSpan

    spans = []
    for row in rows:
        if not (isinstance(row, tuple | list) and len(row) == 9):
            skip("malformed span", _short(row))
            continue
        fields: Sequence[object] = row
        trace_raw, span_raw, parent_raw, name, kind, start, end, code, _message = fields
        trace_id, span_id = _span_id(trace_raw, 16), _span_id(span_raw, 8)
        parent_id = None if parent_raw is None else _span_id(parent_raw, 8)
        if not (
            trace_id
            and span_id
            and (parent_raw is None or parent_id is not None)
            and isinstance(name, str)
            and isinstance(kind, str)
            and kind in _SPAN_KINDS
            and _is_count(start)
            and _is_count(end)
            and _is_count(code)
        ):
            skip("malformed span", _short(row))
            continue
        sampled = TraceFlags(TraceFlags.SAMPLED)
        context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=sampled)
        parent = (
            None
            if parent_id is None
            else SpanContext(trace_id, parent_id, is_remote=True, trace_flags=sampled)
        )
        if code == 0:
            status = Status(StatusCode.UNSET)
        else:
            code_name = _GRPC_CODE_NAMES[code] if code < len(_GRPC_CODE_NAMES) else f"CODE_{code}"
            status = Status(StatusCode.ERROR, code_name)
        spans.append(
            ReadableSpan(
                name,
                context=context,
                parent=parent,
                resource=resource,
                attributes={**rpc_attributes(name), "rpc.grpc.status_code": code},
                kind=_SPAN_KINDS[kind],
                status=status,
                start_time=start,
                end_time=end,
                instrumentation_scope=scope,
            )
        )
    return spans


class _Complaints:
    """One warning per kind of failure; the repeats at debug level."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, kind: str, detail: str) -> None:
        with self._lock:
            first = kind not in self._seen
            self._seen.add(kind)
        log.log(logging.WARNING if first else logging.DEBUG, "telemetry: %s: %s", kind, detail)


def _metric_interval_s() -> float:
    raw = os.environ.get(OTEL_METRIC_EXPORT_INTERVAL)
    if raw is None:
        return _DEFAULT_METRIC_INTERVAL_S
    try:
        seconds = float(raw) / 1000
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        log.warning("telemetry: bad %s=%r, using 60 s", OTEL_METRIC_EXPORT_INTERVAL, raw)
        return _DEFAULT_METRIC_INTERVAL_S
    return seconds


@dataclass
class TelemetryPipeline:
    resource: Resource
    read_stats: ReadStats
    take_spans: TakeSpans
    metric_exporter: MetricExporter | None = None  # None: no OTLP metrics
    span_exporter: SpanExporter | None = None  # None: no OTLP spans, take_spans never called
    metric_interval_s: float = _DEFAULT_METRIC_INTERVAL_S
    start_time_unix_nano: int = field(default_factory=time.time_ns)
    _complain: _Complaints = field(init=False, default_factory=_Complaints)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _closed: bool = field(init=False, default=False)
    _metrics_sent_at: float = field(init=False, default=-math.inf)

    def metrics_data(self) -> MetricsData:
        """The data plane's stats now, as the SDK's data model (never raises)."""
        try:
            stats = self.read_stats()
        except Exception as exc:
            self._complain(f"cannot read the data plane's stats ({type(exc).__name__})", str(exc))
            return MetricsData([ResourceMetrics(self.resource, [], "")])
        return to_metrics_data(
            stats,
            resource=self.resource,
            start_time_unix_nano=self.start_time_unix_nano,
            skip=self._complain,
        )

    def prometheus_text(self) -> bytes:
        """Prometheus text exposition for GET /metrics (text/plain; version=0.0.4)."""
        try:
            return prometheus_text(self.metrics_data()).encode()
        except Exception as exc:  # /metrics answers, if only with nothing
            self._complain(f"cannot translate metrics ({type(exc).__name__})", str(exc))
            return b""

    def server_totals(self) -> HistogramTotals:
        """Cumulative rpc.server.duration totals now, summed over series (the numbers
        /metrics shows): what the load/ record is computed from."""
        at = time.monotonic()
        return histogram_totals(self.metrics_data(), RPC_SERVER_DURATION, at=at)

    def export(self) -> None:
        """Push the spans taken so far, and the metrics when their interval has
        passed, over OTLP (when configured). Blocking; never raises."""
        with self._lock:
            if not self._closed:
                self._export(force_metrics=False)

    def shutdown(self) -> None:
        """A final export (spans and metrics), then close the exporters. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._export(force_metrics=True)
            for exporter in (self.span_exporter, self.metric_exporter):
                if exporter is not None:
                    try:
                        exporter.shutdown()
                    except Exception as exc:
                        self._complain(
                            f"OTLP exporter shutdown raised {type(exc).__name__}", str(exc)
                        )

    def _export(self, *, force_metrics: bool) -> None:
        if self.span_exporter is not None:
            self._export_spans(self.span_exporter)
        now = time.monotonic()
        due = force_metrics or now - self._metrics_sent_at >= self.metric_interval_s
        if self.metric_exporter is not None and due:
            self._metrics_sent_at = now
            self._export_metrics(self.metric_exporter)

    def _export_spans(self, exporter: SpanExporter) -> None:
        try:
            rows = list(self.take_spans())
        except Exception as exc:
            self._complain(f"cannot take the data plane's spans ({type(exc).__name__})", str(exc))
            return
        spans = readable_spans(rows, resource=self.resource, skip=self._complain)
        if not spans:
            return
        try:
            result = exporter.export(spans)
        except Exception as exc:
            self._complain(f"OTLP span export raised {type(exc).__name__}", str(exc))
            return
        from opentelemetry.sdk.trace.export import SpanExportResult

        if result is not SpanExportResult.SUCCESS:
            self._complain("OTLP span export failed", f"{len(spans)} spans lost")

    def _export_metrics(self, exporter: MetricExporter) -> None:
        data = self.metrics_data()
        if not any(r.scope_metrics for r in data.resource_metrics):
            return
        try:
            result = exporter.export(data)
        except Exception as exc:
            self._complain(f"OTLP metric export raised {type(exc).__name__}", str(exc))
            return
        if result is not MetricExportResult.SUCCESS:
            self._complain("OTLP metric export failed", "the next export sends the totals again")


def build_pipeline(
    *,
    service: str,
    instance_id: str,
    otlp_endpoint: str | None,
    read_stats: ReadStats,
    take_spans: TakeSpans,
    metric_exporter: MetricExporter | None = None,
    span_exporter: SpanExporter | None = None,
) -> TelemetryPipeline:
    """The pipeline of one sidecar. With ``otlp_endpoint``, OTLP/gRPC exporters
    (configured from ``OTEL_EXPORTER_OTLP_*``) unless given ones (tests)."""
    resource = Resource.create({"service.name": service, "service.instance.id": instance_id})
    if not otlp_endpoint:
        metric_exporter = span_exporter = None
    else:
        if metric_exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            metric_exporter = OTLPMetricExporter()
        if span_exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter()
    return TelemetryPipeline(
        resource,
        read_stats,
        take_spans,
        metric_exporter=metric_exporter,
        span_exporter=span_exporter,
        metric_interval_s=_metric_interval_s(),
    )
