"""start_sending (sidecar/sending.py): a request stream written so the upstream's status survives.

Against a real grpc.aio server on 127.0.0.1, in process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from sidecar.sending import start_sending

METHOD = "/t.T/Stream"
Handler = Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[bytes]]


async def abort_after_first(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for _ in requests:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no thanks", (("x-app", "kept"),))
    yield b""  # pragma: no cover - never reached


async def answer_after_first(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for message in requests:
        yield b"got " + message
        return


async def count_all(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    total = 0
    async for message in requests:
        total += len(message)
    yield str(total).encode()


def with_server(handler: Handler, scenario: Callable[[grpc.aio.Channel], Awaitable[None]]) -> None:
    async def run() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("t.T", {
                "Stream": grpc.stream_stream_rpc_method_handler(handler)
            }),)
        )  # fmt: skip
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await scenario(channel)
        finally:
            await server.stop(None)

    asyncio.run(run())


async def messages(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


async def outcome(call: Any) -> tuple[grpc.StatusCode, list[bytes], dict[str, Any]]:
    replies: list[bytes] = []
    try:
        async for reply in call:
            replies.append(reply)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), replies, dict(exc.trailing_metadata() or ())
    return await call.code(), replies, dict(await call.trailing_metadata() or ())


def test_an_abort_while_the_stream_is_still_being_written_reaches_the_caller() -> None:
    """grpc.aio's own writer turns some of these into INTERNAL "Internal error from Core"."""

    async def scenario(channel: grpc.aio.Channel) -> None:
        stream = channel.stream_stream(METHOD)
        codes = []
        for _ in range(40):
            call = stream(timeout=10)
            sender = start_sending(call, messages(20, 30_000))
            code, _, trailing = await outcome(call)
            await asyncio.wait({sender})
            codes.append(code)
            assert trailing.get("x-app") == "kept"
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 40, codes

    with_server(abort_after_first, scenario)


def test_an_early_answer_while_the_stream_is_still_being_written_is_kept() -> None:
    async def scenario(channel: grpc.aio.Channel) -> None:
        stream = channel.stream_stream(METHOD)
        for _ in range(20):
            call = stream(timeout=10)
            sender = start_sending(call, messages(20, 30_000))
            code, replies, _ = await outcome(call)
            sender.cancel()  # it may still be reading requests no one will take
            assert (code, replies) == (grpc.StatusCode.OK, [b"got " + b"x" * 30_000])

    with_server(answer_after_first, scenario)


def test_every_message_is_sent_and_the_stream_half_closed() -> None:
    async def scenario(channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(METHOD)(timeout=10)
        sender = start_sending(call, messages(50, 1000))
        assert await outcome(call) == (grpc.StatusCode.OK, [b"50000"], {})
        await sender
        assert sender.exception() is None

    with_server(count_all, scenario)


def test_a_failing_request_stream_cancels_the_call() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"one"
        raise ConnectionError("the caller left")

    async def scenario(channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(METHOD)(timeout=10)
        sender = start_sending(call, broken())
        await asyncio.wait({sender})
        assert sender.exception() is None, "the sender never fails with the caller's error"
        assert call.cancelled()

    with_server(count_all, scenario)


def test_cancelling_the_sender_cancels_an_unfinished_call() -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0.01)
            yield b"tick"

    async def scenario(channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(METHOD)(timeout=10)
        sender = start_sending(call, endless())
        await asyncio.sleep(0.1)
        sender.cancel()
        await asyncio.wait({sender})
        assert call.cancelled()

    with_server(count_all, scenario)
