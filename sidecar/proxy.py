"""Opaque-bytes gRPC forwarding for all four RPC kinds, shared by inbound and outbound.

Nothing is (de)serialized. Everything that can be built once is: method
handlers, channels, and multicallables are cached; per call the proxy reads
the metadata once, asks its ``Director`` where to go, and forwards.
Known-unary methods take the cheaper unary-unary path; every other method is
handled as stream-stream, which fits all four kinds.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, Protocol

import grpc

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str | bytes], ...]

# Headers the upstream call sets itself.
_NOT_FORWARDED = frozenset({"user-agent"})
_MAX_CACHED_METHODS = 4096
_CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 0),  # ringmesh decides about retries, not the channel
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
]
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a sidecar must own its port (FIELD-NOTES.md)
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class CallRejected(Exception):
    """A Director refusing a call: the proxy answers with this status, nothing is forwarded."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Director(Protocol):
    """Decides where one call goes; ``done`` is called exactly once per accepted call."""

    def direct(self, method: str, metadata: Metadata) -> tuple[str, object]:
        """Return (upstream address, a token for ``done``) or raise CallRejected."""

    def done(self, token: object) -> None: ...

    def failed(self, error: grpc.aio.AioRpcError, token: object) -> Metadata:
        """Extra trailing metadata for a failed upstream call."""


class ChannelPool:
    """One long-lived channel per upstream address, and its multicallables."""

    def __init__(self, *, options: list[tuple[str, Any]] | None = None) -> None:
        self._options = options or _CHANNEL_OPTIONS
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._unary: dict[tuple[str, str], Callable[..., Any]] = {}
        self._stream: dict[tuple[str, str], Callable[..., Any]] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return channel

    def unary(self, address: str, method: str) -> Callable[..., Any]:
        key = (address, method)
        call = self._unary.get(key)
        if call is None:
            call = self.channel(address).unary_unary(method)
            self._unary[key] = call
        return call

    def stream(self, address: str, method: str) -> Callable[..., Any]:
        key = (address, method)
        call = self._stream.get(key)
        if call is None:
            call = self.channel(address).stream_stream(method)
            self._stream[key] = call
        return call

    async def retain(self, addresses: Collection[str]) -> None:
        """Close channels to addresses that are gone from the topology."""
        for address in [a for a in self._channels if a not in addresses]:
            channel = self._channels.pop(address)
            self._unary = {k: v for k, v in self._unary.items() if k[0] != address}
            self._stream = {k: v for k, v in self._stream.items() if k[0] != address}
            await channel.close(grace=5.0)

    async def aclose(self) -> None:
        channels, self._channels = self._channels, {}
        self._unary.clear()
        self._stream.clear()
        for channel in channels.values():
            await channel.close()


def split_metadata(metadata: Any) -> Metadata:
    return tuple((m[0], m[1]) for m in metadata if m[0] not in _NOT_FORWARDED)


class ProxyHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler forwarding every method through a ChannelPool."""

    def __init__(
        self,
        director: Director,
        pool: ChannelPool,
        *,
        unary_methods: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        self._director = director
        self._pool = pool
        self._unary_methods = unary_methods
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = self._build(method)
            if len(self._handlers) < _MAX_CACHED_METHODS:
                self._handlers[method] = handler
        return handler

    def forget_handlers(self) -> None:
        """Drop cached handlers (when the set of known-unary methods changes)."""
        self._handlers = {}

    def _build(self, method: str) -> grpc.RpcMethodHandler:
        if method in self._unary_methods():
            return grpc.unary_unary_rpc_method_handler(self._unary_forwarder(method))
        return grpc.stream_stream_rpc_method_handler(self._stream_forwarder(method))

    def _unary_forwarder(self, method: str) -> Callable[..., Any]:
        director, pool = self._director, self._pool

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = split_metadata(context.invocation_metadata())
            try:
                address, token = director.direct(method, metadata)
            except CallRejected as exc:
                await context.abort(exc.code, exc.details)
            try:
                call = pool.unary(address, method)(
                    request, timeout=context.time_remaining(), metadata=metadata
                )
                response: bytes = await call
                trailing = await call.trailing_metadata()
                if trailing:
                    context.set_trailing_metadata(trailing)
                return response
            except grpc.aio.AioRpcError as exc:
                extra = director.failed(exc, token)
                await context.abort(exc.code(), exc.details() or "", _trailing(exc, extra))
            finally:
                director.done(token)
            raise AssertionError("unreachable")

        return forward

    def _stream_forwarder(self, method: str) -> Callable[..., Any]:
        director, pool = self._director, self._pool

        async def forward(
            request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            metadata = split_metadata(context.invocation_metadata())
            try:
                address, token = director.direct(method, metadata)
            except CallRejected as exc:
                await context.abort(exc.code, exc.details)
            try:
                call = pool.stream(address, method)(
                    request_iterator, timeout=context.time_remaining(), metadata=metadata
                )
                async for response in call:
                    yield response
                trailing = await call.trailing_metadata()
                if trailing:
                    context.set_trailing_metadata(trailing)
            except grpc.aio.AioRpcError as exc:
                extra = director.failed(exc, token)
                await context.abort(exc.code(), exc.details() or "", _trailing(exc, extra))
            finally:
                director.done(token)

        return forward


def _trailing(exc: grpc.aio.AioRpcError, extra: Metadata) -> Metadata:
    upstream = exc.trailing_metadata() or ()
    return tuple((m[0], m[1]) for m in upstream) + extra
