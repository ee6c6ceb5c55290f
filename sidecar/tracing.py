"""Spans for each hop, with W3C trace context carried through (OpenTelemetry API only).

Only wired when a tracer provider exists (OTLP configured): without an
exporter, spans would cost CPU per call and go nowhere. The caller's
``traceparent`` is forwarded unchanged either way, since metadata passes
through the proxy.
"""

from __future__ import annotations

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})

Metadata = tuple[tuple[str, str | bytes], ...]


class HopTracer:
    """Starts one span per proxied call and puts its context on the forwarded call."""

    def __init__(self, tracer: Tracer, *, kind: SpanKind) -> None:
        self._tracer = tracer
        self._kind = kind

    def begin(self, method: str, metadata: Metadata) -> tuple[Span, Metadata]:
        carrier = {k: v for k, v in metadata if k in _TRACE_HEADERS and isinstance(v, str)}
        parent = _PROPAGATOR.extract(carrier)
        service, _, name = method.strip("/").partition("/")
        span = self._tracer.start_span(
            method.strip("/"),
            context=parent,
            kind=self._kind,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        headers: dict[str, str] = {}
        _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
        forwarded = tuple(m for m in metadata if m[0] not in _TRACE_HEADERS) + tuple(
            headers.items()
        )
        return span, forwarded

    @staticmethod
    def end(span: Span, code: grpc.StatusCode) -> None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()
