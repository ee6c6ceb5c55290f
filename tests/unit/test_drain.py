"""The drain rule on a fake clock: settle, then until quiet, within the grace."""

from __future__ import annotations

import asyncio

from sidecar.drain import QUIET, SETTLE, drain


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Plane:
    """Calls in progress and quiet time as functions of the fake clock."""

    def __init__(self, clock: FakeClock, *, busy_until: float, last_call: float) -> None:
        self.clock = clock
        self.busy_until = busy_until
        self.last_call = last_call

    def calls_in_progress(self) -> int:
        return 1 if self.clock.now < self.busy_until else 0

    def quiet_for(self) -> float:
        if self.calls_in_progress():
            return 0.0
        return self.clock.now - max(self.last_call, self.busy_until)


def run(plane: Plane, clock: FakeClock, grace: float) -> int:
    return asyncio.run(drain(plane, grace=grace, clock=clock, sleep=clock.sleep))


def test_an_idle_instance_drains_after_the_settle_time() -> None:
    clock = FakeClock()
    plane = Plane(clock, busy_until=0.0, last_call=0.0)
    assert run(plane, clock, grace=10.0) == 0
    assert clock.now == 100.0 + SETTLE


def test_the_drain_waits_for_calls_in_flight_and_then_a_quiet_period() -> None:
    clock = FakeClock()
    plane = Plane(clock, busy_until=102.0, last_call=101.0)
    assert run(plane, clock, grace=10.0) == 0
    assert 102.0 + QUIET <= clock.now < 102.0 + QUIET + 0.05


def test_the_grace_bounds_the_drain_and_says_what_was_left() -> None:
    clock = FakeClock()
    plane = Plane(clock, busy_until=1e9, last_call=0.0)
    assert run(plane, clock, grace=2.0) == 1
    assert clock.now == 102.0
    assert max(clock.slept) <= SETTLE


def test_a_zero_grace_does_not_wait() -> None:
    clock = FakeClock()
    plane = Plane(clock, busy_until=1e9, last_call=0.0)
    assert run(plane, clock, grace=0.0) == 1
    assert clock.now == 100.0
