"""When a sidecar rewrites its load/ record, and what that does to the write rate and the scaler."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from registry.scaling import LoadReport, Policy
from scaler.leader import ScalerConfig
from scaler.policy import Recommender
from sidecar.load import (
    DEFAULT_THRESHOLDS,
    RewriteThresholds,
    Written,
    changed_fields,
    worth_writing,
)

BASE = LoadReport(ts=1000.0, window_s=1.0, rps=200.0, inflight=4.0, p50_ms=7.0, p99_ms=14.0)


def test_the_first_reading_is_always_written_and_an_unchanged_one_only_after_max_interval() -> None:
    assert worth_writing(BASE, None, now=0.0)
    written = Written(BASE, at=100.0)
    assert not worth_writing(replace(BASE, ts=1001.0), written, now=101.0)
    assert not worth_writing(BASE, written, now=129.9)
    assert worth_writing(BASE, written, now=130.0)


@pytest.mark.parametrize(
    ("change", "written"),
    [
        # 200 calls a window: 3 sd of its Poisson noise is 21% (42 rps), over the 10%
        ({"inflight": 4.8}, False),  # +20%
        ({"inflight": 4.9}, True),  # +22.5%
        ({"inflight": 3.1}, True),  # down counts the same
        ({"rps": 240.0}, False),  # +20%, but within 3 sd of a 200-call window's noise (42)
        ({"rps": 250.0}, True),
        ({"p99_ms": 20.0}, False),  # +43%: bucketed percentiles are noisy
        ({"p99_ms": 22.0}, True),
    ],
)
def test_the_scaled_field_is_written_once_it_moves_past_its_threshold(
    change: dict[str, float], written: bool
) -> None:
    (field,) = change
    assert (
        worth_writing(replace(BASE, **change), Written(BASE, 0.0), now=1.0, scaled_on=field)
        is written
    )


def test_only_the_field_the_policy_scales_on_writes_early() -> None:
    moved = replace(BASE, rps=400.0, inflight=8.0, p99_ms=50.0, p50_ms=30.0, error_rate=0.5)
    written = Written(BASE, 0.0)
    for field in ("rps", "inflight", "p99_ms"):
        steady = replace(moved, **{field: getattr(BASE, field)})
        assert not worth_writing(steady, written, now=1.0, scaled_on=field), field
        assert worth_writing(moved, written, now=1.0, scaled_on=field), field
    # No policy: rps, the field `ringmesh policy` defaults to.
    assert not worth_writing(replace(moved, rps=BASE.rps), written, now=1.0)
    # error_rate is for the changed_fields report (the bench), never a trigger by policy.
    assert changed_fields(BASE, replace(BASE, error_rate=0.02)) == ("error_rate",)
    assert changed_fields(BASE, replace(BASE, error_rate=0.009)) == ()  # the 1-point floor
    with pytest.raises(ValueError, match="no such load field"):
        changed_fields(BASE, moved, among=("ts",))


def test_in_flight_noise_is_capped_so_a_fall_to_idle_at_a_few_calls_is_written() -> None:
    # 5 calls a window: 3 sd would be 134%; the cap (50%) still sees 2 -> 0.3 in flight.
    few = LoadReport(ts=0.0, window_s=0.5, rps=10.0, inflight=2.0)
    assert worth_writing(
        replace(few, inflight=0.3), Written(few, 0.0), now=1.0, scaled_on="inflight"
    )
    assert not worth_writing(
        replace(few, inflight=1.2), Written(few, 0.0), now=1.0, scaled_on="inflight"
    )  # -40%


def test_floors_keep_an_idle_instance_quiet() -> None:
    idle = LoadReport(ts=0.0, window_s=1.0, rps=0.4, inflight=0.01, p99_ms=1.0)
    busier = replace(idle, rps=1.2, inflight=0.15, p99_ms=4.0)  # +200%, +1400%, +300%
    for field in ("rps", "inflight", "p99_ms"):
        assert not worth_writing(busier, Written(idle, 0.0), now=1.0, scaled_on=field)
    assert worth_writing(
        replace(busier, inflight=0.5), Written(idle, 0.0), now=1.0, scaled_on="inflight"
    )


def test_a_slow_drift_adds_up_against_the_record_in_etcd() -> None:
    written = Written(BASE, 0.0)
    steps = [replace(BASE, rps=200.0 * 1.06**i) for i in range(1, 5)]  # +6% a second
    decisions = [worth_writing(r, written, now=float(i)) for i, r in enumerate(steps, 1)]
    assert decisions == [False, False, False, True]  # +26% (52 rps) after 4 s


def test_thresholds_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="relative"):
        RewriteThresholds(relative=-0.1)


def test_the_scaler_does_not_count_an_unrewritten_record_as_missing() -> None:
    # A record is rewritten at least every max interval (plus a report interval):
    # the scaler's staleness rule must leave room for two of those.
    stale_after = ScalerConfig(scaler_id="s").stale_after
    assert stale_after >= 2 * DEFAULT_THRESHOLDS.max_interval_s + 2


# --- a fleet in one process ------------------------------------------------------------------

POLICY = Policy(
    min_replicas=1,
    max_replicas=1000,
    metric="inflight",
    target=4.0,
    scale_up_window_s=0.0,
    scale_down_window_s=0.0,
)
# Per-instance inflight as a multiple of the target, by phase: steady at the target,
# a surge (the step limit, 2x, binds), a drop. 0.2525 keeps ceil(ratio x n) away from
# an integer for n = 10 and 200: there even a scaler reading every report flips
# between neighbours on noise, with or without skipped writes.
PHASES = ((0.0, 1.0), (150.0, 3.0), (180.0, 0.2525))
DURATION = 210
STEADY = range(30, 150)  # steady, every first record long written: four max intervals


def _simulate(instances: int, seed: int = 7) -> tuple[float, list[int], list[int]]:
    """Every instance reports each second; return the steady phase's writes per instance
    per second, and the scaler's decisions every 2 s from what was written and from
    every reading."""
    rng = random.Random(seed)
    wall0 = 1_700_000_000.0
    stored: dict[str, LoadReport] = {}
    latest: dict[str, LoadReport] = {}
    written: dict[str, Written] = {}
    steady_writes = 0
    from_records, from_readings = Recommender(), Recommender()
    decided_records: list[int] = []
    decided_readings: list[int] = []
    stale_after = ScalerConfig(scaler_id="s").stale_after
    for second in range(1, DURATION + 1):
        now = float(second)
        ratio = [r for start, r in PHASES if start < now][-1]
        for i in range(instances):
            iid = f"i{i}"
            rps = rng.gauss(200.0, 200.0**0.5) * ratio  # Poisson-like count noise
            reading = LoadReport(
                ts=wall0 + now,
                window_s=1.0,
                rps=max(0.0, rps),
                inflight=max(0.0, rng.gauss(POLICY.target * ratio, 0.02 * POLICY.target * ratio)),
                p50_ms=7.0,
                p99_ms=max(0.0, rng.gauss(14.0, 2.5)),
            )
            latest[iid] = reading
            if worth_writing(reading, written.get(iid), now=now, scaled_on=POLICY.metric):
                written[iid] = Written(reading, now)
                stored[iid] = reading
                if second in STEADY:
                    steady_writes += 1
        if second % 2 == 0:
            for view, recommender, decided in (
                (stored, from_records, decided_records),
                (latest, from_readings, decided_readings),
            ):
                decision = recommender.evaluate(
                    "svc",
                    POLICY,
                    current=instances,
                    reports=dict(view),
                    now=wall0 + now + 0.5,
                    interval_s=2.0,
                    stale_after_s=stale_after,
                )
                decided.append(decision.replicas)
    return steady_writes / instances / len(STEADY), decided_records, decided_readings


@pytest.mark.parametrize("instances", [10, 200])
def test_writes_stay_bounded_as_instances_grow_and_decisions_do_not_change(
    instances: int,
) -> None:
    per_instance_s, from_records, from_readings = _simulate(instances)
    # Writing every reading would be 1 per instance per second; the max interval
    # alone gives 1/30. Noise past the thresholds adds a little, and not with n.
    max_interval_only = 1 / DEFAULT_THRESHOLDS.max_interval_s
    assert max_interval_only - 0.005 <= per_instance_s <= max_interval_only + 0.02, per_instance_s
    assert from_records == from_readings
    # The decisions are the HPA's: hold at the target, double on the surge, then drop.
    assert set(from_records[:74]) == {instances}  # decided every 2 s: index k at 2k + 2 s
    assert set(from_records[75:89]) == {2 * instances}
    assert from_records[-1] == -(-instances * 2525 // 10000)
