"""How calls end through the mesh: cancelled, past their deadline, or failed by the app.

None of these may leave a call counted in flight (the drain, the load record
and bounded loads read that count), get a call the app already saw sent
again, or cost a healthy instance its place in the ring.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from proto import demo_pb2
from tests.mesh import Instance, Mesh, stats
from tests.waiting import until

pytestmark = pytest.mark.integration


def inflight(instance: Instance) -> int:
    counts: dict[str, int] = stats(instance)["inflight"]
    return sum(counts.values())


def settled(*instances: Instance, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(inflight(i) == 0 for i in instances):
            return True
        time.sleep(0.05)
    return False


def served(mesh: Mesh, instances: list[Instance]) -> int:
    """Calls the apps have served, this question included (asked directly, not through the mesh)."""
    total = 0
    for instance in instances:
        with mesh.channel(f"127.0.0.1:{instance.app_port}") as channel:
            reply = mesh.stub(channel).Echo(demo_pb2.EchoRequest(text="count"), timeout=5)
        total += int(reply.served)
    return total


ECHO = (("ringmesh-service", "echo"), ("ringmesh-hash-key", "k"))


def test_calls_past_their_deadline_or_cancelled_leave_nothing_in_flight(mesh: Mesh) -> None:
    echo = mesh.add("echo")
    client = mesh.add("client")
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                stub.Echo(demo_pb2.EchoRequest(delay_ms=3000), metadata=ECHO, timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        future = stub.Echo.future(demo_pb2.EchoRequest(delay_ms=3000), metadata=ECHO, timeout=10)
        time.sleep(0.3)
        future.cancel()
        replies = stub.Count(
            demo_pb2.CountRequest(n=1000, payload=b"x" * 1000), metadata=ECHO, timeout=10
        )
        next(replies)
        replies.cancel()  # a server stream the caller stops reading
        # The echo app is still busy with the slow calls; the mesh has let go.
        assert settled(client, echo), (stats(client)["inflight"], stats(echo)["inflight"])
        assert stats(client)["ejected"]["echo"] == [], "a caller giving up says nothing of the peer"
        reply = stub.Echo(demo_pb2.EchoRequest(text="after"), metadata=ECHO, timeout=5)
        assert reply.text == "after"


def test_an_app_abort_on_a_client_stream_reaches_the_caller_and_is_never_retried(
    mesh: Mesh,
) -> None:
    echoes = [mesh.add("echo") for _ in range(3)]
    client = mesh.add("client")
    before = served(mesh, echoes)
    metadata = (*ECHO, ("x-abort", "INVALID_ARGUMENT"))
    codes = []
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        for _ in range(CALLS := 30):
            # The app aborts after the first message while the caller still sends.
            requests = (demo_pb2.CountRequest(n=1, payload=b"x" * 30_000) for _ in range(20))
            with pytest.raises(grpc.RpcError) as info:
                stub.Sum(requests, metadata=metadata, timeout=10)
            codes.append(info.value.code())
            trailing = dict(info.value.trailing_metadata() or ())
            assert trailing.get("ringmesh-attempts") == "1"
            assert "ringmesh-not-processed" not in trailing
    # grpc.aio's own writer would report INTERNAL "Internal error from Core" for
    # some of them (a send racing the abort, grpc/grpc#36066): the app's status
    # must reach the caller every time.
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * CALLS, codes
    calls = served(mesh, echoes) - before - len(echoes)  # less the questions themselves
    assert calls == CALLS, "each call reached one app, once"
    doc = stats(client)
    assert doc["ejected"]["echo"] == [] and sum(doc["retries"].values()) == 0


def test_an_app_cannot_make_the_mesh_retry_a_call_it_ran(mesh: Mesh) -> None:
    echoes = [mesh.add("echo") for _ in range(2)]
    client = mesh.add("client")
    before = served(mesh, echoes)
    # The app fails the call and (wrongly) passes on a mesh trailer it got elsewhere.
    metadata = (
        *ECHO,
        ("x-abort", "UNAVAILABLE"),
        ("x-abort-trailer", "ringmesh-not-processed=1"),
        ("x-abort-trailer", "x-app=kept"),
    )
    with mesh.channel(client.outbound) as channel, pytest.raises(grpc.RpcError) as info:
        mesh.stub(channel).Echo(demo_pb2.EchoRequest(text="x"), metadata=metadata, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    trailing = dict(info.value.trailing_metadata() or ())
    assert trailing.get("x-app") == "kept" and "ringmesh-not-processed" not in trailing
    assert trailing.get("ringmesh-attempts") == "1"
    assert served(mesh, echoes) - before - len(echoes) == 1


def test_a_peer_that_hangs_every_call_is_ejected(mesh: Mesh) -> None:
    echoes = [mesh.add("echo") for _ in range(2)]
    client = mesh.add("client")
    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        first = stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=ECHO, timeout=5).instance
        for _ in range(5):  # its app takes longer than every caller waits
            with pytest.raises(grpc.RpcError) as info:
                stub.Echo(demo_pb2.EchoRequest(delay_ms=2000), metadata=ECHO, timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The caller's deadline may pass a moment before its sidecar counts the 5th.
        until(lambda: stats(client)["ejected"]["echo"] == [first], within=2, what="ejected")
        time.sleep(1.5)  # past a health probe: its sidecar says SERVING, but it stays out
        assert stats(client)["ejected"]["echo"] == [first]
        reply = stub.Echo(demo_pb2.EchoRequest(text="x"), metadata=ECHO, timeout=5)
        assert reply.instance != first and reply.instance in {e.name for e in echoes}


def test_streams_that_answer_until_their_deadline_eject_nobody(mesh: Mesh) -> None:
    mesh.add("echo")
    mesh.add("echo")
    client = mesh.add("client")

    def slow_requests() -> Iterator[demo_pb2.EchoRequest]:
        for i in range(100):
            yield demo_pb2.EchoRequest(text=str(i))
            time.sleep(0.05)

    with mesh.channel(client.outbound) as channel:
        stub = mesh.stub(channel)
        for _ in range(6):  # more than the 5 failures that eject
            answered = 0
            with pytest.raises(grpc.RpcError) as info:
                # Answers flow, then the deadline ends the stream (5 s of requests).
                for _reply in stub.Chat(slow_requests(), metadata=ECHO, timeout=1.0):
                    answered += 1
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and answered > 0
    assert stats(client)["ejected"]["echo"] == []
    assert settled(client)
