"""ChannelPool: one long-lived gRPC channel per upstream address, and its multicallables.

Built once and reused: creating channels or multicallables per call is the
kind of per-call work a proxy hop cannot afford.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import Any

import grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
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
_READY = grpc.ChannelConnectivity.READY
_MAX_CACHED_CALLS = 4096  # per kind; more distinct (address, method) pairs are not cached
_CONNECTING = (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING)


class NotConnected(Exception):
    """A peer's channel did not become READY in time: nothing was sent to it."""


class ChannelPool:
    """One long-lived channel per upstream address, and its multicallables."""

    def __init__(self, *, options: list[tuple[str, Any]] | None = None) -> None:
        self._options = options or CHANNEL_OPTIONS
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[grpc.aio.Channel] = set()  # out of the pool, close under way
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
            if len(self._unary) < _MAX_CACHED_CALLS:  # method names come from callers
                self._unary[key] = call
        return call

    def stream(self, address: str, method: str) -> Callable[..., Any]:
        key = (address, method)
        call = self._stream.get(key)
        if call is None:
            call = self.channel(address).stream_stream(method)
            if len(self._stream) < _MAX_CACHED_CALLS:
                self._stream[key] = call
        return call

    async def connect(self, address: str, wait: float) -> None:
        """Return once the channel is READY; raise NotConnected if it is not within ``wait`` s.

        gRPC would otherwise hold a call to a peer that accepts TCP but never
        speaks HTTP/2 until the caller's deadline, leaving no time to fail over.
        """
        channel = self.channel(address)
        state = channel.get_state(try_to_connect=True)
        if state is _READY:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        # TRANSIENT_FAILURE: the last connect failed (refused, unreachable); fail
        # fast so the call moves on. IDLE/CONNECTING: wait, but not forever.
        while state in _CONNECTING:
            left = deadline - loop.time()
            if left <= 0:
                raise NotConnected(f"{address} did not connect within {wait:.2f} s")
            try:
                async with asyncio.timeout(left):
                    await channel.wait_for_state_change(state)
            except TimeoutError:
                raise NotConnected(f"{address} did not connect within {wait:.2f} s") from None
            state = channel.get_state(try_to_connect=True)
        if state is not _READY:
            raise NotConnected(f"cannot connect to {address} (its last connect attempt failed)")

    async def ensure_connected(self, address: str, wait: float) -> bool:
        """True once the channel is READY; False if it is not within ``wait`` seconds."""
        try:
            await self.connect(address, wait)
        except NotConnected:
            return False
        return True

    async def retain(self, addresses: Collection[str]) -> None:
        """Close channels to addresses that are gone from the topology."""
        gone = [a for a in self._channels if a not in addresses]
        if not gone:
            return
        # Everything is taken out before the first await, so overlapping calls
        # never close a channel twice; the closes then run side by side.
        closing = [self._channels.pop(address) for address in gone]
        self._closing.update(closing)
        dropped = set(gone)
        self._unary = {k: v for k, v in self._unary.items() if k[0] not in dropped}
        self._stream = {k: v for k, v in self._stream.items() if k[0] not in dropped}
        await asyncio.gather(*(self._close(c, grace=5.0) for c in closing))

    async def _close(self, channel: grpc.aio.Channel, *, grace: float | None) -> None:
        try:
            await channel.close(grace=grace)
        except Exception as exc:  # closing is best effort; say so, go on
            log.warning("closing a channel failed: %s", exc)
        finally:
            self._closing.discard(channel)

    async def aclose(self) -> None:
        # Also the channels a cancelled retain() had taken out but not closed.
        channels = [*self._channels.values(), *self._closing]
        self._channels = {}
        self._unary.clear()
        self._stream.clear()
        await asyncio.gather(*(self._close(c, grace=None) for c in channels))
