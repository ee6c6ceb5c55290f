"""The admin port: a tiny HTTP endpoint for probes (``/healthz``, ``/ready``), Prometheus
``/metrics`` and the data plane's counters as JSON (``/stats``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class AdminServer:
    """Answers ``GET /healthz`` (the process is up) and ``GET /ready`` (registered, serving)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ready: Callable[[], bool],
        stats: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
    ) -> None:
        self._host = host
        self._port = port
        self._ready = ready
        self._stats = stats
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass
            status, body = self._answer(line.decode("latin-1").split())
            content_type = (
                "application/json" if body.startswith(b"{") else "text/plain; version=0.0.4"
            )
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, request: list[str]) -> tuple[int, bytes]:
        if len(request) < 2:
            return 405, b"bad request\n"
        method, path = request[0], request[1]
        if method != "GET":
            return 405, b"only GET\n"
        if path == "/healthz":
            return 200, b"ok\n"
        if path == "/metrics":
            return 200, self._metrics()
        if path == "/stats":
            return 200, json.dumps(self._stats(), sort_keys=True).encode() + b"\n"
        if path == "/ready":
            return (200, b"ready\n") if self._ready() else (503, b"not ready\n")
        return 404, b"not found\n"
