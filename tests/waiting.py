"""Waiting for something to become true in a test, with a bound and a clear failure."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def eventually(
    check: Callable[[], object],
    *,
    within: float,
    what: str,
    task: asyncio.Task[Any] | None = None,
    interval: float = 0.02,
) -> float:
    """Poll ``check`` (sync or async) until truthy; return how long it took.

    Fails after ``within`` seconds, or at once if ``task`` (the work under test) died.
    """
    start = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if task is not None and task.done():
            raise AssertionError(f"{what}: the task ended: {task.exception()!r}")
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(interval)


def until(
    check: Callable[[], object], *, within: float, what: str, interval: float = 0.01
) -> float:
    """eventually() for synchronous tests: poll ``check`` until truthy; return how long it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(interval)
    return time.monotonic() - start
