"""The ejection state machine (sidecar/ejection.py) on a fake clock."""

from __future__ import annotations

from sidecar.ejection import Ejector


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[Ejector, FakeClock]:
    clock = FakeClock()
    return Ejector(clock=clock), clock


def ident(p: str) -> str:
    return p


def test_a_connect_failure_ejects_at_once_for_30_seconds() -> None:
    ejector, clock = make()
    assert ejector.connect_failed("a")
    assert ejector.is_ejected("a")
    assert not ejector.connect_failed("a"), "already ejected: not counted twice"
    clock.now += 29.9
    assert ejector.is_ejected("a")
    clock.now += 0.2
    assert not ejector.is_ejected("a")
    assert ejector.ejection_count == 1


def test_five_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    ejector, _ = make()
    for _ in range(4):
        assert not ejector.failed("a")
    ejector.succeeded("a")
    for _ in range(4):
        assert not ejector.failed("a")
    assert not ejector.is_ejected("a")
    assert ejector.failed("a")
    assert ejector.is_ejected("a")


def test_ejection_time_grows_with_each_ejection_up_to_300_seconds() -> None:
    ejector, clock = make()
    durations = []
    for _ in range(12):
        ejector.connect_failed("a")
        start = clock.now
        while ejector.is_ejected("a"):
            clock.now += 1
        durations.append(clock.now - start)
    assert durations[:4] == [30, 60, 90, 120]
    assert durations[-1] == 300
    assert max(durations) == 300


def test_a_passing_probe_brings_a_peer_ejected_as_unreachable_back_early() -> None:
    ejector, clock = make()
    ejector.connect_failed("a")
    assert ejector.awaiting_probe() == ["a"]
    clock.now += 1
    ejector.probe_passed("a")
    assert not ejector.is_ejected("a")
    assert ejector.usable(["a", "b"], ident) == ["a", "b"]
    assert ejector.awaiting_probe() == []


def test_a_peer_ejected_for_failing_calls_serves_its_time_whatever_its_probe_says() -> None:
    """Its sidecar answers SERVING while its app hangs: a probe proves nothing."""
    ejector, clock = make()
    for _ in range(5):
        ejector.failed("a")
    assert ejector.is_ejected("a") and ejector.awaiting_probe() == []
    clock.now += 1
    ejector.probe_passed("a")
    assert ejector.is_ejected("a")
    clock.now += 29.1
    assert not ejector.is_ejected("a")
    # Unreachable next time: then a probe brings it back again.
    ejector.connect_failed("a")
    ejector.probe_passed("a")
    assert not ejector.is_ejected("a")


def eject_for_failures(ejector: Ejector, peer: str) -> None:
    for _ in range(5):
        ejector.failed(peer)
    assert ejector.is_ejected(peer)


def ejected_for(ejector: Ejector, clock: FakeClock, peer: str) -> float:
    start = clock.now
    while ejector.is_ejected(peer):
        clock.now += 1
    return clock.now - start


def test_unreachable_ejections_cut_short_do_not_lengthen_an_ejection_for_failing_calls() -> None:
    ejector, clock = make()
    for _ in range(9):  # an app that restarts now and then, back after a probe each time
        ejector.connect_failed("a")
        clock.now += 1
        ejector.probe_passed("a")
    eject_for_failures(ejector, "a")
    assert ejected_for(ejector, clock, "a") == 30


def test_the_multiplier_decays_while_the_peer_is_back_in_rotation() -> None:
    ejector, clock = make()
    for expected in (30, 60, 90):
        eject_for_failures(ejector, "a")
        assert ejected_for(ejector, clock, "a") == expected
    clock.now += 2 * 30  # healthy for two base periods: 3 ejections count as 1
    eject_for_failures(ejector, "a")
    assert ejected_for(ejector, clock, "a") == 60


def test_a_peer_failing_while_ejected_as_unreachable_no_longer_returns_on_a_probe() -> None:
    """It refused connections, then accepted them and hung (reached in panic mode)."""
    ejector, _ = make()
    ejector.connect_failed("a")
    for _ in range(5):
        assert not ejector.failed("a")
    assert ejector.awaiting_probe() == []
    ejector.probe_passed("a")
    assert ejector.is_ejected("a")


def test_ejected_peers_are_skipped_in_order() -> None:
    ejector, _ = make()
    ejector.connect_failed("b")
    assert ejector.usable(["a", "b", "c", "d"], ident) == ["a", "c", "d"]
    assert ejector.ejected() == ["b"]
    assert ejector.has_ejections()


def test_panic_mode_when_more_than_half_are_ejected() -> None:
    ejector, _ = make()
    ejector.connect_failed("a")
    ejector.connect_failed("b")
    # Exactly half ejected: still honoured.
    assert ejector.usable(["a", "b", "c", "d"], ident) == ["c", "d"]
    ejector.connect_failed("c")
    # More than half: ignore ejections rather than fail for sure.
    assert ejector.usable(["a", "b", "c", "d"], ident) == ["a", "b", "c", "d"]


def test_forget_drops_peers_that_left() -> None:
    ejector, _ = make()
    ejector.connect_failed("gone")
    ejector.forget({"a"})
    assert not ejector.is_ejected("gone")
    assert not ejector.has_ejections()
