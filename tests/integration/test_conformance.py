"""What a gRPC user relies on, through two sidecars (a client-only one and the app's).

The app here is a generic gRPC server in the test process that does what each
call's metadata asks (send headers, trailers, a status, big or compressed
messages) and records what it saw (metadata, cancellations), so each test
compares what one end sent with what the other received.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from ringmesh.procs import Child, sidecar
from tests.mesh import Mesh
from tests.waiting import until

pytestmark = pytest.mark.integration

SERVICE = "conf"
BIG = 16 * 1024 * 1024
OPTIONS = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]


@dataclass
class Seen:
    """What the app observed, per call (keyed by the caller's x-id)."""

    metadata: dict[str, tuple[tuple[str, Any], ...]] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _instructions(context: grpc.ServicerContext, seen: Seen) -> dict[str, Any]:
    metadata = tuple(context.invocation_metadata())
    md = dict(metadata)
    call_id = str(md.get("x-id", ""))
    with seen.lock:
        seen.metadata[call_id] = metadata
    if md.get("x-compress") == "1":
        context.set_compression(grpc.Compression.Gzip)
    initial = tuple((k[len("x-initial-") :], v) for k, v in metadata if k.startswith("x-initial-"))
    if initial:
        context.send_initial_metadata(initial)
    trailing = tuple((k[len("x-trailer-") :], v) for k, v in metadata if k.startswith("x-trailer-"))
    if trailing:
        context.set_trailing_metadata(trailing)
    return {"id": call_id, **md}


def _finish(context: grpc.ServicerContext, md: dict[str, Any]) -> None:
    if "x-code" in md:
        code = next(c for c in grpc.StatusCode if c.value[0] == int(md["x-code"]))
        message = md.get("x-message-bin", b"").decode()  # any text, unicode included
        context.abort(code, message)


def _reply(md: dict[str, Any], request: bytes) -> bytes:
    size = int(md.get("x-size", "-1"))
    return request if size < 0 else b"r" * size


def _watch_cancel(context: grpc.ServicerContext, seen: Seen, call_id: str) -> None:
    def cancelled() -> None:
        if not context.is_active():
            with seen.lock:
                seen.cancelled.add(call_id)

    context.add_callback(cancelled)


class ConformanceApp(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method == "/conf.Test/Unary":
            return grpc.unary_unary_rpc_method_handler(self.unary)
        if method == "/conf.Test/ServerStream":
            return grpc.unary_stream_rpc_method_handler(self.server_stream)
        if method == "/conf.Test/ClientStream":
            return grpc.stream_unary_rpc_method_handler(self.client_stream)
        if method == "/conf.Test/Bidi":
            return grpc.stream_stream_rpc_method_handler(self.bidi)
        return None

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        md = _instructions(context, self.seen)
        _watch_cancel(context, self.seen, md["id"])
        if "x-sleep" in md:
            time.sleep(float(md["x-sleep"]))
        _finish(context, md)
        return _reply(md, request)

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        md = _instructions(context, self.seen)
        _watch_cancel(context, self.seen, md["id"])
        for _ in range(int(md.get("x-count", "3"))):
            if not context.is_active():
                return
            yield _reply(md, request)
            if "x-sleep" in md:
                time.sleep(float(md["x-sleep"]))
        _finish(context, md)

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        md = _instructions(context, self.seen)
        total = b"".join(requests)
        _finish(context, md)
        return _reply(md, total)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        md = _instructions(context, self.seen)
        for request in requests:
            yield _reply(md, request)
        _finish(context, md)


@dataclass
class Conformance:
    mesh: Mesh
    seen: Seen
    client: Child
    app_sidecar: Child

    @property
    def outbound(self) -> str:
        return str(self.client.wait_event("ready")["outbound"])

    def channel(self, *, options: tuple[tuple[str, Any], ...] = (), **kwargs: Any) -> grpc.Channel:
        return grpc.insecure_channel(self.outbound, options=[*OPTIONS, *options], **kwargs)


@pytest.fixture
def conf(mesh: Mesh) -> Iterator[Conformance]:
    seen = Seen()
    server = grpc.server(
        futures.ThreadPoolExecutor(16), options=[*OPTIONS, ("grpc.so_reuseport", 0)]
    )
    server.add_generic_rpc_handlers([ConformanceApp(seen)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert mesh.logs is not None
        app_side = sidecar(
            SERVICE, f"127.0.0.1:{port}", mesh.etcd_url, "--prefix", mesh.prefix,
            "--instance-id", "conf-1", name="sidecar conf-1",
            stderr=mesh._log("sidecar-conf-1"),
        )  # fmt: skip
        mesh.children.append(app_side)
        app_side.wait_event("registered")
        client = sidecar(
            "caller", None, mesh.etcd_url, "--prefix", mesh.prefix,
            name="sidecar caller", stderr=mesh._log("sidecar-caller"),
        )  # fmt: skip
        mesh.children.append(client)
        client.wait_event("ready")
        yield Conformance(mesh, seen, client, app_side)
    finally:
        server.stop(0)


def md(call_id: str, *extra: tuple[str, str | bytes]) -> tuple[tuple[str, str | bytes], ...]:
    return (("ringmesh-service", SERVICE), ("x-id", call_id), *extra)


KINDS = ["unary", "server-stream", "client-stream", "bidi"]


def call(
    channel: grpc.Channel, kind: str, metadata: Any, payload: bytes = b"hello", **kw: Any
) -> Any:
    """One call of ``kind``; returns (responses, the call object for metadata)."""
    if kind == "unary":
        reply, c = channel.unary_unary("/conf.Test/Unary").with_call(
            payload, metadata=metadata, timeout=20, **kw
        )
        return [reply], c
    if kind == "server-stream":
        c = channel.unary_stream("/conf.Test/ServerStream")(
            payload, metadata=metadata, timeout=20, **kw
        )
        return list(c), c
    if kind == "client-stream":
        reply, c = channel.stream_unary("/conf.Test/ClientStream").with_call(
            iter([payload]), metadata=metadata, timeout=20, **kw
        )
        return [reply], c
    c = channel.stream_stream("/conf.Test/Bidi")(
        iter([payload]), metadata=metadata, timeout=20, **kw
    )
    return list(c), c


@pytest.mark.parametrize("kind", KINDS)
def test_response_headers_and_trailers_reach_the_caller_binary_included(
    conf: Conformance, kind: str
) -> None:
    binary = bytes(range(256))
    metadata = md(
        f"h-{kind}",
        ("x-initial-x-hello", "world"),
        ("x-initial-x-blob-bin", binary),
        ("x-trailer-x-done", "yes"),
        ("x-trailer-x-tail-bin", binary[::-1]),
        ("x-up-bin", binary),
    )
    with conf.channel() as channel:
        replies, c = call(channel, kind, metadata)
        assert replies and all(r == b"hello" for r in replies)
        initial = dict(c.initial_metadata())
        assert initial["x-hello"] == "world"
        assert initial["x-blob-bin"] == binary
        trailing = dict(c.trailing_metadata())
        assert trailing["x-done"] == "yes"
        assert trailing["x-tail-bin"] == binary[::-1]
        assert trailing["ringmesh-attempts"] == "1"
    app_saw = dict(conf.seen.metadata[f"h-{kind}"])
    assert app_saw["x-up-bin"] == binary  # binary request metadata reaches the app intact


def test_the_app_sees_the_callers_user_agent(conf: Conformance) -> None:
    with conf.channel(options=(("grpc.primary_user_agent", "conformance-test/1.0"),)) as channel:
        call(channel, "unary", md("ua"))
    assert "conformance-test/1.0" in dict(conf.seen.metadata["ua"])["user-agent"]


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_every_status_code_and_message_arrives_as_the_app_sent_it(
    conf: Conformance, code: grpc.StatusCode
) -> None:
    message = f"déjà vu 🚀 {code.name} 100% \\ / \t end"
    with conf.channel() as channel, pytest.raises(grpc.RpcError) as err:
        call(
            channel,
            "unary",
            md(
                f"s-{code.name}",
                ("x-code", str(code.value[0])),
                ("x-message-bin", message.encode()),
            ),
        )
    assert err.value.code() == code
    assert err.value.details() == message


def test_status_details_bin_arrive_intact(conf: Conformance) -> None:
    details = b"\x08\x05\x12\x07not here\x1a\x00\xff\xfe"
    metadata = md(
        "details",
        ("x-code", "5"),
        ("x-message-bin", b"gone"),
        ("x-trailer-grpc-status-details-bin", details),
    )
    with conf.channel() as channel, pytest.raises(grpc.RpcError) as err:
        call(channel, "unary", metadata)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(err.value.trailing_metadata())["grpc-status-details-bin"] == details


@pytest.mark.parametrize("kind", KINDS)
def test_compressed_messages_pass_through_both_ways(conf: Conformance, kind: str) -> None:
    payload = b"compress me " * 5000
    with conf.channel(compression=grpc.Compression.Gzip) as channel:
        replies, _ = call(channel, kind, md(f"gz-{kind}", ("x-compress", "1")), payload)
    assert replies and all(r == payload for r in replies)


@pytest.mark.parametrize("kind", ["unary", "bidi"])
def test_ten_mib_messages_both_ways(conf: Conformance, kind: str) -> None:
    payload = bytes(range(256)) * (10 * 1024 * 4)  # 10 MiB
    with conf.channel() as channel:
        replies, _ = call(channel, kind, md(f"big-{kind}", ("x-size", str(len(payload)))), payload)
    assert [len(r) for r in replies] == [len(payload)]


def test_the_callers_cancel_reaches_the_app_and_is_recorded_as_cancelled(conf: Conformance) -> None:
    with conf.channel() as channel:
        stream = channel.unary_stream("/conf.Test/ServerStream")(
            b"x", metadata=md("cancel", ("x-count", "1000"), ("x-sleep", "0.05")), timeout=20
        )
        assert next(stream) == b"x"
        stream.cancel()
    until(lambda: "cancel" in conf.seen.cancelled, within=5, what="the app sees the cancel")
    admin = conf.client.wait_event("ready")["admin"]

    def cancelled_calls() -> float:
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("rpc_client_duration_milliseconds_count")
            and 'rpc_grpc_status_code="1"' in line
        )

    until(
        lambda: cancelled_calls() == 1, within=5, what="one CANCELLED call in rpc.client.duration"
    )


def test_a_client_only_sidecar_routes_and_registers_nothing(conf: Conformance) -> None:
    services = conf.mesh.topology().services
    assert set(services) == {SERVICE}  # the caller's sidecar wrote no record
    with conf.channel() as channel:
        replies, _ = call(channel, "unary", md("client-only"))
    assert replies == [b"hello"]
    ready = conf.client.wait_event("ready")
    assert "inbound" not in ready and "address" not in ready


def test_the_inbound_port_answers_grpc_health_check_and_watch(conf: Conformance) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = conf.app_sidecar.wait_event("registered")["address"]
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="nosuch"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=5)
        assert next(watch).status == serving
        watch.cancel()
