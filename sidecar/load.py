"""The ``load/<service>/<id>`` record, computed from the call-duration histogram (pure).

``inflight`` is the window's time-averaged number of calls in flight (the
integral the inbound side keeps of the count ``ringmesh.inflight`` reports),
which a policy can hold steady; ``rps``, ``error_rate`` and the percentiles
come from the histogram.

The telemetry reader hands over cumulative totals every report interval; the
difference between two readings is the window the record describes. The
same histogram feeds /metrics and OTLP: one counting path, not two.

Not every reading is written: ``worth_writing`` lets a sidecar skip a reading
whose *scaled* field (the one the service's policy scales on, ``rps`` without a
policy) differs from the record in etcd by less than ``RewriteThresholds``, and
rewrite an unchanged one only every ``max_interval_s`` (30 s), so a steady
fleet writes about 1/``max_interval_s`` records per instance per second
instead of 1/``report_interval``. The other fields ride along with each write:
they are as fresh as the last write, at most ``max_interval_s`` old (live
numbers are on /metrics). The record lives under the instance's lease, so a
record not rewritten is still the instance's; readers treat a record as
missing only once it is older than three max intervals (the scaler's
``stale_after``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields

from registry.scaling import RPS, LoadReport


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


@dataclass(frozen=True)
class RewriteThresholds:
    """When a new reading is worth a write to etcd (see ``worth_writing``).

    A field changed when it moved by more than ``relative`` (``latency_relative``
    for the percentiles) of the value in etcd *and* by more than its absolute
    floor (the floors keep an idle or nearly idle instance from writing its
    noise: 0.2 -> 0.4 rps is +100%). A rate counted over a window is Poisson
    noise of its own (sd sqrt(calls)/window: 7% at 200 calls, 22% at 20), so rps
    must also move by ``noise_sds`` of those. In-flight (the window's time
    average, calls x their mean duration / window) carries the same relative
    noise at least, so it must move by ``noise_sds`` of it too, capped at
    ``inflight_noise_cap`` (at 5 calls a window 3 sd is 134%: a fall to nothing
    would never be written). A real shift still shows within seconds: readings
    scatter around the new mean and one soon crosses. The percentiles come from
    histogram buckets and move 15-20% between steady 1 s windows, hence their
    wider threshold. Measured in the README ("Load records").
    """

    relative: float = 0.10
    latency_relative: float = 0.5
    rps_floor: float = 1.0
    noise_sds: float = 3.0
    inflight_floor: float = 0.2
    inflight_noise_cap: float = 0.5
    error_rate_floor: float = 0.01
    latency_floor_ms: float = 5.0
    max_interval_s: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value >= 0:
                raise ValueError(f"{f.name} must be >= 0, got {value!r}")


DEFAULT_THRESHOLDS = RewriteThresholds()


@dataclass(frozen=True)
class Written:
    """The load record last written to etcd, and when (the caller's monotonic clock)."""

    report: LoadReport
    at: float


def changed_fields(
    written: LoadReport,
    reading: LoadReport,
    thresholds: RewriteThresholds = DEFAULT_THRESHOLDS,
    *,
    among: Collection[str] | None = None,
) -> tuple[str, ...]:
    """The fields of ``reading`` (of those ``among``; None: every one) that moved past
    the thresholds since ``written``."""
    window = max(reading.window_s, 1e-3)
    calls = written.rps * window  # the calls a window like this one counts, by the record
    rps_noise = thresholds.noise_sds * math.sqrt(written.rps / window)
    inflight_noise = thresholds.noise_sds / math.sqrt(calls) if calls > 0 else 0.0
    rules = {
        "rps": (thresholds.relative, max(thresholds.rps_floor, rps_noise)),
        "inflight": (
            max(thresholds.relative, min(thresholds.inflight_noise_cap, inflight_noise)),
            thresholds.inflight_floor,
        ),
        "error_rate": (thresholds.relative, thresholds.error_rate_floor),
        "p50_ms": (thresholds.latency_relative, thresholds.latency_floor_ms),
        "p99_ms": (thresholds.latency_relative, thresholds.latency_floor_ms),
    }
    unknown = set(among or ()) - set(rules)
    if unknown:
        raise ValueError(f"no such load field: {sorted(unknown)}; the fields are {tuple(rules)}")
    moved = []
    for name, (relative, floor) in rules.items():
        if among is not None and name not in among:
            continue
        old, new = getattr(written, name), getattr(reading, name)
        if abs(new - old) > max(floor, relative * abs(old)):
            moved.append(name)
    return tuple(moved)


def worth_writing(
    reading: LoadReport,
    written: Written | None,
    *,
    now: float,
    scaled_on: str = RPS,
    thresholds: RewriteThresholds = DEFAULT_THRESHOLDS,
) -> bool:
    """Write ``reading`` now? Yes for the first record, once ``max_interval_s`` has passed
    since the last write, or when ``scaled_on`` (the metric of the service's policy)
    moved past its threshold.

    Only the scaled field triggers a write: it is what the scaler decides on, and
    every other field would add its own noise crossings to the fleet's write rate
    (in-flight and p99 crossed 4x as often as rps in bench/bench_fleet.py's noisy
    model). Compared with the record *in etcd*, not the previous reading: a slow
    drift adds up until it is written.
    """
    if written is None or now - written.at >= thresholds.max_interval_s:
        return True
    return bool(changed_fields(written.report, reading, thresholds, among=(scaled_on,)))
