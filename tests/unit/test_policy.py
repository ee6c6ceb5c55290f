"""scaler/policy.py (HPA maths), scaler/forecast.py (Holt) and scaler/budget.py (global budget).

Every expected count below is worked out by hand from the HPA algorithm; the
comments show the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.errors import ConfigError
from registry.scaling import INFLIGHT, P99_MS, PREDICTIVE, REACTIVE, RPS, LoadReport, Policy
from scaler.budget import Allocation, BudgetRequest, allocate
from scaler.forecast import HoltForecaster
from scaler.policy import (
    DEFAULT_STALE_AFTER_S,
    Decision,
    Recommender,
    read_metric,
    replica_count,
    stabilize,
    step_limits,
)

NOW = 1_000_000.0
INTERVAL = 2.0


def policy(
    *,
    target: float = 10.0,
    min_replicas: int = 1,
    max_replicas: int = 100,
    metric: str = INFLIGHT,
    tolerance: float = 0.1,
    up: float = 0.0,
    down: float = 0.0,
    mode: str = REACTIVE,
) -> Policy:
    return Policy(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        metric=metric,
        target=target,
        tolerance=tolerance,
        scale_up_window_s=up,
        scale_down_window_s=down,
        mode=mode,
    )


def loads(*values: float | None, ts: float = NOW) -> dict[str, LoadReport | None]:
    """One instance per value; None is an instance without a report."""
    return {
        f"i{n}": None if v is None else LoadReport(ts=ts, inflight=v, rps=v, p99_ms=v)
        for n, v in enumerate(values)
    }


def decide(
    p: Policy,
    current: int,
    reports: Mapping[str, LoadReport | None],
    *,
    now: float = NOW,
    recommender: Recommender | None = None,
    service: str = "svc",
) -> Decision:
    r = recommender if recommender is not None else Recommender()
    return r.evaluate(service, p, current=current, reports=reports, now=now, interval_s=INTERVAL)


# -- the HPA formula -------------------------------------------------------------------


def test_scale_up_is_ceil_of_current_times_ratio() -> None:
    # 3 x 10 / 5 = 6
    d = decide(policy(target=5), 3, loads(10, 10, 10))
    assert (d.replicas, d.previous, d.recommendation, d.metric) == (6, 3, 6, 10.0)
    assert d.changed


def test_reason_reads_like_the_contract_example() -> None:
    # 2 x 12.5 / 5 = 5
    d = decide(policy(target=5), 2, loads(12.5, 12.5))
    assert d.reason == "inflight 12.5 > target 5 (x2.50): 2 -> 5"


def test_uneven_instances_use_the_average() -> None:
    # average (2 + 10 + 18) / 3 = 10; 3 x 10 / 5 = 6
    assert decide(policy(target=5), 3, loads(2, 10, 18)).replicas == 6


@pytest.mark.parametrize("metric", [INFLIGHT, RPS, P99_MS])
def test_each_metric_reads_its_own_field(metric: str) -> None:
    report = LoadReport(ts=NOW, inflight=20.0, rps=40.0, p99_ms=80.0)
    reading = {INFLIGHT: 20.0, RPS: 40.0, P99_MS: 80.0}[metric]
    d = decide(policy(target=10, metric=metric), 2, {"a": report, "b": report})
    assert d.metric == reading
    assert d.replicas == min(math.ceil(2 * reading / 10), 6)  # step limit max(4, 2 + 4)
    assert d.reason.startswith(f"{metric} {reading:g} > target 10")


def test_scale_down() -> None:
    # 10 x 2 / 5 = 4 (no scale-down window)
    d = decide(policy(target=5), 10, loads(*[2.0] * 10))
    assert d.replicas == 4
    assert d.reason == "inflight 2 < target 5 (x0.40): 10 -> 4"


@pytest.mark.parametrize("metric_value", [5.4, 4.6, 5.5, 4.5, 5.0])
def test_within_tolerance_keeps_current(metric_value: float) -> None:
    # |5.4 / 5 - 1| = 0.08 <= 0.1; 5.5 and 4.5 sit on the boundary, which is within
    d = decide(policy(target=5), 3, loads(metric_value, metric_value, metric_value))
    assert d.replicas == 3
    assert d.recommendation == 3
    assert "within 10% of target 5" in d.reason


@pytest.mark.parametrize(("metric_value", "expected"), [(5.6, 4), (4.4, 3)])
def test_just_outside_tolerance_scales(metric_value: float, expected: int) -> None:
    # ceil(3 x 1.12) = 4; ceil(3 x 0.88) = 3 (no change, but as a recommendation)
    assert decide(policy(target=5), 3, loads(*[metric_value] * 3)).replicas == expected


def test_zero_tolerance_scales_on_any_difference() -> None:
    # ceil(4 x 5.1 / 5) = ceil(4.08) = 5
    assert decide(policy(target=5, tolerance=0.0), 4, loads(*[5.1] * 4)).replicas == 5


def test_float_noise_does_not_add_a_replica() -> None:
    # 3 x (0.2 / 0.1) is 6.000000000000002 in floats: still 6, not 7
    assert decide(policy(target=0.1), 3, loads(0.2, 0.2, 0.2)).replicas == 6


# -- step limits and bounds --------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "expected"), [(0, (0, 4)), (2, (0, 6)), (4, (0, 8)), (10, (0, 20))]
)
def test_step_limits(current: int, expected: tuple[int, int]) -> None:
    assert step_limits(current) == expected


def test_scale_up_is_limited_to_max_of_double_and_plus_four() -> None:
    # wanted 2 x 100 / 10 = 20; allowed max(2 x 2, 2 + 4) = 6
    d = decide(policy(target=10), 2, loads(100, 100))
    assert (d.replicas, d.recommendation) == (6, 20)
    assert d.reason.endswith("2 -> 6; limited by scale-up step limit 6")


def test_scale_up_doubles_when_that_is_more_than_plus_four() -> None:
    # wanted 10 x 5 = 50; allowed max(20, 14) = 20
    assert decide(policy(target=10), 10, loads(*[50.0] * 10)).replicas == 20


def test_scale_down_may_go_all_the_way_to_min() -> None:
    # no load: wanted 0; the -100% step allows 0; min_replicas 2 holds
    d = decide(policy(min_replicas=2), 8, loads(*[0.0] * 8))
    assert (d.replicas, d.recommendation) == (2, 0)
    assert d.reason.endswith("8 -> 2; limited by min_replicas 2")


def test_scale_down_to_zero_when_min_is_zero() -> None:
    assert decide(policy(min_replicas=0), 3, loads(0, 0, 0)).replicas == 0


def test_max_replicas_clamps() -> None:
    # wanted 5 x 4 = 20; step allows 10; max 8
    d = decide(policy(max_replicas=8), 5, loads(*[40.0] * 5))
    assert d.replicas == 8
    assert d.reason.endswith("limited by max_replicas 8")


def test_current_above_max_goes_to_max_whatever_the_load() -> None:
    d = decide(policy(max_replicas=4), 9, loads(*[100.0] * 9))
    assert d.replicas == 4
    assert d.reason == "9 replicas above max_replicas 4: 9 -> 4"


def test_current_zero_with_min_goes_to_min_without_reports() -> None:
    d = decide(policy(min_replicas=3), 0, {})
    assert (d.replicas, d.previous, d.metric) == (3, 0, None)
    assert d.reason == "0 replicas below min_replicas 3: 0 -> 3"


def test_current_zero_with_min_zero_stays_at_zero() -> None:
    d = decide(policy(min_replicas=0), 0, {})
    assert d.replicas == 0
    assert d.reason.startswith("no fresh load report")


def test_negative_current_is_a_bug() -> None:
    with pytest.raises(ValueError, match="current"):
        decide(policy(), -1, {})


# -- missing reports, as the HPA treats them ----------------------------------------


def test_missing_on_scale_up_count_as_zero() -> None:
    # reporting: 20, 20, 20 (ratio 2, scale up); the missing one counts as 0:
    # average 60 / 4 = 15, ratio 1.5, ceil(1.5 x 4) = 6 (not 4 x 2 = 8)
    d = decide(policy(target=10), 4, loads(20, 20, 20, None))
    assert d.replicas == 6
    assert "1 of 4 instances without a fresh report" in d.reason


def test_missing_on_scale_down_count_as_the_target() -> None:
    # reporting: 2, 2, 2 (ratio 0.2, scale down); the missing one counts as 10:
    # average 16 / 4 = 4, ratio 0.4, ceil(0.4 x 4) = 2 (not ceil(4 x 0.2) = 1)
    assert decide(policy(target=10), 4, loads(2, 2, 2, None)).replicas == 2


def test_missing_that_flip_the_direction_hold_current() -> None:
    # one report at 12 (ratio 1.2, up); three missing as 0: average 3, ratio 0.3 (down)
    d = decide(policy(target=10), 4, loads(12, None, None, None))
    assert (d.replicas, d.recommendation) == (4, 4)
    assert "3 of 4 instances without a fresh report, counting them as 0 holds 4" in d.reason


def test_missing_that_bring_the_ratio_within_tolerance_hold_current() -> None:
    # one report at 21 (ratio 2.1, up); one missing as 0: average 10.5, ratio 1.05
    assert decide(policy(target=10), 2, loads(21, None)).replicas == 2


def test_pure_replica_count_matches_the_hpa() -> None:
    assert replica_count((20.0, 20.0, 20.0), missing=1, current=4, target=10, tolerance=0.1) == (
        6,
        "",
    )
    count, held = replica_count((12.0,), missing=3, current=4, target=10, tolerance=0.1)
    assert (count, held) == (4, "counting them as 0 holds 4")


def test_stale_reports_are_missing() -> None:
    fresh = LoadReport(ts=NOW - DEFAULT_STALE_AFTER_S, inflight=20.0)  # exactly at the limit
    stale = LoadReport(ts=NOW - DEFAULT_STALE_AFTER_S - 0.5, inflight=20.0)
    readings = read_metric({"a": fresh, "b": stale}, metric=INFLIGHT, current=2, now=NOW)
    assert (readings.values, readings.missing) == ((20.0,), 1)
    # up: ratio 2; stale one as 0: average 10, ratio 1.0: hold
    assert decide(policy(target=10), 2, {"a": fresh, "b": stale}).replicas == 2
    # without the stale one it would have been 4
    assert decide(policy(target=10), 2, {"a": fresh, "b": fresh}).replicas == 4


def test_expected_replicas_not_yet_registered_are_missing() -> None:
    # current 4 but only two registered, both at 30 (ratio 3): two missing as 0,
    # average 15, ratio 1.5, ceil(1.5 x 4) = 6 (not 4 x 3 = 12)
    d = decide(policy(target=10), 4, loads(30, 30))
    assert d.replicas == 6
    assert "2 of 4 instances without a fresh report" in d.reason


def test_no_report_at_all_keeps_current_and_remembers_nothing() -> None:
    r = Recommender()
    d = decide(policy(target=10), 3, loads(None, None, None), recommender=r)
    assert (d.replicas, d.metric, d.recommendation) == (3, None, None)
    assert d.reason == "no fresh load report from any of 3 instances: keeping 3"
    assert r.history("svc") == ()
    stale = loads(50, 50, ts=NOW - DEFAULT_STALE_AFTER_S - 1)
    assert decide(policy(target=10), 2, stale, recommender=r).replicas == 2


# -- stabilization windows ---------------------------------------------------------


def test_scale_down_takes_the_highest_recommendation_of_its_window() -> None:
    r = Recommender()
    p = policy(target=10, down=300)

    def step(t: float, current: int, per_instance: float) -> Decision:
        return decide(
            p, current, loads(*[per_instance] * current, ts=NOW + t), now=NOW + t, recommender=r
        )

    assert step(0, 4, 20).replicas == 8  # 4 x 2
    assert step(30, 8, 12).replicas == 10  # ceil(8 x 1.2) = 10
    held = step(60, 10, 3)  # recommends 3; the window holds 10
    assert (held.replicas, held.recommendation) == (10, 3)
    assert held.reason.endswith("10 -> 10; the 300 s scale-down window holds 10 (recommended 3)")
    assert step(90, 10, 7).replicas == 10  # recommends 7, still held at 10
    # t=330: the 10 of t=30 is exactly 300 s old, out; highest left: 7 (t=90)
    assert step(330, 10, 3).replicas == 7
    # t=390: the 7 of t=90 is out; 3 (t=330) and ceil(7 x 0.4) = 3 now
    assert step(390, 7, 4).replicas == 3


def test_scale_down_waits_the_whole_window_then_goes() -> None:
    r = Recommender()
    p = policy(target=10, down=300)
    assert decide(p, 4, loads(*[10.0] * 4), now=NOW, recommender=r).replicas == 4
    for t in (60.0, 120.0, 299.9):
        assert decide(p, 4, loads(*[2.0] * 4, ts=NOW + t), now=NOW + t, recommender=r).replicas == 4
    # the 4 of t=0 has left the window: ceil(4 x 0.2) = 1
    assert decide(p, 4, loads(*[2.0] * 4, ts=NOW + 300), now=NOW + 300, recommender=r).replicas == 1


def test_default_windows_are_the_hpa_defaults() -> None:
    p = Policy(min_replicas=1, max_replicas=20, metric=INFLIGHT, target=10)
    assert (p.scale_up_window_s, p.scale_down_window_s, p.tolerance) == (0.0, 300.0, 0.1)
    r = Recommender()
    assert decide(p, 2, loads(20, 20), recommender=r).replicas == 4  # up at once
    assert (
        decide(p, 4, loads(1, 1, 1, 1, ts=NOW + 10), now=NOW + 10, recommender=r).replicas == 4
    )  # held
    # scale-up window 0: only the current recommendation counts, so up again at once
    assert (
        decide(p, 4, loads(30, 30, 30, 30, ts=NOW + 20), now=NOW + 20, recommender=r).replicas == 8
    )


def test_scale_up_takes_the_lowest_recommendation_of_its_window() -> None:
    r = Recommender()
    p = policy(target=10, up=60)
    assert decide(p, 2, loads(20, 20), now=NOW, recommender=r).replicas == 4
    held = decide(p, 4, loads(*[30.0] * 4, ts=NOW + 30), now=NOW + 30, recommender=r)
    assert (held.replicas, held.recommendation) == (4, 12)
    assert held.reason.endswith("the 60 s scale-up window holds 4 (recommended 12)")
    # t=60: the 4 of t=0 is out; 12 (t=30) and 12 now; step limit max(8, 8)
    assert decide(p, 4, loads(*[30.0] * 4, ts=NOW + 60), now=NOW + 60, recommender=r).replicas == 8


def test_history_is_pruned_to_the_longest_window() -> None:
    r = Recommender()
    p = policy(target=10, up=10, down=100)
    for t in range(0, 1000, 5):
        decide(p, 4, loads(*[10.0] * 4, ts=NOW + t), now=NOW + t, recommender=r)
    stamps = [ts for ts, _ in r.history("svc")]
    assert stamps[0] > NOW + 995 - 100
    assert len(stamps) == 20


def test_services_have_separate_memories_and_forget() -> None:
    r = Recommender()
    p = policy(target=10, down=300)
    decide(p, 4, loads(*[20.0] * 4), recommender=r, service="a")
    assert (
        decide(
            p, 8, loads(*[2.0] * 8, ts=NOW + 1), now=NOW + 1, recommender=r, service="b"
        ).replicas
        == 2
    )
    assert (
        decide(
            p, 8, loads(*[2.0] * 8, ts=NOW + 1), now=NOW + 1, recommender=r, service="a"
        ).replicas
        == 8
    )
    r.forget("a")
    assert r.history("a") == ()
    assert (
        decide(
            p, 8, loads(*[2.0] * 8, ts=NOW + 2), now=NOW + 2, recommender=r, service="a"
        ).replicas
        == 2
    )


def test_seeded_history_holds_a_new_leaders_first_scale_down() -> None:
    r = Recommender()
    r.remember("svc", NOW - 100, 8)  # the previous leader's target, 100 s ago
    p = policy(target=10, down=300)
    assert decide(p, 8, loads(*[2.0] * 8), recommender=r).replicas == 8
    assert decide(p, 8, loads(*[2.0] * 8, ts=NOW + 200), now=NOW + 200, recommender=r).replicas == 2


def test_stabilize_is_a_clamp_of_current() -> None:
    history = [(0.0, 9), (50.0, 3), (90.0, 6)]

    def at_100(current: int, recommendation: int) -> int:
        return stabilize(
            current=current,
            recommendation=recommendation,
            history=history,
            now=100.0,
            up_window_s=20.0,
            down_window_s=60.0,
        )

    # down window (40, 100]: 3, 6 and the new one; up window (80, 100]: 6 and the new one
    assert at_100(8, 2) == 6
    assert at_100(4, 2) == 4
    assert at_100(4, 12) == 6
    assert at_100(7, 12) == 7


# -- properties ----------------------------------------------------------------------

policies = st.builds(
    policy,
    target=st.floats(min_value=0.01, max_value=1000),
    min_replicas=st.integers(0, 10),
    max_replicas=st.integers(10, 60),
    tolerance=st.sampled_from([0.0, 0.05, 0.1, 0.5]),
    up=st.sampled_from([0.0, 10.0, 60.0]),
    down=st.sampled_from([0.0, 30.0, 300.0]),
    mode=st.sampled_from([REACTIVE, PREDICTIVE]),
)
readings = st.lists(st.none() | st.floats(min_value=0, max_value=1e6), max_size=12)
rounds = st.lists(st.tuples(st.floats(0.1, 120), readings), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(policies, st.integers(0, 70), rounds)
def test_every_decision_respects_bounds_steps_and_direction(
    p: Policy, start: int, steps: Sequence[tuple[float, list[float | None]]]
) -> None:
    r = Recommender()
    current, now = start, NOW
    for dt, values in steps:
        now += dt
        d = r.evaluate(
            "svc", p, current=current, reports=loads(*values, ts=now), now=now, interval_s=2
        )
        assert p.min_replicas <= d.replicas <= p.max_replicas
        assert d.previous == current
        if p.min_replicas <= current <= p.max_replicas:
            assert d.replicas <= max(2 * current, current + 4)
            if d.recommendation is None:
                assert d.replicas == current
            else:  # between where it was and what was recommended
                low, high = sorted((current, d.recommendation))
                assert low <= d.replicas <= high
        current = d.replicas


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 50), st.floats(0.01, 100), st.floats(0, 1000), st.sampled_from([0.0, 0.1]))
def test_full_reports_match_the_formula(
    current: int, target: float, per_instance: float, tolerance: float
) -> None:
    p = policy(target=target, tolerance=tolerance, min_replicas=0, max_replicas=10_000)
    d = decide(p, current, loads(*[per_instance] * current))
    ratio = Fraction(per_instance) / Fraction(target)
    if abs(ratio - 1) <= Fraction(tolerance) or abs(float(ratio) - 1) <= tolerance + 1e-9:
        assert d.replicas == current
    else:
        exact = math.ceil(ratio * current)
        assert d.recommendation is not None
        assert abs(d.recommendation - min(exact, 10_000)) <= 1  # float rounding at most
        up = max(2 * current, current + 4)
        assert d.replicas == min(d.recommendation, up)


# -- predictive mode ---------------------------------------------------------------


def run_ramp(mode: str, load: Sequence[float], *, start: int = 2) -> list[int]:
    """Simulate: the total load is spread over ``current`` instances, which follow the target."""
    r = Recommender()
    p = policy(target=10, mode=mode, min_replicas=1, max_replicas=50, down=300)
    current, out = start, []
    for step, total in enumerate(load):
        now = NOW + step * INTERVAL
        d = r.evaluate(
            "svc",
            p,
            current=current,
            reports=loads(*[total / current] * current, ts=now),
            now=now,
            interval_s=INTERVAL,
        )
        current = d.replicas
        out.append(current)
    return out


def first_change(replicas: list[int], start: int) -> int:
    return next(i for i, n in enumerate(replicas) if n != start)


def test_predictive_scales_up_earlier_on_a_ramp() -> None:
    ramp = [20.0 + 0.5 * step for step in range(40)]  # +0.5 in flight every 2 s
    reactive = run_ramp(REACTIVE, ramp)
    predictive = run_ramp(PREDICTIVE, ramp)
    # reactive: 2 instances go past 11 each (x1.1) once the total passes 22: step 5;
    # predictive sees the total 0.5 higher one period ahead: step 4
    assert first_change(reactive, 2) == 5
    assert first_change(predictive, 2) == 4
    assert first_change(predictive, 2) < first_change(reactive, 2)
    assert all(p >= q for p, q in zip(predictive, reactive, strict=True))


def test_predictive_with_a_long_window_looks_a_window_ahead() -> None:
    r = Recommender()
    p = policy(target=10, mode=PREDICTIVE, up=30)
    d = None
    for step in range(5):  # total 10, 12, 14, 16, 18 on 2 instances: slope 1 per s
        now = NOW + step * INTERVAL
        total = 10.0 + 2.0 * step
        d = r.evaluate(
            "svc",
            p,
            current=2,
            reports=loads(total / 2, total / 2, ts=now),
            now=now,
            interval_s=INTERVAL,
        )
    assert d is not None and d.forecast is not None
    # Holt on an exact line tracks it exactly: 18 + 1 x 30 = 48 in total, 24 each
    assert d.forecast == pytest.approx(24.0)
    assert d.metric == 9.0
    assert "inflight forecast 24 in 30 s (now 9) > target 10" in d.reason


def test_predictive_and_reactive_agree_on_flat_load() -> None:
    flat = [30.0] * 30
    assert run_ramp(PREDICTIVE, flat) == run_ramp(REACTIVE, flat)
    assert run_ramp(PREDICTIVE, flat, start=3) == [3] * 30  # 30 / 3 = 10: at the target


def test_predictive_falling_load_is_not_anticipated() -> None:
    # the forecast is used only when above the current reading
    falling = [40.0 - step for step in range(20)]
    assert run_ramp(PREDICTIVE, falling, start=4) == run_ramp(REACTIVE, falling, start=4)


def test_reactive_mode_drops_the_model() -> None:
    r = Recommender()
    pred = policy(target=10, mode=PREDICTIVE)
    r.evaluate("svc", pred, current=2, reports=loads(5, 5), now=NOW, interval_s=2)
    d = r.evaluate(
        "svc",
        policy(target=10),
        current=2,
        reports=loads(5, 5, ts=NOW + 2),
        now=NOW + 2,
        interval_s=2,
    )
    assert d.forecast is None


# -- Holt forecaster -----------------------------------------------------------------


def test_holt_tracks_a_line_exactly() -> None:
    model = HoltForecaster()
    assert model.forecast(10) is None
    for t in range(6):
        model.observe(100.0 + 2 * t, 5.0 + 3.0 * t)  # slope 1.5 per second
    assert model.trend_per_s == pytest.approx(1.5)
    assert model.forecast(10) == pytest.approx(20.0 + 15.0)


def test_holt_smooths_a_step() -> None:
    model = HoltForecaster(alpha=0.5, beta=0.3)
    model.observe(0, 10)
    model.observe(1, 10)  # level 10, trend 0
    model.observe(2, 20)  # level 0.5 x 20 + 0.5 x 10 = 15; trend 0.3 x 5 = 1.5
    assert model.forecast(0) == pytest.approx(15.0)
    assert model.forecast(2) == pytest.approx(18.0)


def test_holt_ignores_repeats_and_restarts_after_a_gap() -> None:
    model = HoltForecaster(max_gap_s=10)
    model.observe(0, 0)
    model.observe(1, 10)
    model.observe(1, 1000)  # same timestamp: ignored
    model.observe(0.5, 1000)  # from the past: ignored
    assert model.samples == 2
    assert model.forecast(1) == pytest.approx(20.0)
    model.observe(100, 7)  # 99 s gap: start over
    assert (model.samples, model.forecast(50)) == (1, 7.0)


def test_holt_forecast_never_negative_and_rejects_bad_parameters() -> None:
    model = HoltForecaster()
    model.observe(0, 100)
    model.observe(1, 0)
    assert model.forecast(1000) == 0.0
    with pytest.raises(ValueError, match="alpha"):
        HoltForecaster(alpha=0)
    with pytest.raises(ValueError, match="beta"):
        HoltForecaster(beta=1.5)


# -- the global budget ---------------------------------------------------------------


def req(service: str, current: int, desired: int, min_replicas: int = 0) -> BudgetRequest:
    return BudgetRequest(
        service=service, current=current, desired=desired, min_replicas=min_replicas
    )


def test_largest_relative_deficit_first_not_largest_absolute() -> None:
    # floors a=5, b=1; one spare. a lacks 5 of 10 (0.5), b lacks 3 of 4 (0.75): b gets it
    result = allocate([req("a", 5, 10), req("b", 1, 4)], max_total=7)
    assert dict(result.granted) == {"a": 5, "b": 2}
    assert result.capped == {"a", "b"}
    assert not result.over_budget


def test_deficits_are_evened_out_one_replica_at_a_time() -> None:
    # floors 2 + 2, spare 6. a: 8/10, b: 2/4. a takes 3 (to 5, 0.5), then the tie
    # goes by name: a to 6 (0.4), b to 3 (0.25), a to 7 (0.3)
    result = allocate([req("b", 2, 4), req("a", 2, 10)], max_total=10)
    assert dict(result.granted) == {"a": 7, "b": 3}
    assert result.total == 10


def test_never_more_than_desired() -> None:
    result = allocate([req("a", 1, 3), req("b", 2, 5)], max_total=100)
    assert dict(result.granted) == {"a": 3, "b": 5}
    assert result.capped == frozenset()


def test_no_budget_grants_everything() -> None:
    result = allocate([req("a", 1, 30), req("b", 9, 2, min_replicas=4)], max_total=None)
    assert dict(result.granted) == {"a": 30, "b": 4}


def test_scale_downs_are_granted_and_free_room() -> None:
    # a shrinks 10 -> 4 whatever the budget; b may grow into the room left: 8 - 4 = 4
    result = allocate([req("a", 10, 4), req("b", 1, 6)], max_total=8)
    assert dict(result.granted) == {"a": 4, "b": 4}
    assert result.capped == {"b"}
    assert result.describe("b", 6) == "global budget 8: granted 4 of 6"


def test_minimums_are_granted_even_over_budget() -> None:
    result = allocate([req("a", 0, 3, min_replicas=3), req("b", 2, 5, min_replicas=1)], max_total=2)
    # a's minimum and b's running replicas are kept: 3 + 2 > 2
    assert dict(result.granted) == {"a": 3, "b": 2}
    assert result.over_budget
    assert result.capped == {"b"}
    assert "alone exceed the budget" in result.describe("b", 5)


def test_budget_never_forces_a_scale_up_below_what_runs() -> None:
    result = allocate([req("a", 6, 9), req("b", 6, 9)], max_total=10)
    assert dict(result.granted) == {"a": 6, "b": 6}
    assert result.over_budget


def test_budget_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="max-total-replicas"):
        allocate([req("a", 1, 2)], max_total=-1)
    with pytest.raises(ValueError, match="twice"):
        allocate([req("a", 1, 2), req("a", 2, 3)], max_total=10)
    with pytest.raises(ValueError, match="desired"):
        req("a", 1, -2)


budget_requests = st.lists(
    st.builds(
        req,
        st.text("abcdef", min_size=1, max_size=3),
        st.integers(0, 30),
        st.integers(0, 40),
        st.integers(0, 8),
    ),
    max_size=8,
    unique_by=lambda r: r.service,
)


@settings(max_examples=300, deadline=None)
@given(budget_requests, st.integers(0, 150))
def test_budget_properties(requests: list[BudgetRequest], max_total: int) -> None:
    result: Allocation = allocate(requests, max_total)
    floors = sum(r.floor for r in requests)
    assert set(result.granted) == {r.service for r in requests}
    for r in requests:
        granted = result.granted[r.service]
        assert r.floor <= granted <= r.wanted
        assert granted >= r.min_replicas
        if r.desired <= r.current:
            assert granted == r.wanted  # scale-downs always granted
        assert (r.service in result.capped) == (granted < r.wanted)
    assert result.total <= max(max_total, floors)
    assert result.over_budget == (floors > max_total)
    if result.capped and not result.over_budget:
        assert result.total == max_total  # no spare left while someone waits
    # water-filling: taking a replica from b to give a capped a would not help
    for a in requests:
        if a.service not in result.capped:
            continue
        deficit_a = Fraction(a.wanted - result.granted[a.service], a.wanted)
        for b in requests:
            gb = result.granted[b.service]
            if b is not a and gb > b.floor:
                assert deficit_a <= Fraction(b.wanted - gb + 1, b.wanted)
