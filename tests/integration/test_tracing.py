"""Spans for each hop reach an OTLP collector, in the caller's trace."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from proto import demo_pb2
from tests.mesh import Mesh

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP trace receiver on 127.0.0.1."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service.name, span)
        self.lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[str, Collector]]:
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}", receiver
    server.stop(0)


def test_each_hop_makes_a_span_in_the_callers_trace(
    mesh: Mesh, collector: tuple[str, Collector]
) -> None:
    endpoint, receiver = collector
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
    echo = mesh.add("echo", env=env)
    client = mesh.add("client", env=env)
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    with mesh.channel(client.outbound) as channel:
        _reply, call = mesh.stub(channel).Echo.with_call(
            demo_pb2.EchoRequest(text="traced"),
            metadata=(("ringmesh-service", "echo"), ("traceparent", traceparent)),
            timeout=5,
        )
    app_saw = dict(call.trailing_metadata())["x-traceparent"]
    client.sidecar.stop()  # flushes its spans
    echo.sidecar.stop()
    spans = [(service, span) for service, span in receiver.spans if span.trace_id.hex() == TRACE_ID]  # type: ignore[attr-defined]
    by_service = {service: span for service, span in spans}
    assert set(by_service) == {"client", "echo"}, receiver.spans
    outbound, inbound = by_service["client"], by_service["echo"]
    assert outbound.parent_span_id.hex() == PARENT_ID  # type: ignore[attr-defined]
    assert inbound.parent_span_id == outbound.span_id  # type: ignore[attr-defined]
    assert outbound.name == inbound.name == "ringmesh.demo.v1.Demo/Echo"  # type: ignore[attr-defined]
    # The app's parent is the inbound hop's span, in the same trace.
    assert app_saw == f"00-{TRACE_ID}-{inbound.span_id.hex()}-01"  # type: ignore[attr-defined]
    attributes = {a.key: a.value for a in inbound.attributes}  # type: ignore[attr-defined]
    assert attributes["rpc.system"].string_value == "grpc"
    assert attributes["rpc.grpc.status_code"].int_value == 0


def test_without_otlp_the_callers_trace_context_reaches_the_app_unchanged(mesh: Mesh) -> None:
    mesh.add("echo")
    client = mesh.add("client")
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    with mesh.channel(client.outbound) as channel:
        _reply, call = mesh.stub(channel).Echo.with_call(
            demo_pb2.EchoRequest(text="x"),
            metadata=(("ringmesh-service", "echo"), ("traceparent", traceparent)),
            timeout=5,
        )
    assert ("x-traceparent", traceparent) in tuple(call.trailing_metadata())
