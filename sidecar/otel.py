"""The composition root of telemetry: providers, readers and exporters, wired once.

Prometheus text for ``/metrics`` (on a registry of our own, not the global
one), OTLP over gRPC when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, and an
in-memory reader the sidecar reads every report interval for its ``load/``
record. Also the tracer provider for per-hop spans (only with OTLP: without
an exporter, spans would cost CPU and go nowhere).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.load import HistogramTotals
from sidecar.telemetry import DURATION_BUCKETS_MS, RPC_SERVER_DURATION


@dataclass
class TelemetryPipeline:
    meter_provider: MeterProvider
    tracer_provider: TracerProvider | None
    registry: CollectorRegistry
    reader: InMemoryMetricReader

    def prometheus_text(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data

    def server_totals(self) -> HistogramTotals:
        """Cumulative rpc.server.duration totals now, summed over methods."""
        at = time.monotonic()
        data = self.reader.get_metrics_data()
        count = errors = 0
        bounds: tuple[float, ...] = ()
        buckets: list[int] = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != RPC_SERVER_DURATION:
                        continue
                    for point in metric.data.data_points:
                        assert isinstance(point, HistogramDataPoint)
                        count += point.count
                        if (point.attributes or {}).get("rpc.grpc.status_code", 0) != 0:
                            errors += point.count
                        bounds = tuple(point.explicit_bounds)
                        if not buckets:
                            buckets = [0] * len(point.bucket_counts)
                        buckets = [a + b for a, b in zip(buckets, point.bucket_counts, strict=True)]
        return HistogramTotals(at, count, errors, bounds, tuple(buckets))

    def shutdown(self) -> None:
        self.meter_provider.shutdown()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()


def build_pipeline(
    *, service: str, instance_id: str, otlp_endpoint: str | None
) -> TelemetryPipeline:
    resource = Resource.create({"service.name": service, "service.instance.id": instance_id})
    registry = CollectorRegistry()
    reader = InMemoryMetricReader()
    readers: list[MetricReader] = [PrometheusMetricReader(registry=registry), reader]
    tracer_provider = None
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    views = [
        View(
            instrument_type=HistogramInstrument,
            instrument_name="rpc.*.duration",
            aggregation=ExplicitBucketHistogramAggregation(boundaries=DURATION_BUCKETS_MS),
        )
    ]
    provider = MeterProvider(resource=resource, metric_readers=readers, views=views)
    return TelemetryPipeline(provider, tracer_provider, registry, reader)
