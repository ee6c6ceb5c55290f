"""The kubernetes actuator against a recorded API exchange, replayed on a real local socket;
and against an API server that cannot be reached or never answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from registry.errors import MeshError
from scaler.kubernetes import KubernetesActuator, load_apps_api

RECORDED = json.loads((Path(__file__).parent / "data" / "k8s_scale_exchange.json").read_text())
EXCHANGE = RECORDED["exchange"]
CONFLICT_EXCHANGE = RECORDED["conflict_exchange"]
JSON_PATCH = "application/json-patch+json"


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


def scale(name: str, replicas: int, *, running: int | None = None) -> dict[str, Any]:
    """A Scale as the recorded exchange has it (autoscaling/v1 omits spec.replicas 0)."""
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"replicas": replicas} if replicas else {},
        "status": {"replicas": replicas if running is None else running, "selector": f"app={name}"},
    }


def step(method: str, name: str, replicas: int) -> dict[str, Any]:
    request = {"method": method, "path": f"/apis/apps/v1/namespaces/shop/deployments/{name}/scale"}
    return {"request": request, "response": {"status": 200, "body": scale(name, replicas)}}


def patched(
    name: str, body: list[dict[str, Any]], *, status: int = 200, answer: Any = None
) -> dict[str, Any]:
    """A PATCH of the scale with JSON patch ``body``; the answer is the Scale it sets."""
    if answer is None:
        answer = scale(name, body[-1]["value"])
    return {
        "request": {
            "method": "PATCH",
            "path": f"/apis/apps/v1/namespaces/shop/deployments/{name}/scale",
            "content_type": JSON_PATCH,
            "body": body,
        },
        "response": {"status": status, "body": answer},
    }


def replace(current: int, replicas: int) -> list[dict[str, Any]]:
    """The JSON patch from a count read (or patched) as ``current``."""
    return [
        {"op": "test", "path": "/spec/replicas", "value": current},
        {"op": "replace", "path": "/spec/replicas", "value": replicas},
    ]


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


def against(
    exchange: list[dict[str, Any]],
    scenario: Callable[[KubernetesActuator, Replay], Awaitable[None]],
    **options: Any,
) -> None:
    """Run ``scenario`` with an actuator on a server replaying ``exchange``; every
    step must then have been served, as recorded, and nothing more."""
    with replaying(exchange) as (url, replay):

        async def run() -> None:
            actuator = KubernetesActuator(load_apps_api(host=url), namespace="shop", **options)
            try:
                await scenario(actuator, replay)
            finally:
                await actuator.aclose()

        asyncio.run(run())
    assert replay.mismatches == []
    assert replay.served == len(exchange)


def test_scales_a_deployment_through_the_scale_subresource() -> None:
    async def scenario(actuator: KubernetesActuator, replay: Replay) -> None:
        assert actuator.replicas("demo") is None
        await actuator.apply("demo", 5)  # reads 3, patches 3 -> 5
        assert actuator.replicas("demo") == 5
        await actuator.apply("demo", 5)  # already there: no request
        await actuator.apply("demo", 2)  # patches 5 -> 2: the count the last patch set
        assert actuator.replicas("demo") == 2
        with pytest.raises(MeshError) as raised:
            await actuator.apply("missing", 2)
        assert str(raised.value) == (
            "kubernetes read of deployment shop/missing failed: 404 Not Found"
        )
        assert actuator.replicas("missing") is None

    against(EXCHANGE, scenario)


def test_a_patch_over_a_count_changed_since_is_refused_and_read_again() -> None:
    # demo is scaled 3 -> 5; someone else (a newer leader, an operator) scales it to 7;
    # this actuator, still believing 5, patches 5 -> 4: the test op fails, the API server
    # answers 422 and writes nothing. The actuator reads 7 at once; the next apply
    # patches 7 -> 4.
    async def scenario(actuator: KubernetesActuator, replay: Replay) -> None:
        await actuator.apply("demo", 5)
        assert actuator.replicas("demo") == 5
        with pytest.raises(MeshError) as raised:
            await actuator.apply("demo", 4)
        assert str(raised.value) == (
            "kubernetes scale of deployment shop/demo to 4 refused: its replicas were"
            " changed by someone else since they were read as 5 (now 7)"
        )
        assert actuator.replicas("demo") == 7, "the count in force, read at once"
        await actuator.apply("demo", 4)
        assert actuator.replicas("demo") == 4

    against(CONFLICT_EXCHANGE, scenario)


def test_a_count_the_api_server_refuses_is_not_taken_for_a_conflict() -> None:
    # Also a 422 Invalid, but from validation (as a real API server answers replicas -1):
    # the count was not changed by anyone, the error says what the server said.
    invalid = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'Scale.autoscaling "demo" is invalid: spec.replicas: Invalid value: -1:'
        " must be greater than or equal to 0",
        "reason": "Invalid",
        "details": {
            "name": "demo",
            "group": "autoscaling",
            "kind": "Scale",
            "causes": [
                {
                    "reason": "FieldValueInvalid",
                    "message": "Invalid value: -1: must be greater than or equal to 0",
                    "field": "spec.replicas",
                }
            ],
        },
        "code": 422,
    }
    exchange = [step("GET", "demo", 3), patched("demo", replace(3, -1), status=422, answer=invalid)]

    async def scenario(actuator: KubernetesActuator, replay: Replay) -> None:
        with pytest.raises(MeshError) as raised:
            await actuator.apply("demo", -1)
        assert str(raised.value) == (
            "kubernetes patch of deployment shop/demo failed: 422 Unprocessable Entity"
        )
        assert actuator.replicas("demo") is None

    against(exchange, scenario)


def test_scales_from_and_to_zero() -> None:
    # At 0 the Scale has "spec": {}: a test of /spec/replicas against 0 would fail on a
    # real API server, so from 0 the patch tests for the empty spec and adds the count.
    exchange = [
        step("GET", "demo", 0),
        patched(
            "demo",
            [
                {"op": "test", "path": "/spec", "value": {}},
                {"op": "add", "path": "/spec/replicas", "value": 2},
            ],
        ),
        patched("demo", replace(2, 0), answer=scale("demo", 0, running=2)),
    ]

    async def scenario(actuator: KubernetesActuator, replay: Replay) -> None:
        await actuator.apply("demo", 2)
        assert actuator.replicas("demo") == 2
        await actuator.apply("demo", 0)
        assert actuator.replicas("demo") == 0
        await actuator.apply("demo", 0)  # already there: no request

    against(exchange, scenario)


def test_a_new_term_reads_the_deployment_again() -> None:
    # A scales demo to 5; B leads for a while and scales it to 7; A leads again and
    # decides 5. A's cache still says 5, but the Deployment is at 7: it must look.
    exchange = [
        step("GET", "demo", 3),
        patched("demo", replace(3, 5)),
        step("GET", "demo", 7),
        patched("demo", replace(7, 5)),
    ]

    async def scenario(actuator: KubernetesActuator, replay: Replay) -> None:
        await actuator.apply("demo", 5)
        actuator.new_term()
        assert actuator.replicas("demo") is None, "the count in force is unknown"
        await actuator.apply("demo", 5)
        assert actuator.replicas("demo") == 5

    against(exchange, scenario)


def test_a_count_is_read_again_once_it_is_ten_seconds_old() -> None:
    # demo is scaled 3 -> 5. Someone else sets 7 (a stalled old leader whose test op
    # matched, an operator by hand). Deciding 5 again, a fresh cache would send nothing;
    # after 10 s the actuator reads the Deployment, sees 7 and puts back 5.
    now = [0.0]
    exchange = [
        step("GET", "demo", 3),
        patched("demo", replace(3, 5)),
        step("GET", "demo", 7),
        patched("demo", replace(7, 5)),
    ]

    async def scenario(actuator: KubernetesActuator, replay: Replay) -> None:
        await actuator.apply("demo", 5)
        now[0] += 9.0
        await actuator.apply("demo", 5)  # fresh: trusted, nothing sent
        assert replay.served == 2
        now[0] += 2.0
        await actuator.apply("demo", 5)
        assert actuator.replicas("demo") == 5

    against(exchange, scenario, clock=lambda: now[0])


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
