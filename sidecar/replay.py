"""RequestReplay: lets a streaming call be retried before its first response.

The caller's request stream can be read only once, so every message read is
kept until the first response arrives (then the call is committed and can no
longer be retried) or until more than ``limit`` bytes are buffered. Each
attempt reads the stream from the start. Reads from the caller happen in a
shielded task, so a failed attempt being cancelled never breaks the stream
for the next one, and the reader of an ended attempt stops once a newer
attempt exists (it could otherwise take a message meant for the new one).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class RequestReplay:
    def __init__(self, source: AsyncIterator[bytes], *, limit: int) -> None:
        self._source = source
        self._limit = limit
        self._buffer: list[bytes] = []
        self._start = 0  # stream index of _buffer[0]
        self._count = 0  # messages read from the caller so far
        self._size = 0
        self._ended = False
        self._error: BaseException | None = None
        self._fetch: asyncio.Future[bytes] | None = None
        self._committed = False
        self._attempts = 0  # also the generation of the newest attempt's reader

    @property
    def replayable(self) -> bool:
        """True while a new attempt can still see the whole stream."""
        return not self._committed and self._start == 0 and self._size <= self._limit

    def commit(self) -> None:
        """The first response arrived: no more attempts, stop keeping messages."""
        self._committed = True

    def attempt(self) -> AsyncIterator[bytes]:
        """The request stream for a new attempt, from its first message."""
        if self._attempts and not self.replayable:
            raise RuntimeError("the request stream can no longer be replayed")
        self._attempts += 1
        return self._iterate(self._attempts)

    async def _iterate(self, generation: int) -> AsyncIterator[bytes]:
        index = 0
        # gRPC may keep an ended attempt's reader waiting for the next message;
        # once a newer attempt exists it stops, touching nothing.
        while generation == self._attempts:
            if index < self._count:
                message = self._buffer[index - self._start]
                index += 1
                if not self.replayable:
                    # Only this attempt can still run: drop what it has sent.
                    del self._buffer[: index - self._start]
                    self._start = index
                yield message
                continue
            if self._ended:
                if self._error is not None:
                    raise self._error
                return
            await self._read_one()

    async def drain(self, within: float) -> None:
        """Read on until the caller has sent everything, at most ``within`` seconds and
        ``limit`` bytes. Answering a client stream while the caller is still sending
        cuts its send short, and a grpc.aio caller then sees INTERNAL "Internal error
        from Core" instead of the answer (grpc/grpc#36066; our own hops are immune,
        see sidecar/sending.py, but apps are not): a sidecar that could not deliver
        a call lets the caller finish sending first, so its status arrives."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not self._ended and self._size <= self._limit:
                    await self._read_one()

    async def _read_one(self) -> None:
        if self._fetch is None:
            self._fetch = asyncio.ensure_future(self._source.__anext__())
            self._fetch.add_done_callback(self._fetched)
        await asyncio.wait({self._fetch})  # cancelling us leaves the read running

    def _fetched(self, future: asyncio.Future[bytes]) -> None:
        self._fetch = None
        if future.cancelled():
            self._ended = True
            self._error = asyncio.CancelledError()
            return
        error = future.exception()
        if isinstance(error, StopAsyncIteration):
            self._ended = True
        elif error is not None:
            self._ended = True
            self._error = error
        else:
            message = future.result()
            self._buffer.append(message)
            self._count += 1
            self._size += len(message)

    def close(self) -> None:
        if self._fetch is not None:
            self._fetch.cancel()
