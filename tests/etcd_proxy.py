"""A gRPC pass-through to a real etcd whose watch can be made to lag.

For tests of what a sidecar does while its watch is behind (a busy etcd, a
slow network): every etcd method is forwarded as opaque bytes; each Watch
response is held back ``watch_delay`` seconds. It runs its own event loop in a
thread, so synchronous tests and sidecar processes (``--etcd proxy.url``) can
use it; leaving the ``with`` block stops it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

_STREAMS = frozenset({"/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive"})


class LaggingEtcdProxy:
    def __init__(self, upstream: str, *, watch_delay: float) -> None:
        self._upstream = upstream  # host:port of the real etcd
        self._watch_delay = watch_delay
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    def __enter__(self) -> LaggingEtcdProxy:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> int:
        self._channel = grpc.aio.insecure_channel(self._upstream)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((_PassThrough(self._channel, self._watch_delay),))
        port: int = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    async def _stop(self) -> None:
        assert self._server is not None and self._channel is not None
        await self._server.stop(None)
        await self._channel.close()


class _PassThrough(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, channel: grpc.aio.Channel, watch_delay: float) -> None:
        self._channel = channel
        self._watch_delay = watch_delay

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method
        if method in _STREAMS:
            return grpc.stream_stream_rpc_method_handler(self._stream(method))
        return grpc.unary_unary_rpc_method_handler(self._unary(method))

    def _unary(self, method: str) -> Callable[..., Any]:
        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                reply: bytes = await self._channel.unary_unary(method)(
                    request, timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            return reply

        return forward

    def _stream(self, method: str) -> Callable[..., Any]:
        delay = self._watch_delay if method == "/etcdserverpb.Watch/Watch" else 0.0

        async def forward(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            call = self._channel.stream_stream(method)(requests)
            try:
                async for response in call:
                    if delay:
                        await asyncio.sleep(delay)
                    yield response
            finally:
                call.cancel()

        return forward
