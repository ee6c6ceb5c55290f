"""The telemetry pipeline (sidecar/otel.py) on hand-made data-plane stats and spans.

Pure: no sockets. OTLP goes to in-memory exporters.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.metrics.export import (
    Histogram,
    HistogramDataPoint,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode, TraceFlags

from sidecar import otel
from sidecar.otel import DURATION_BUCKETS_MS, SCOPE, TelemetryPipeline, build_pipeline

ECHO = "/ringmesh.demo.v1.Demo/Echo"
SCOPE_LABELS = (
    f'otel_scope_name="ringmesh.sidecar",otel_scope_schema_url="",'
    f'otel_scope_version="{SCOPE.version}"'
)
ECHO_OK = (
    f'{SCOPE_LABELS},rpc_grpc_status_code="0",rpc_method="Echo",'
    'rpc_service="ringmesh.demo.v1.Demo",rpc_system="grpc"'
)
TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
CALLER = bytes.fromhex("00f067aa0ba902b7")
OUTBOUND = bytes.fromhex("1111111111111111")
INBOUND = bytes.fromhex("2222222222222222")


def per_bucket(*milliseconds: float) -> list[int]:
    """Per-bucket counts as the data plane keeps them (upper bounds inclusive)."""
    counts = [0] * (len(DURATION_BUCKETS_MS) + 1)
    for ms in milliseconds:
        counts[bisect.bisect_left(DURATION_BUCKETS_MS, ms)] += 1
    return counts


def stats(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "calls": 4,
        "failed_calls": 1,
        "attempts": 5,
        "retries": {"connect": 2, "unavailable": 1},
        "retry_budget_waits": 4,
        "retry_budget_exhausted": 1,
        "retries_in_flight_peak": 1,
        "ejections": 3,
        "inflight": {"inbound": 2, "outbound": 1},
        "ejected": {"echo": ["echo-2"]},
        "server": [
            (ECHO, 0, 2, 6.5, per_bucket(0.5, 6.0)),
            (ECHO, 14, 1, 12000.0, per_bucket(12000.0)),
        ],
        "client": [(ECHO, 12, 1, 1.0, per_bucket(1.0))],
        "spans_dropped": 0,
    }
    base.update(overrides)
    return base


def scrape(pipeline: TelemetryPipeline) -> dict[str, float]:
    """Prometheus text as {series without value: value} (as the integration test reads it)."""
    series = {}
    for line in pipeline.prometheus_text().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def no_spans() -> list[object]:
    raise AssertionError("take_spans must not be called without OTLP")


def pipeline_of(data: Any) -> TelemetryPipeline:
    return build_pipeline(
        service="echo",
        instance_id="echo-1",
        otlp_endpoint=None,
        read_stats=lambda: data,
        take_spans=no_spans,
    )


class FakeMetricExporter(MetricExporter):
    def __init__(self, result: MetricExportResult = MetricExportResult.SUCCESS) -> None:
        super().__init__()
        self.exported: list[MetricsData] = []
        self.result = result
        self.shutdowns = 0

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exported.append(metrics_data)
        return self.result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.shutdowns += 1


class FakeSpanExporter(SpanExporter):
    def __init__(self, result: SpanExportResult = SpanExportResult.SUCCESS) -> None:
        self.exported: list[list[ReadableSpan]] = []
        self.result = result
        self.shutdowns = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported.append(list(spans))
        return self.result

    def shutdown(self) -> None:
        self.shutdowns += 1


class RaisingExporter(FakeMetricExporter):
    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        raise ConnectionError("collector gone")

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        raise RuntimeError("already closed")


class RaisingSpanExporter(FakeSpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        raise ConnectionError("collector gone")


class SpanQueue:
    """take_spans: hands out what was queued, once."""

    def __init__(self, *spans: tuple[Any, ...]) -> None:
        self.queued = list(spans)
        self.calls = 0

    def __call__(self) -> list[tuple[Any, ...]]:
        self.calls += 1
        taken, self.queued = self.queued, []
        return taken


def span_row(
    span_id: bytes = INBOUND,
    parent: bytes | None = OUTBOUND,
    *,
    kind: str = "server",
    code: int = 0,
    name: str = "ringmesh.demo.v1.Demo/Echo",
) -> tuple[Any, ...]:
    return (TRACE, span_id, parent, name, kind, 1_000, 2_500, code, "")


def otlp_pipeline(
    read: Any = None, spans: SpanQueue | None = None, **exporters: Any
) -> TelemetryPipeline:
    return build_pipeline(
        service="echo",
        instance_id="echo-1",
        otlp_endpoint="http://127.0.0.1:4317",
        read_stats=(lambda: stats()) if read is None else read,
        take_spans=spans or SpanQueue(),
        metric_exporter=exporters.get("metric_exporter", FakeMetricExporter()),
        span_exporter=exporters.get("span_exporter", FakeSpanExporter()),
    )


def histogram_points(data: MetricsData, name: str) -> list[HistogramDataPoint]:
    points: list[HistogramDataPoint] = []
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    assert isinstance(metric.data, Histogram)
                    points.extend(metric.data.data_points)
    return points


# /metrics


def test_metrics_have_the_series_names_and_labels_of_before() -> None:
    text = pipeline_of(stats()).prometheus_text().decode()
    lines = set(text.splitlines())
    assert "# TYPE rpc_server_duration_milliseconds histogram" in lines
    assert "# TYPE rpc_client_duration_milliseconds histogram" in lines
    assert f"rpc_server_duration_milliseconds_count{{{ECHO_OK}}} 2.0" in lines
    assert f"rpc_server_duration_milliseconds_sum{{{ECHO_OK}}} 6.5" in lines
    assert (
        f'rpc_client_duration_milliseconds_count{{{SCOPE_LABELS},rpc_grpc_status_code="12",'
        'rpc_method="Echo",rpc_service="ringmesh.demo.v1.Demo",rpc_system="grpc"} 1.0'
    ) in lines
    assert "# TYPE ringmesh_inflight gauge" in lines
    assert f'ringmesh_inflight{{direction="inbound",{SCOPE_LABELS}}} 2.0' in lines
    assert f'ringmesh_inflight{{direction="outbound",{SCOPE_LABELS}}} 1.0' in lines
    assert "# TYPE ringmesh_retries_total counter" in lines
    assert f'ringmesh_retries_total{{{SCOPE_LABELS},reason="connect"}} 2.0' in lines
    assert f'ringmesh_retries_total{{{SCOPE_LABELS},reason="unavailable"}} 1.0' in lines
    assert "# TYPE ringmesh_ejections_total counter" in lines
    assert f"ringmesh_ejections_total{{{SCOPE_LABELS}}} 3.0" in lines
    assert f"ringmesh_retry_budget_exhausted_total{{{SCOPE_LABELS}}} 1.0" in lines
    assert f"ringmesh_retry_budget_waits_total{{{SCOPE_LABELS}}} 4.0" in lines
    target = next(line for line in lines if line.startswith("target_info{"))
    assert 'service_name="echo"' in target and 'service_instance_id="echo-1"' in target
    # Only what the data plane exports: no series for calls, attempts, ejected, ...
    names = {line.split("{")[0].split(" ")[0] for line in lines if not line.startswith("#")}
    assert names == {
        "target_info",
        "rpc_server_duration_milliseconds_bucket",
        "rpc_server_duration_milliseconds_count",
        "rpc_server_duration_milliseconds_sum",
        "rpc_client_duration_milliseconds_bucket",
        "rpc_client_duration_milliseconds_count",
        "rpc_client_duration_milliseconds_sum",
        "ringmesh_inflight",
        "ringmesh_retries_total",
        "ringmesh_ejections_total",
        "ringmesh_retry_budget_exhausted_total",
        "ringmesh_retry_budget_waits_total",
    }


def test_histogram_buckets_become_cumulative_le_buckets() -> None:
    buckets = [1, 0, 2] + [0] * 18 + [1]  # per bucket: <=0.25, <=0.5, <=0.75, ..., +Inf
    series = scrape(pipeline_of(stats(server=[(ECHO, 0, 4, 20001.5, buckets)])))
    le = {
        key.split('le="')[1].split('"')[0]: value
        for key, value in series.items()
        if key.startswith("rpc_server_duration_milliseconds_bucket")
    }
    expected = ["0.25", "0.5", "0.75", "1", "1.5", "2", "3", "5", "7.5", "10", "15", "25"]
    expected += ["50", "75", "100", "250", "500", "1000", "2500", "5000", "10000", "+Inf"]
    assert list(le) == expected
    assert le["0.25"] == 1
    assert le["0.5"] == 1
    assert le["0.75"] == 3
    assert all(le[b] == 3 for b in expected[2:-1])
    assert le["+Inf"] == 4
    assert series[f"rpc_server_duration_milliseconds_count{{{ECHO_OK}}}"] == 4
    assert series[f"rpc_server_duration_milliseconds_sum{{{ECHO_OK}}}"] == 20001.5
    # What the integration test asks of calls of >= 5 ms each:
    slow = scrape(pipeline_of(stats(server=[(ECHO, 0, 3, 18.0, per_bucket(5.5, 6, 6.5))])))
    at_most_2ms = 'rpc_server_duration_milliseconds_bucket{le="2"'
    assert sum(v for k, v in slow.items() if k.startswith(at_most_2ms)) == 0
    assert slow[f'rpc_server_duration_milliseconds_bucket{{le="7.5",{ECHO_OK}}}'] == 3


def test_metrics_text_is_what_the_opentelemetry_prometheus_exporter_made() -> None:
    """The same calls recorded through the SDK and its Prometheus reader (today's
    pipeline) give the same text, byte for byte."""
    prometheus = pytest.importorskip("opentelemetry.exporter.prometheus")
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    provider = MeterProvider(
        resource=Resource.create({"service.name": "echo", "service.instance.id": "echo-1"}),
        metric_readers=[prometheus.PrometheusMetricReader(registry=registry)],
        views=[
            View(
                instrument_type=HistogramInstrument,
                instrument_name="rpc.*.duration",
                aggregation=ExplicitBucketHistogramAggregation(boundaries=DURATION_BUCKETS_MS),
            )
        ],
    )
    meter = provider.get_meter(SCOPE.name, SCOPE.version)
    attributes = {
        "rpc.system": "grpc",
        "rpc.service": "ringmesh.demo.v1.Demo",
        "rpc.method": "Echo",
    }
    server = meter.create_histogram(
        "rpc.server.duration", unit="ms", description="Calls served through the inbound side"
    )
    for ms, code in ((0.5, 0), (6.0, 0), (12000.0, 14)):
        server.record(ms, {**attributes, "rpc.grpc.status_code": code})
    client = meter.create_histogram(
        "rpc.client.duration", unit="ms", description="Calls sent through the outbound side"
    )
    client.record(1.0, {**attributes, "rpc.grpc.status_code": 12})

    def observe(*values: tuple[int, dict[str, str]]) -> Any:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(n, labels) for n, labels in values]

        return [callback]

    meter.create_observable_up_down_counter(
        "ringmesh.inflight",
        callbacks=observe((2, {"direction": "inbound"}), (1, {"direction": "outbound"})),
        unit="{call}",
        description="Calls in flight",
    )
    meter.create_observable_counter(
        "ringmesh.retries",
        callbacks=observe((2, {"reason": "connect"}), (1, {"reason": "unavailable"})),
        unit="{retry}",
        description="Retries by reason",
    )
    for name, n, unit, description in (
        ("ringmesh.ejections", 3, "{ejection}", "Peers ejected"),
        ("ringmesh.retry_budget_exhausted", 1, "{retry}", "Retries refused by the retry budget"),
        (
            "ringmesh.retry_budget_waits",
            4,
            "{retry}",
            "Retries that waited for a slot in the retry budget",
        ),
    ):
        meter.create_observable_counter(
            name, callbacks=observe((n, {})), unit=unit, description=description
        )
    try:
        before = generate_latest(registry).decode()
    finally:
        provider.shutdown()
    assert pipeline_of(stats()).prometheus_text().decode() == before


def test_a_data_plane_without_calls_shows_counters_but_no_histograms() -> None:
    empty = stats(server=[], client=[], retries={}, ejections=0)
    series = scrape(pipeline_of(empty))
    assert not any(k.startswith(("rpc_", "ringmesh_retries_total")) for k in series)
    assert series[f"ringmesh_ejections_total{{{SCOPE_LABELS}}}"] == 0
    assert f'ringmesh_inflight{{direction="inbound",{SCOPE_LABELS}}}' in series


def test_count_is_the_sum_of_the_buckets() -> None:
    # A reading taken while a call was being recorded: the buckets have it, the count not yet.
    series = scrape(pipeline_of(stats(server=[(ECHO, 0, 2, 7.0, per_bucket(0.5, 0.5, 6.0))])))
    assert series[f"rpc_server_duration_milliseconds_count{{{ECHO_OK}}}"] == 3
    assert series[f'rpc_server_duration_milliseconds_bucket{{le="+Inf",{ECHO_OK}}}'] == 3
    data = pipeline_of(stats(server=[(ECHO, 0, 2, 7.0, per_bucket(0.5, 0.5, 6.0))])).metrics_data()
    (point,) = histogram_points(data, "rpc.server.duration")
    assert point.count == sum(point.bucket_counts) == 3


# load/


def test_server_totals_sum_over_series_and_count_errors() -> None:
    data = stats(
        server=[
            (ECHO, 0, 3, 3.0, per_bucket(0.5, 1.0, 1.5)),
            ("/ringmesh.demo.v1.Demo/Other", 0, 2, 12.0, per_bucket(6.0, 6.0)),
            (ECHO, 14, 4, 40.0, per_bucket(10, 10, 10, 10)),
            (ECHO, 4, 1, 20000.0, per_bucket(20000.0)),
        ],
        client=[(ECHO, 2, 100, 100.0, per_bucket(*[1.0] * 100))],  # not the server's
    )
    before = time.monotonic()
    totals = pipeline_of(data).server_totals()
    assert before <= totals.at <= time.monotonic()
    assert totals.count == 10
    assert totals.errors == 5  # the calls of the series whose status is not 0
    assert totals.bounds == DURATION_BUCKETS_MS
    expected = [
        a + b + c + d
        for a, b, c, d in zip(
            per_bucket(0.5, 1.0, 1.5),
            per_bucket(6.0, 6.0),
            per_bucket(10, 10, 10, 10),
            per_bucket(20000.0),
            strict=True,
        )
    ]
    assert list(totals.buckets) == expected
    assert totals.buckets[-1] == 1 and totals.buckets[DURATION_BUCKETS_MS.index(10)] == 4


def test_server_totals_are_what_metrics_shows() -> None:
    pipeline = pipeline_of(stats())
    counts = "rpc_server_duration_milliseconds_count"
    shown = sum(v for k, v in scrape(pipeline).items() if k.startswith(counts))
    totals = pipeline.server_totals()
    assert totals.count == shown == 3
    assert totals.errors == 1


def test_server_totals_without_calls_are_zero_of_the_same_shape() -> None:
    totals = pipeline_of(stats(server=[])).server_totals()
    assert (totals.count, totals.errors) == (0, 0)
    assert totals.bounds == DURATION_BUCKETS_MS
    assert totals.buckets == (0,) * (len(DURATION_BUCKETS_MS) + 1)


# malformed input


def test_a_malformed_stats_dict_is_skipped_never_fatal(caplog: pytest.LogCaptureFixture) -> None:
    good = (ECHO, 0, 1, 0.5, per_bucket(0.5))
    bad = stats(
        server=[
            good,
            (ECHO, 0, 1, 0.5, [1, 0]),  # too few buckets
            (ECHO, "0", 1, 0.5, per_bucket(0.5)),  # code not an int
            (ECHO, 0, -1, 0.5, per_bucket(0.5)),  # negative count
            (ECHO, 0, 1, float("nan"), per_bucket(0.5)),
            (ECHO, True, 1, 0.5, per_bucket(0.5)),
            (ECHO, 0, 1, 0.5, [*per_bucket()[:-1], "1"]),
            (ECHO, 0, 1),  # too short
            "not a series",
            None,
        ],
        client="nope",
        retries={"connect": "2", "refused": -1, "budget": True, "unavailable": 1},
        inflight=None,
        ejections=-1,
    )
    del bad["retry_budget_waits"]
    caplog.set_level(logging.WARNING, logger="sidecar.otel")
    pipeline = pipeline_of(bad)
    series = scrape(pipeline)
    assert series[f"rpc_server_duration_milliseconds_count{{{ECHO_OK}}}"] == 1
    assert f'ringmesh_retries_total{{{SCOPE_LABELS},reason="unavailable"}}' in series
    assert not any(k.startswith("rpc_client") for k in series)
    reasons = [k.split("reason=")[1] for k in series if "reason=" in k]
    assert reasons == ['"unavailable"}']
    assert not any(k.startswith(("ringmesh_ejections", "ringmesh_inflight")) for k in series)
    assert not any(k.startswith("ringmesh_retry_budget_waits") for k in series)
    assert f"ringmesh_retry_budget_exhausted_total{{{SCOPE_LABELS}}}" in series
    assert pipeline.server_totals().count == 1
    assert "malformed 'server' series" in caplog.text
    assert "'retry_budget_waits'" in caplog.text
    # One warning per kind of problem, not one per scrape.
    warnings = len(caplog.records)
    pipeline.prometheus_text()
    pipeline.server_totals()
    assert len(caplog.records) == warnings


@pytest.mark.parametrize("data", [None, [], "stats", 42, {}])
def test_stats_that_are_not_a_stats_dict_give_empty_metrics(data: Any) -> None:
    pipeline = pipeline_of(data)
    series = scrape(pipeline)
    assert [k.split("{")[0] for k in series] == ["target_info"]
    assert pipeline.server_totals().count == 0


def test_a_failing_stats_reader_is_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("data plane gone")

    pipeline = build_pipeline(
        service="echo",
        instance_id="echo-1",
        otlp_endpoint=None,
        read_stats=broken,
        take_spans=no_spans,
    )
    assert [k.split("{")[0] for k in scrape(pipeline)] == ["target_info"]
    assert pipeline.server_totals().count == 0
    assert "data plane gone" in caplog.text


# spans


def test_spans_become_readable_spans_in_the_callers_trace() -> None:
    resource = Resource.create({"service.name": "echo", "service.instance.id": "echo-1"})
    client, server, root = otel.readable_spans(
        [
            span_row(OUTBOUND, CALLER, kind="client", code=14),
            span_row(INBOUND, OUTBOUND, kind="server"),
            span_row(INBOUND, None, kind="server", code=99),
        ],
        resource=resource,
    )
    for span in (client, server, root):
        assert span.context is not None
        assert span.context.trace_id == int.from_bytes(TRACE, "big")
        assert not span.context.is_remote
        assert span.context.trace_flags == TraceFlags.SAMPLED
        assert span.name == "ringmesh.demo.v1.Demo/Echo"
        assert (span.start_time, span.end_time) == (1_000, 2_500)
        assert span.resource is resource
        assert span.instrumentation_scope == SCOPE
    assert client.context.span_id == int.from_bytes(OUTBOUND, "big")
    assert client.parent is not None and client.parent.is_remote
    assert client.parent.span_id == int.from_bytes(CALLER, "big")
    assert client.parent.trace_id == client.context.trace_id
    assert client.kind is SpanKind.CLIENT
    assert client.status.status_code is StatusCode.ERROR
    assert client.status.description == "UNAVAILABLE"
    assert dict(client.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "ringmesh.demo.v1.Demo",
        "rpc.method": "Echo",
        "rpc.grpc.status_code": 14,
    }
    assert server.kind is SpanKind.SERVER
    assert server.parent is not None and server.parent.span_id == int.from_bytes(OUTBOUND, "big")
    assert server.status.status_code is StatusCode.UNSET
    assert (server.attributes or {})["rpc.grpc.status_code"] == 0
    assert root.parent is None
    assert root.status.status_code is StatusCode.ERROR and root.status.description == "CODE_99"


def test_spans_encode_as_the_collector_expects() -> None:
    """What tests/integration/test_tracing.py reads off the OTLP request."""
    resource = Resource.create({"service.name": "echo", "service.instance.id": "echo-1"})
    spans = otel.readable_spans([span_row(INBOUND, OUTBOUND)], resource=resource)
    (resource_spans,) = encode_spans(spans).resource_spans
    attributes = {a.key: a.value for a in resource_spans.resource.attributes}
    assert attributes["service.name"].string_value == "echo"
    (encoded,) = resource_spans.scope_spans[0].spans
    assert encoded.trace_id == TRACE
    assert encoded.span_id == INBOUND
    assert encoded.parent_span_id == OUTBOUND
    assert encoded.name == "ringmesh.demo.v1.Demo/Echo"
    span_attributes = {a.key: a.value for a in encoded.attributes}
    assert span_attributes["rpc.system"].string_value == "grpc"
    assert span_attributes["rpc.grpc.status_code"].int_value == 0


def test_malformed_spans_are_skipped() -> None:
    skipped: list[str] = []
    rows: list[object] = [
        span_row(),
        (TRACE[:8], INBOUND, None, "a/b", "server", 1, 2, 0, ""),  # short trace id
        (bytes(16), INBOUND, None, "a/b", "server", 1, 2, 0, ""),  # invalid (zero) trace id
        (TRACE, INBOUND, b"x", "a/b", "server", 1, 2, 0, ""),  # bad parent
        (TRACE, INBOUND, None, "a/b", "internal", 1, 2, 0, ""),  # unknown kind
        (TRACE, INBOUND, None, "a/b", "server", -1, 2, 0, ""),
        (TRACE, INBOUND, None, 7, "server", 1, 2, 0, ""),
        (TRACE, INBOUND),
        "span",
    ]
    spans = otel.readable_spans(
        rows, resource=Resource.create({}), skip=lambda kind, detail: skipped.append(kind)
    )
    assert len(spans) == 1
    assert spans[0].context is not None
    assert spans[0].context.span_id == int.from_bytes(INBOUND, "big")
    assert skipped == ["malformed span"] * 8


# OTLP


def test_export_pushes_spans_and_metrics_over_otlp() -> None:
    spans = SpanQueue(span_row(OUTBOUND, CALLER, kind="client"), span_row())
    metric_exporter, span_exporter = FakeMetricExporter(), FakeSpanExporter()
    pipeline = otlp_pipeline(
        spans=spans, metric_exporter=metric_exporter, span_exporter=span_exporter
    )
    pipeline.export()
    (batch,) = span_exporter.exported
    assert [s.context.span_id for s in batch if s.context] == [
        int.from_bytes(OUTBOUND, "big"),
        int.from_bytes(INBOUND, "big"),
    ]
    assert batch[0].resource.attributes["service.name"] == "echo"
    assert batch[0].resource.attributes["service.instance.id"] == "echo-1"
    (data,) = metric_exporter.exported
    (resource_metrics,) = data.resource_metrics
    assert resource_metrics.resource.attributes["service.name"] == "echo"
    assert resource_metrics.resource.attributes["service.instance.id"] == "echo-1"
    (scope_metrics,) = resource_metrics.scope_metrics
    assert scope_metrics.scope == SCOPE
    by_name = {m.name: m for m in scope_metrics.metrics}
    assert list(by_name) == [
        "rpc.server.duration",
        "rpc.client.duration",
        "ringmesh.inflight",
        "ringmesh.retries",
        "ringmesh.ejections",
        "ringmesh.retry_budget_exhausted",
        "ringmesh.retry_budget_waits",
    ]
    server = by_name["rpc.server.duration"]
    assert server.unit == "ms"
    assert isinstance(server.data, Histogram)
    assert server.data.aggregation_temporality.name == "CUMULATIVE"
    ok = server.data.data_points[0]
    assert dict(ok.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "ringmesh.demo.v1.Demo",
        "rpc.method": "Echo",
        "rpc.grpc.status_code": 0,
    }
    assert tuple(ok.explicit_bounds) == DURATION_BUCKETS_MS
    assert list(ok.bucket_counts) == per_bucket(0.5, 6.0)  # OTLP buckets stay per bucket
    assert (ok.count, ok.sum) == (2, 6.5)
    inflight, ejections = by_name["ringmesh.inflight"].data, by_name["ringmesh.ejections"].data
    assert isinstance(inflight, Sum) and not inflight.is_monotonic
    assert {p.attributes["direction"]: p.value for p in inflight.data_points if p.attributes} == {
        "inbound": 2,
        "outbound": 1,
    }
    assert isinstance(ejections, Sum) and ejections.is_monotonic
    assert [p.value for p in ejections.data_points] == [3]
    # The OTLP encoder takes it (min and max are left unset: Rust keeps neither).
    encoded = encode_metrics(data).resource_metrics[0].scope_metrics[0].metrics[0]
    point = encoded.histogram.data_points[0]
    assert list(point.bucket_counts) == per_bucket(0.5, 6.0)
    assert not point.HasField("min") and not point.HasField("max")


def test_metrics_go_out_once_an_interval_and_spans_on_every_export(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_METRIC_EXPORT_INTERVAL", raising=False)
    spans = SpanQueue(span_row())
    metric_exporter, span_exporter = FakeMetricExporter(), FakeSpanExporter()
    pipeline = otlp_pipeline(
        spans=spans, metric_exporter=metric_exporter, span_exporter=span_exporter
    )
    assert pipeline.metric_interval_s == 60.0
    pipeline.export()
    spans.queued.append(span_row(OUTBOUND))
    pipeline.export()
    assert len(metric_exporter.exported) == 1  # not again within 60 s
    assert len(span_exporter.exported) == 2
    assert spans.calls == 2
    pipeline.export()  # nothing taken: nothing sent
    assert len(span_exporter.exported) == 2

    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "0")
    every_time = FakeMetricExporter()
    eager = otlp_pipeline(metric_exporter=every_time)
    assert eager.metric_interval_s == 0
    eager.export()
    eager.export()
    assert len(every_time.exported) == 2


def test_shutdown_exports_the_last_of_it_then_closes_once() -> None:
    spans = SpanQueue()
    metric_exporter, span_exporter = FakeMetricExporter(), FakeSpanExporter()
    pipeline = otlp_pipeline(
        spans=spans, metric_exporter=metric_exporter, span_exporter=span_exporter
    )
    pipeline.export()
    spans.queued.append(span_row())
    pipeline.shutdown()
    assert len(metric_exporter.exported) == 2, "the final totals, interval or not"
    assert len(span_exporter.exported) == 1
    assert (metric_exporter.shutdowns, span_exporter.shutdowns) == (1, 1)
    pipeline.shutdown()
    pipeline.export()
    spans.queued.append(span_row())
    pipeline.export()
    assert (metric_exporter.shutdowns, span_exporter.shutdowns) == (1, 1)
    assert len(metric_exporter.exported) == 2 and len(span_exporter.exported) == 1
    assert spans.calls == 2
    assert scrape(pipeline), "/metrics still answers"


def test_export_never_raises_and_warns_once_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    def broken_spans() -> list[object]:
        raise RuntimeError("queue gone")

    def broken_stats() -> dict[str, Any]:
        raise RuntimeError("data plane gone")

    caplog.set_level(logging.WARNING, logger="sidecar.otel")
    raising = otlp_pipeline(
        spans=SpanQueue(span_row(), span_row(OUTBOUND)),
        metric_exporter=RaisingExporter(),
        span_exporter=RaisingSpanExporter(),
    )
    raising.metric_interval_s = 0
    raising.export()
    raising.export()
    raising.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("OTLP metric export raised ConnectionError" in m for m in messages) == 1
    assert sum("OTLP span export raised ConnectionError" in m for m in messages) == 1
    assert sum("shutdown raised RuntimeError" in m for m in messages) == 1

    caplog.clear()
    failing = otlp_pipeline(
        spans=SpanQueue(span_row()),
        metric_exporter=FakeMetricExporter(MetricExportResult.FAILURE),
        span_exporter=FakeSpanExporter(SpanExportResult.FAILURE),
    )
    failing.export()
    assert "OTLP metric export failed" in caplog.text
    assert "OTLP span export failed" in caplog.text

    caplog.clear()
    exporter = FakeSpanExporter()
    no_queue = build_pipeline(
        service="echo",
        instance_id="echo-1",
        otlp_endpoint="http://127.0.0.1:4317",
        read_stats=broken_stats,
        take_spans=broken_spans,
        metric_exporter=FakeMetricExporter(),
        span_exporter=exporter,
    )
    no_queue.export()
    no_queue.shutdown()
    assert "queue gone" in caplog.text
    assert exporter.exported == []


def test_without_otlp_nothing_is_exported_and_spans_are_never_taken() -> None:
    metric_exporter, span_exporter = FakeMetricExporter(), FakeSpanExporter()
    spans = SpanQueue(span_row())
    pipeline = build_pipeline(
        service="echo",
        instance_id="echo-1",
        otlp_endpoint=None,
        read_stats=stats,
        take_spans=spans,
        metric_exporter=metric_exporter,  # the endpoint is the switch
        span_exporter=span_exporter,
    )
    assert pipeline.metric_exporter is None and pipeline.span_exporter is None
    pipeline.export()
    pipeline.shutdown()
    assert spans.calls == 0
    assert metric_exporter.exported == [] and span_exporter.exported == []


def test_with_an_endpoint_the_otlp_grpc_exporters_are_made_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.exporter.otlp.proto.grpc import metric_exporter, trace_exporter

    made: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    class Metrics(FakeMetricExporter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__()
            made.append(("metrics", args, kwargs))

    class Spans(FakeSpanExporter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__()
            made.append(("spans", args, kwargs))

    monkeypatch.setattr(metric_exporter, "OTLPMetricExporter", Metrics)
    monkeypatch.setattr(trace_exporter, "OTLPSpanExporter", Spans)
    pipeline = build_pipeline(
        service="echo",
        instance_id="echo-1",
        otlp_endpoint="http://collector:4317",
        read_stats=stats,
        take_spans=SpanQueue(span_row()),
    )
    assert sorted(made) == [("metrics", (), {}), ("spans", (), {})]
    assert isinstance(pipeline.metric_exporter, Metrics)
    assert isinstance(pipeline.span_exporter, Spans)
    pipeline.export()
    assert len(pipeline.span_exporter.exported) == 1
    assert len(pipeline.metric_exporter.exported) == 1


@settings(max_examples=500, deadline=None)
@given(st.floats(allow_nan=False) | st.integers(min_value=0, max_value=2**63).map(float))
def test_sample_values_are_written_as_prometheus_client_writes_them(value: float) -> None:
    from prometheus_client.utils import floatToGoString

    from sidecar.otel import _number

    assert _number(value) == floatToGoString(value)


@given(st.text(max_size=30))
def test_label_values_and_help_are_escaped_as_the_text_format_says(text: str) -> None:
    from sidecar.otel import _escape

    label = _escape(text, quote=True)
    assert "\n" not in label and '"' not in label.replace('\\"', "")
    unescaped = label.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
    assert unescaped == text or "\\" in text  # round trip (backslash sequences aside)
