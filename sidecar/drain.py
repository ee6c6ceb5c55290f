"""The drain (SIGTERM): how long a stopping sidecar keeps serving.

Peers learn of the drain through their watch within milliseconds; calls they
sent before that still arrive and are served. The drain ends once nothing is
in flight and no call has arrived for a while (a peer whose watch lags on a
busy machine may still be sending), or when the grace runs out. Time is
injected: ``clock`` and ``sleep`` come from the caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

SETTLE = 0.3  # seconds for peers' watches to see "draining"
QUIET = 0.2  # ... and then no new call for this long
POLL = 0.02


class Draining(Protocol):
    def calls_in_progress(self) -> int: ...
    def quiet_for(self) -> float: ...


def finished(plane: Draining) -> bool:
    """Nothing in flight, and no call arrived for QUIET seconds."""
    return plane.calls_in_progress() == 0 and plane.quiet_for() >= QUIET


async def drain(
    plane: Draining,
    *,
    grace: float,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
) -> int:
    """Wait until the drain is over; the calls still in progress then (0 normally)."""
    deadline = clock() + grace
    await sleep(min(SETTLE, grace))
    while not finished(plane):
        left = deadline - clock()
        if left <= 0:
            break
        await sleep(min(POLL, left))
    return plane.calls_in_progress()
