"""The ``load/<service>/<id>`` record, computed from the call-duration histogram (pure).

``inflight`` is the window's time-averaged number of calls in flight (the
integral the inbound side keeps of the count ``ringmesh.inflight`` reports),
which a policy can hold steady; ``rps``, ``error_rate`` and the percentiles
come from the histogram.

The telemetry reader hands over cumulative totals every report interval; the
difference between two readings is the window the record describes. The
same histogram feeds /metrics and OTLP: one counting path, not two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from registry.scaling import LoadReport


@dataclass(frozen=True)
class HistogramTotals:
    """Cumulative call counts at one moment, summed over methods."""

    at: float  # monotonic seconds
    count: int = 0
    errors: int = 0
    bounds: tuple[float, ...] = ()
    buckets: tuple[int, ...] = ()  # len(bounds) + 1, the last one is +Inf


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float:
    """The q-quantile of a bucketed distribution, interpolating inside the bucket
    (as Prometheus' histogram_quantile does). 0.0 for an empty distribution."""
    total = sum(counts)
    if total == 0 or not bounds:
        return 0.0
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])  # +Inf bucket: the highest finite bound
            lower = bounds[i - 1] if i > 0 else 0.0
            return float(lower + (bounds[i] - lower) * (rank - seen) / n)
        seen += n
    return float(bounds[-1])


def window_load(
    previous: HistogramTotals, now: HistogramTotals, *, busy_s: float, wall: float
) -> LoadReport:
    """What happened between two readings (counters that went backwards count as restarted)."""
    window = max(now.at - previous.at, 1e-9)
    same_shape = previous.bounds == now.bounds and len(previous.buckets) == len(now.buckets)
    if now.count < previous.count or not same_shape:
        previous = HistogramTotals(previous.at, bounds=now.bounds, buckets=(0,) * len(now.buckets))
    calls = now.count - previous.count
    errors = now.errors - previous.errors
    # In-flight as the window's time average (call-seconds in flight / window),
    # not a point sample that happens to land between two calls.
    average_inflight = max(0.0, busy_s) / window
    buckets = [
        a - b for a, b in zip(now.buckets, previous.buckets or (0,) * len(now.buckets), strict=True)
    ]
    return LoadReport(
        ts=round(wall, 3),
        window_s=round(window, 3),
        rps=round(calls / window, 3),
        inflight=round(average_inflight, 3),
        error_rate=round(errors / calls, 4) if calls else 0.0,
        p50_ms=round(quantile(now.bounds, buckets, 0.50), 3),
        p99_ms=round(quantile(now.bounds, buckets, 0.99), 3),
    )
