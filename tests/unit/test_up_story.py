"""The pure parts of `ringmesh up`: Zipf keys, events from readings, the summary's text."""

from __future__ import annotations

import io
import random
from collections import Counter
from typing import Any

import pytest
from rich.console import Console

from registry.scaling import Target
from ringmesh.loadgen import KEYED, UNKEYED, Tally, ZipfKeys
from ringmesh.observe import InstanceRow, MeshObserver, Reading, ServiceRow
from ringmesh.story import summary_text
from ringmesh.view import render


def test_zipf_keys_rank_by_popularity_within_the_range() -> None:
    keys = ZipfKeys(100, 1.0, random.Random(7))
    drawn = Counter(keys.draw() for _ in range(20_000))
    assert set(drawn) <= set(range(100))
    # P(rank 0) / P(rank 9) = 10 for s = 1: allow sampling noise, not a different law.
    assert 7 < drawn[0] / drawn[9] < 14
    assert drawn[0] > drawn[1] > drawn[4] > drawn[50]


@pytest.mark.parametrize(("n", "s"), [(0, 1.0), (10, 0.0), (10, -1.0)])
def test_zipf_keys_refuse_nonsense(n: int, s: float) -> None:
    with pytest.raises(ValueError):
        ZipfKeys(n, s, random.Random(1))


def test_a_hit_rate_counts_answered_gets_only() -> None:
    tally = Tally()
    assert tally.hit_rate("cache-1") is None and tally.modes[KEYED].hit_rate == 0.0
    tally.gets["cache-1"] = 4
    tally.hits["cache-1"] = 3
    assert tally.hit_rate("cache-1") == 0.75


def _row(id_: str, state: str = "serving") -> InstanceRow:
    return InstanceRow(id_, state, 0.5, None, None, None, None, None)


def _target(replicas: int, previous: int, reason: str = "rps 90 > target 40") -> Target:
    return Target(replicas, previous, reason, 90.0, 1.0, 3, "scaler-a")


def _reading(
    rows: list[InstanceRow], target: Target | None, leader: str | None, **kw: Any
) -> Reading:
    service = ServiceRow("cache", tuple(rows), target)
    return Reading(
        at_s=0.0,
        services={"cache": service},
        leader=leader,
        term=3,
        ejections=kw.get("ejections", 0),
    )


def _observer() -> MeshObserver:
    return MeshObserver(client=None, layout=None, tally=Tally(), stats=dict)  # type: ignore[arg-type]


def test_events_say_what_changed_between_two_readings() -> None:
    observer = _observer()
    observer.update(_reading([_row("cache-1")], _target(2, 0, "min"), "scaler-a"))
    first = [(e.kind, e.text) for e in observer.events]
    assert ("leader", "scaler-a leads the scalers (term 3)") in first
    assert ("registered", "cache-1 registered") in first
    observer.events.clear()
    observer.tally.failovers = 4
    observer.update(
        _reading(
            [_row("cache-1", "draining"), _row("cache-2")], _target(5, 2), "scaler-b", ejections=1
        )
    )
    kinds = {e.kind: e.text for e in observer.events}
    assert kinds["registered"] == "cache-2 registered"
    assert kinds["draining"] == "cache-1 is draining"
    assert kinds["scale-out"] == "cache: 2 -> 5 replicas (rps 90 > target 40)"
    assert kinds["leader"] == "scaler-b leads the scalers (term 3)"
    assert kinds["ejection"] == "the client's sidecar ejected 1 peer(s)"
    assert kinds["failover"] == "4 call(s) answered by the next instance on the ring"
    observer.events.clear()
    observer.update(_reading([_row("cache-2")], _target(2, 5, "rps 12 < target 40"), None))
    kinds = {e.kind: e.text for e in observer.events}
    assert kinds == {
        "gone": "cache-1 deregistered",
        "scale-in": "cache: 5 -> 2 replicas (rps 12 < target 40)",
        "leader": "scaler-b stopped leading; no scaler leads",
    }
    # The same leader back after a gap is not a change of leader.
    observer.update(_reading([_row("cache-2")], _target(2, 5), "scaler-b"))
    assert [e.text for e in observer.leaders] == [
        "scaler-a leads the scalers (term 3)",
        "scaler-b leads the scalers (term 3)",
    ]


def test_an_unchanged_reading_makes_no_event() -> None:
    observer = _observer()
    reading = _reading([_row("cache-1")], _target(2, 0), "scaler-a")
    observer.update(reading)
    count = len(observer.events)
    observer.update(reading)
    assert len(observer.events) == count


def test_summary_text_names_the_failed_step() -> None:
    doc = {
        "ok": False,
        "failed_step": "failover",
        "duration_s": 61.2,
        "calls": {"total": 10, "failed": 1},
        "failovers": 0,
        "hit_rate": {KEYED: 0.5, UNKEYED: 0.25},
        "scale_events": [{"kind": "scale-out", "at_s": 10.0, "text": "cache: 2 -> 5"}],
        "leader_changes": [],
        "steps": [
            {"name": "scale-out", "ok": True, "took_s": 3.0, "detail": "2 -> 5"},
            {"name": "failover", "ok": False, "took_s": 45.0, "detail": "1 call(s) failed"},
        ],
    }
    text = summary_text(doc)
    assert text.splitlines()[0] == "story FAILED at step 'failover' in 61 s"
    assert "hit rate: keyed 50.0%, unkeyed 25.0%" in text
    assert "FAIL failover" in text and "ok   scale-out" in text


def test_the_instance_table_fits_an_80_column_terminal_uncut() -> None:
    # A column too many once cut every cell to "cache…", so the instances could not be told
    # apart on a default-sized terminal.
    rows = tuple(
        InstanceRow(f"cache-{i}", state, 0.46, 125.0, 12.1, 114.4, 0.01, 0.49, 25.0)
        for i, state in enumerate(["serving", "draining", "serving", "serving", "serving"], 1)
    )
    observer = MeshObserver(client=None, layout=None, tally=Tally(), stats=dict)  # type: ignore[arg-type]
    observer.reading = Reading(1.0, {"cache": ServiceRow("cache", rows, None)}, "scaler-a", 3, 0)
    out = io.StringIO()
    Console(file=out, width=80).print(render(observer, "scale-out"))
    text = out.getvalue()
    assert "…" not in text, text
    for header in ("instance", "state", "ring", "calls/s", "in-flight", "p99", "errors", "age"):
        assert header in text
    for i in range(1, 6):
        assert f"cache-{i} " in text
    assert "draining" in text and "114.4 ms" in text and "25 s" in text
