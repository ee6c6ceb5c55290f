"""The kubernetes actuator against a recorded API exchange, replayed on a real local socket."""

from __future__ import annotations

import asyncio
import json
import threading
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


@pytest.fixture
def api_server() -> Iterator[tuple[str, Replay]]:
    replay = Replay(EXCHANGE)

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
    yield f"http://127.0.0.1:{server.server_address[1]}", replay
    server.shutdown()
    server.server_close()


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
