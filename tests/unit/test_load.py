"""The load/ record's maths: quantiles from buckets, windows from cumulative totals."""

from __future__ import annotations

import pytest

from sidecar.load import HistogramTotals, quantile, window_load

BOUNDS = (1.0, 2.0, 5.0, 10.0)


def test_quantile_interpolates_inside_the_bucket() -> None:
    # 10 calls in (1, 2], 10 in (2, 5]: the median is the top of the first bucket.
    assert quantile(BOUNDS, [0, 10, 10, 0, 0], 0.5) == pytest.approx(2.0)
    assert quantile(BOUNDS, [0, 10, 10, 0, 0], 0.25) == pytest.approx(1.5)
    assert quantile(BOUNDS, [0, 10, 10, 0, 0], 0.75) == pytest.approx(3.5)


def test_quantile_of_nothing_is_zero_and_overflow_is_the_last_bound() -> None:
    assert quantile(BOUNDS, [0, 0, 0, 0, 0], 0.99) == 0.0
    assert quantile(BOUNDS, [0, 0, 0, 0, 7], 0.99) == 10.0


def test_window_load_is_the_difference_of_two_readings() -> None:
    before = HistogramTotals(
        at=100.0, count=50, errors=5, bounds=BOUNDS, buckets=(10, 20, 20, 0, 0)
    )
    after = HistogramTotals(
        at=102.0, count=250, errors=25, bounds=BOUNDS, buckets=(10, 20, 220, 0, 0)
    )
    reading = window_load(before, after, busy_s=6.0, wall=1234.5)
    assert reading.window_s == 2.0
    assert reading.rps == 100.0
    assert reading.error_rate == 0.1
    assert reading.inflight == 3.0  # 6 call-seconds in 2 s
    assert 2.0 < reading.p50_ms < 5.0
    assert reading.p99_ms == pytest.approx(2.0 + 3.0 * 198 / 200)


def test_window_load_after_a_counter_reset_counts_from_zero() -> None:
    before = HistogramTotals(at=0.0, count=500, errors=0, bounds=BOUNDS, buckets=(500, 0, 0, 0, 0))
    after = HistogramTotals(at=1.0, count=10, errors=0, bounds=BOUNDS, buckets=(0, 10, 0, 0, 0))
    reading = window_load(before, after, busy_s=0.0, wall=1.0)
    assert reading.rps == 10.0
    assert 1.0 < reading.p50_ms <= 2.0


def test_record_json_has_the_contract_fields() -> None:
    reading = window_load(HistogramTotals(0.0), HistogramTotals(1.0), busy_s=0.0, wall=5.0)
    import json

    assert set(json.loads(reading.to_json())) == {
        "ts",
        "window_s",
        "rps",
        "inflight",
        "error_rate",
        "p50_ms",
        "p99_ms",
    }
