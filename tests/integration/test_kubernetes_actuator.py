"""The kubernetes actuator against a recorded API exchange, replayed on a real local socket;
and against an API server that cannot be reached or never answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from registry.errors import MeshError
from scaler.kubernetes import KubernetesActuator, load_apps_api

EXCHANGE = json.loads((Path(__file__).parent / "data" / "k8s_scale_exchange.json").read_text())[
    "exchange"
]


class Replay:
    """Answers requests in the recorded order; records what went wrong."""

    def __init__(self, exchange: list[dict[str, Any]]) -> None:
        self.exchange = list(exchange)
        self.served = 0
        self.mismatches: list[str] = []

    def answer(self, method: str, path: str, content_type: str, body: bytes) -> tuple[int, bytes]:
        if self.served >= len(self.exchange):
            self.mismatches.append(f"unexpected {method} {path}")
            return 500, b"{}"
        step = self.exchange[self.served]
        self.served += 1
        want = step["request"]
        if (method, path) != (want["method"], want["path"]):
            self.mismatches.append(f"got {method} {path}, recorded {want['method']} {want['path']}")
        if "content_type" in want and content_type not in want["content_type"].split("|"):
            self.mismatches.append(f"content type {content_type!r}")
        if "body" in want and json.loads(body or b"null") != want["body"]:
            self.mismatches.append(f"body {body!r}")
        return step["response"]["status"], json.dumps(step["response"]["body"]).encode()


def scale(name: str, replicas: int) -> dict[str, Any]:
    """A Scale as the recorded exchange has it."""
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "selector": f"app={name}"},
    }


def step(method: str, name: str, replicas: int, *, patch: int | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {
        "method": method,
        "path": f"/apis/apps/v1/namespaces/shop/deployments/{name}/scale",
    }
    if patch is not None:
        request["body"] = {"spec": {"replicas": patch}}
    return {"request": request, "response": {"status": 200, "body": scale(name, replicas)}}


@pytest.fixture
def api_server() -> Iterator[tuple[str, Replay]]:
    with replaying(EXCHANGE) as served:
        yield served


@contextlib.contextmanager
def replaying(exchange: list[dict[str, Any]]) -> Iterator[tuple[str, Replay]]:
    replay = Replay(exchange)

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            status, body = replay.answer(
                self.command,
                self.path.split("?")[0],
                self.headers.get("Content-Type", ""),
                self.rfile.read(length),
            )
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", replay
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_scales_a_deployment_through_the_scale_subresource(api_server: tuple[str, Replay]) -> None:
    url, replay = api_server

    async def scenario() -> None:
        actuator = KubernetesActuator(load_apps_api(host=url), namespace="shop")
        try:
            assert actuator.replicas("demo") is None
            await actuator.apply("demo", 5)  # reads 3, patches to 5
            assert actuator.replicas("demo") == 5
            await actuator.apply("demo", 5)  # already there: no request
            with pytest.raises(MeshError, match=r"read of deployment shop/missing failed: 404"):
                await actuator.apply("missing", 2)
            assert actuator.replicas("missing") is None
        finally:
            await actuator.aclose()

    asyncio.run(scenario())
    assert replay.mismatches == []
    assert replay.served == len(EXCHANGE)


def test_a_new_term_reads_the_deployment_again() -> None:
    # A scales demo to 5; B leads for a while and scales it to 7; A leads again and
    # decides 5. A's cache still says 5, but the Deployment is at 7: it must look.
    exchange = [
        step("GET", "demo", 3),
        step("PATCH", "demo", 5, patch=5),
        step("GET", "demo", 7),
        step("PATCH", "demo", 5, patch=5),
    ]
    with replaying(exchange) as (url, replay):

        async def scenario() -> None:
            actuator = KubernetesActuator(load_apps_api(host=url), namespace="shop")
            try:
                await actuator.apply("demo", 5)
                actuator.new_term()
                assert actuator.replicas("demo") is None, "the count in force is unknown"
                await actuator.apply("demo", 5)
                assert actuator.replicas("demo") == 5
            finally:
                await actuator.aclose()

        asyncio.run(scenario())
    assert replay.mismatches == []
    assert replay.served == len(exchange)


def test_an_unreachable_api_server_is_a_one_line_mesh_error() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nothing listens there

    async def scenario() -> None:
        actuator = KubernetesActuator(
            load_apps_api(host=f"http://127.0.0.1:{port}"), namespace="shop"
        )
        try:
            with pytest.raises(MeshError) as raised:
                await actuator.apply("demo", 2)
            message = str(raised.value)
            assert message.startswith("kubernetes read of deployment shop/demo failed: ")
            assert "refused" in message and "\n" not in message
            assert actuator.replicas("demo") is None
        finally:
            await actuator.aclose()

    asyncio.run(scenario())


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """An API server that accepts connections and never answers; closed on exit, so a
    client still waiting on it wakes up (and the test ends) even without a timeout."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        thread.join()
        listener.close()
        for conn in accepted:
            conn.close()


def test_a_hung_api_server_does_not_stall_the_caller() -> None:
    async def scenario() -> float:
        with silent_server() as url:
            actuator = KubernetesActuator(
                load_apps_api(host=url), namespace="shop", request_timeout=0.3
            )
            started = time.monotonic()
            try:
                with pytest.raises(
                    MeshError, match=r"read of deployment shop/demo failed: .*timed out"
                ):
                    # Without a request timeout this would wait forever: bound the test.
                    await asyncio.wait_for(actuator.apply("demo", 2), 15)
                return time.monotonic() - started
            finally:
                await actuator.aclose()

    took = asyncio.run(scenario())
    # The client retries an idempotent read 3 times: 4 attempts of 0.3 s.
    assert took < 4 * 0.3 + 3
