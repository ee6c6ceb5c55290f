"""Hostile input on every port: a clean error or a closed connection, the sidecar keeps
serving everyone else, and its memory comes back down.

Raw HTTP/2 comes from the h2 package, so a test can do what no gRPC library
would: open a thousand streams and never finish them, or never read.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from proto import demo_pb2, demo_pb2_grpc
from tests.mesh import Instance, Mesh
from tests.waiting import until

pytestmark = pytest.mark.integration

HTTP1 = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n"
# The first bytes of a TLS 1.2 ClientHello record, then filler.
CLIENT_HELLO = bytes.fromhex("160301020001000200fc03030000") + b"\x00" * 500
RANDOM = os.urandom(64 * 1024)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def send_garbage(address: str, garbage: bytes) -> None:
    """Send ``garbage``; the sidecar must close the connection within a few seconds."""
    with socket.create_connection(hostport(address), timeout=5) as sock:
        try:
            sock.sendall(garbage)
        except (BrokenPipeError, ConnectionResetError):
            return  # closed while we were still sending: fine
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    return
            except ConnectionResetError:
                return
            except TimeoutError:
                break
        raise AssertionError(f"{address} kept a connection open after garbage")


def echo_works(client: Instance) -> None:
    with grpc.insecure_channel(client.outbound) as channel:
        reply = demo_stub(channel).Echo(
            demo_pb2.EchoRequest(text="still here"),
            metadata=(("ringmesh-service", "echo"), ("ringmesh-hash-key", "k")),
            timeout=10,
        )
    assert reply.text == "still here"


def demo_stub(channel: grpc.Channel) -> demo_pb2_grpc.DemoStub:
    return demo_pb2_grpc.DemoStub(channel)


@pytest.fixture
def pair(mesh: Mesh) -> Iterator[tuple[Instance, Instance]]:
    echo = mesh.add("echo")
    client = mesh.add("client")
    echo_works(client)
    yield echo, client


def test_garbage_on_any_port_closes_that_connection_only(pair: tuple[Instance, Instance]) -> None:
    echo, client = pair
    for address in (client.outbound, echo.address, client.info["inbound"]):
        for garbage in (HTTP1, CLIENT_HELLO, RANDOM, b""):
            send_garbage(address, garbage)
            echo_works(client)


def test_headers_over_16_kib_get_an_error_and_change_nothing(
    pair: tuple[Instance, Instance],
) -> None:
    _echo, client = pair
    with grpc.insecure_channel(client.outbound) as channel:
        stub = demo_stub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Echo(
                demo_pb2.EchoRequest(text="x"),
                metadata=(("ringmesh-service", "echo"), ("x-big", "b" * 20_000)),
                timeout=10,
            )
        assert err.value.code() != grpc.StatusCode.OK
    echo_works(client)


def grpc_frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


class RawClient:
    """One HTTP/2 connection, driven by hand."""

    def __init__(self, address: str) -> None:
        self.sock = socket.create_connection(hostport(address), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def start_call(self, method: str, message: bytes | None, *, end: bool) -> int:
        stream = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"), (":scheme", "http"), (":path", method),
            (":authority", "localhost"), ("content-type", "application/grpc"),
            ("te", "trailers"), ("ringmesh-service", "echo"), ("ringmesh-hash-key", "k"),
        ]  # fmt: skip
        self.conn.send_headers(stream, headers)
        if message is not None:
            self.conn.send_data(stream, grpc_frame(message), end_stream=end)
        return stream

    def status_of(self, stream: int, within: float = 10.0) -> str:
        """Read until ``stream`` ends; its grpc-status ("" if it was reset)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for event in self.read_some(1.0):
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                if isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                    return ""
                if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                    headers = dict(event.headers)
                    if event.stream_id == stream and b"grpc-status" in headers:
                        return str(headers[b"grpc-status"].decode())
        raise AssertionError(f"stream {stream} did not end within {within} s")

    def read_some(self, within: float) -> list[h2.events.Event]:
        self.sock.settimeout(within)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return []
        events = self.conn.receive_data(data) if data else []
        self.flush()
        return list(events)

    def close(self) -> None:
        self.sock.close()


def test_a_thousand_open_streams_on_one_connection_leave_others_served(
    pair: tuple[Instance, Instance],
) -> None:
    echo, client = pair
    pid = client.sidecar.proc.pid
    before = rss_mb(pid)
    raw = RawClient(client.outbound)
    try:
        raw.read_some(1.0)  # the server's SETTINGS
        limit = raw.conn.remote_settings.max_concurrent_streams
        assert limit <= 4096, "a sidecar must bound the streams one connection may open"
        request = demo_pb2.CountRequest(n=1).SerializeToString()
        opened = 0
        for _ in range(min(limit, 1000)):
            raw.start_call("/ringmesh.demo.v1.Demo/Sum", request, end=False)  # never finished
            opened += 1
            if opened % 100 == 0:
                raw.flush()
        raw.flush()
        until(
            lambda: echo_inflight(echo) >= opened * 0.9,
            within=30,
            what=f"{opened} streams held open at the app",
        )
        echo_works(client)  # everyone else is still served
        held = rss_mb(pid)
    finally:
        raw.close()
    until(lambda: echo_inflight(echo) == 0, within=30, what="the abandoned streams ended")
    echo_works(client)
    after = rss_mb(pid)
    assert held - before < 100, (before, held)
    assert after - before < 30, (before, held, after)


def echo_inflight(echo: Instance) -> int:
    from tests.mesh import stats

    return int(stats(echo)["inflight"]["inbound"])


def test_a_reader_that_never_reads_holds_the_sidecars_memory_flat(
    pair: tuple[Instance, Instance],
) -> None:
    echo, client = pair
    pids = (client.sidecar.proc.pid, echo.sidecar.proc.pid)
    before = [rss_mb(pid) for pid in pids]
    raw = RawClient(client.outbound)
    try:
        # 2,000,000 replies (tens of MB) to a caller that never reads past its
        # 64 KiB window: flow control holds the rest back, at the app.
        raw.start_call(
            "/ringmesh.demo.v1.Demo/Count",
            demo_pb2.CountRequest(n=2_000_000).SerializeToString(),
            end=True,
        )
        raw.flush()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            time.sleep(0.5)
            echo_works(client)
        grown = [rss_mb(pid) - b for pid, b in zip(pids, before, strict=True)]
    finally:
        raw.close()
    assert max(grown) < 20, grown
    until(lambda: echo_inflight(echo) == 0, within=30, what="the unread stream ended")


def test_calls_that_end_with_an_empty_data_frame_keep_working(
    pair: tuple[Instance, Instance],
) -> None:
    """Clients such as the h2 crate end a request with an empty DATA frame; a relay
    that forwards those trips gRPC's flood guard after a few hundred calls on one
    connection ("Too many zero length data frames") and breaks it."""
    _echo, client = pair
    raw = RawClient(client.outbound)
    request = grpc_frame(demo_pb2.EchoRequest(text="x").SerializeToString())
    statuses: list[str] = []
    try:
        for _ in range(600):
            stream = raw.start_call("/ringmesh.demo.v1.Demo/Echo", None, end=False)
            raw.conn.send_data(stream, request)
            raw.conn.send_data(stream, b"", end_stream=True)
            raw.flush()
            statuses.append(raw.status_of(stream))
    finally:
        raw.close()
    assert set(statuses) == {"0"}, {s: statuses.count(s) for s in set(statuses)}
