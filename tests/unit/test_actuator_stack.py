"""LocalActuator's bookkeeping (scaler/actuators.py) with a launcher that only records."""

from __future__ import annotations

import asyncio

from scaler.actuators import LocalActuator


class RecordingLauncher:
    """Starts nothing: keeps which instances run, as a real launcher's processes would."""

    def __init__(self) -> None:
        self.running: set[int] = set()

    def start(self, service: str, index: int) -> int:
        self.running.add(index)
        return index

    async def stop(self, handle: int) -> None:
        await asyncio.sleep(0.05)  # a drain takes a while
        self.running.discard(handle)


def test_instances_leaving_when_an_apply_is_cancelled_are_stopped_on_close() -> None:
    async def scenario() -> None:
        launcher = RecordingLauncher()
        actuator = LocalActuator(launcher, alive=lambda handle: handle in launcher.running)
        await actuator.apply("s", 5)
        scale_down = asyncio.create_task(actuator.apply("s", 1))
        await asyncio.sleep(0)  # the stops have begun...
        scale_down.cancel()  # ...when the scaler is cancelled (a crash, a SIGKILLed parent task)
        await asyncio.gather(scale_down, return_exceptions=True)
        assert actuator.replicas("s") == 1
        await actuator.aclose()
        assert launcher.running == set(), "no instance outlives the actuator"

    asyncio.run(scenario())


def test_scale_down_stops_the_newest_and_keeps_the_oldest() -> None:
    async def scenario() -> None:
        launcher = RecordingLauncher()
        actuator = LocalActuator(launcher, alive=lambda handle: handle in launcher.running)
        await actuator.apply("s", 4)
        await actuator.apply("s", 2)
        assert launcher.running == {1, 2}
        await actuator.aclose()
        assert launcher.running == set()

    asyncio.run(scenario())
