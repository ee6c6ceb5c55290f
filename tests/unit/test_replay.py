"""RequestReplay (sidecar/replay.py): a request stream read once, replayed per attempt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.replay import RequestReplay


async def source(messages: list[bytes], gate: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    for i, message in enumerate(messages):
        if gate is not None and i == len(messages) - 1:
            await gate.wait()  # the caller is slow to send its last message
        yield message


async def drain(iterator: AsyncIterator[bytes]) -> list[bytes]:
    return [m async for m in iterator]


def test_each_attempt_sees_the_whole_stream() -> None:
    async def scenario() -> None:
        replay = RequestReplay(source([b"a", b"b", b"c"]), limit=1024)
        first = replay.attempt()
        assert await first.__anext__() == b"a"  # attempt 1 fails after one message
        assert replay.replayable
        assert await drain(replay.attempt()) == [b"a", b"b", b"c"]

    asyncio.run(scenario())


def test_no_attempt_after_the_first_response() -> None:
    async def scenario() -> None:
        replay = RequestReplay(source([b"a", b"b"]), limit=1024)
        assert await drain(replay.attempt()) == [b"a", b"b"]
        replay.commit()
        assert not replay.replayable
        with pytest.raises(RuntimeError):
            replay.attempt()

    asyncio.run(scenario())


def test_more_than_the_limit_buffered_is_not_replayable_but_still_streams() -> None:
    async def scenario() -> None:
        chunks = [b"x" * 40_000 for _ in range(4)]  # 160 KB > 64 KiB
        replay = RequestReplay(source(chunks), limit=64 * 1024)
        assert await drain(replay.attempt()) == chunks
        assert not replay.replayable

    asyncio.run(scenario())


def test_a_cancelled_attempt_leaves_the_stream_intact() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        replay = RequestReplay(source([b"a", b"b", b"c"], gate), limit=1024)
        first = asyncio.ensure_future(drain(replay.attempt()))
        await asyncio.sleep(0.01)  # attempt 1 waits for the caller's last message
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        assert await drain(replay.attempt()) == [b"a", b"b", b"c"]

    asyncio.run(scenario())


def test_an_error_from_the_caller_reaches_the_attempt() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"a"
        raise ValueError("caller went away")

    async def scenario() -> None:
        replay = RequestReplay(broken(), limit=1024)
        with pytest.raises(ValueError, match="caller went away"):
            await drain(replay.attempt())

    asyncio.run(scenario())


def test_an_ended_attempts_reader_takes_nothing_from_the_next_attempt() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        replay = RequestReplay(source([b"a", b"b", b"c"], gate), limit=1024)
        first = replay.attempt()
        assert await first.__anext__() == b"a"
        assert await first.__anext__() == b"b"
        # Attempt 1 ended, but gRPC left its reader waiting for the next message.
        stale = asyncio.ensure_future(first.__anext__())
        await asyncio.sleep(0)
        second = replay.attempt()
        assert [await second.__anext__(), await second.__anext__()] == [b"a", b"b"]
        replay.commit()  # attempt 2 got its first response
        gate.set()
        with pytest.raises(StopAsyncIteration):
            await stale
        assert await drain(second) == [b"c"]

    asyncio.run(scenario())


def test_drain_reads_until_the_caller_has_sent_everything() -> None:
    async def scenario() -> None:
        replay = RequestReplay(source([b"a", b"b", b"c"]), limit=1024)
        await replay.drain(within=1.0)
        assert await drain(replay.attempt()) == [b"a", b"b", b"c"]

    asyncio.run(scenario())


def test_drain_is_bounded_in_time_and_in_bytes() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()  # a caller that never sends its last message
        slow = RequestReplay(source([b"a", b"b", b"c"], gate), limit=1024)
        await asyncio.wait_for(slow.drain(within=0.05), 1.0)
        big = RequestReplay(source([b"x" * 600 for _ in range(100)]), limit=1024)
        await big.drain(within=5.0)
        assert not big.replayable  # stopped just past the limit, not at the 100th message
        gate.set()

    asyncio.run(scenario())
