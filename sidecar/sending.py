"""Sending a request stream upstream so that the upstream's own status reaches the caller.

grpc.aio's writer for a request iterator (and ``call.write()``) replaces a
call's status with INTERNAL "Internal error from Core" when a write fails
because the upstream has just ended the call (grpc/grpc#36066, unfixed in
grpcio 1.85). An app's early abort of a client stream, or an inbound
sidecar's ``ringmesh-not-processed`` answer, then reached the caller as
INTERNAL, one time in a few: the one status a proxy must never invent. So the
proxy writes the stream itself: a failed write only stops the writing, and
the status Core delivers for the call is the one passed on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

# A write that failed because the call ended is followed by the call's status
# at once. If none comes, Core refused the write outright: the call is marked
# INTERNAL, as grpc.aio marks it (its reader still waits for Core or the deadline).
_STATUS_AFTER_FAILED_WRITE = 1.0


def start_sending(
    call: grpc.aio.StreamStreamCall, requests: AsyncIterator[bytes]
) -> asyncio.Task[None]:
    """Write ``requests`` to ``call`` (made without a request iterator), then half-close.

    The caller cancels the returned task when it is done with the call.
    """
    return asyncio.get_running_loop().create_task(_send(call, requests))


async def _send(call: grpc.aio.StreamStreamCall, requests: AsyncIterator[bytes]) -> None:
    # Core's own write, under grpc.aio's (private; see the module docstring). Should
    # a grpcio release move it, ``call.write`` still works, with grpc.aio's flaw.
    core = getattr(call, "_cython_call", None)
    write = getattr(core, "send_serialized_message", None) or call.write
    try:
        await call.wait_for_connection()  # Core takes messages only after the headers
        async for message in requests:
            if call.done():
                return
            try:
                await write(message)
            except Exception as exc:  # a failed write: the call has ended
                await _settle(call, core, exc)
                return
        if not call.done():
            try:
                await call.done_writing()
            except Exception as exc:
                await _settle(call, core, exc)
    except grpc.aio.AioRpcError:
        return  # the call ended before its headers went out; its status says why
    except asyncio.CancelledError:
        if not call.done():
            call.cancel()
        raise
    except Exception:  # the caller's stream failed (it left): so does the call
        if not call.done():
            call.cancel()


async def _settle(call: grpc.aio.StreamStreamCall, core: Any, error: Exception) -> None:
    try:
        async with asyncio.timeout(_STATUS_AFTER_FAILED_WRITE):
            await call.code()
    except TimeoutError:
        if core is not None:
            core.set_internal_error(str(error))
        else:
            call.cancel()
