"""The scaler's maths: the Kubernetes HPA algorithm as plain functions, time passed in.

One evaluation of one service, as the HPA controller does it (replica_calculator.go
``calcPlainMetricReplicas``, horizontal.go ``normalizeDesiredReplicasWithBehaviors``):

1. **Out of range first.** Fewer replicas than ``min_replicas`` go straight to
   the minimum, more than ``max_replicas`` straight to the maximum, with no
   metric involved. This is also how a service at 0 replicas with
   ``min_replicas > 0`` comes back. (The HPA instead treats 0 replicas as
   "autoscaling disabled"; ringmesh has no separate switch for that, the
   policy itself is the switch.) A service at 0 replicas with
   ``min_replicas == 0`` has no instance to report load, so it stays at 0.
2. **Usage ratio.** ``metric`` is the average of the policy's metric over the
   instances with a fresh report; ``ratio = metric / target``. Within the
   tolerance (``|ratio - 1| <= tolerance``) the recommendation is the current
   count, otherwise ``ceil(ratio x instances)``. ``p99_ms`` is averaged like
   the others: the HPA treats every average-value metric as if it scaled
   inversely with replicas, and so do we.
3. **Missing reports** (no report, or one older than ``stale_after_s``, or
   replicas the scaler expects that have not registered yet): the ratio from
   the reporting instances gives the direction; for a scale-up the missing
   ones count as 0, for a scale-down as exactly the target; if the ratio
   recomputed that way is within tolerance, or points the other way, or the
   count it gives moves against its own direction, keep the current count.
   No fresh report at all: keep the current count and record nothing.
4. **Stabilization.** Recommendations are remembered with their timestamps.
   The result is the current count clamped between the lowest recommendation
   of the scale-up window and the highest of the scale-down window (windows
   are half-open: a recommendation exactly ``window`` seconds old is out).
5. **Rate and bounds.** Per evaluation, up by at most max(+100%, +4), down by
   at most 100%, then within [min_replicas, max_replicas]. (The HPA's default
   behaviour allows the same per 15 s period; ringmesh's period is the
   scaler's ``--interval``.)

``predictive`` mode feeds the metric to a Holt linear-trend model each
evaluation and scales for the larger of now and its forecast one horizon
ahead, horizon = max(scale_up_window_s, interval_s); see ``scaler.forecast``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from registry.scaling import MAX_REPLICAS, P99_MS, PREDICTIVE, LoadReport, Policy
from scaler.forecast import DEFAULT_ALPHA, DEFAULT_BETA, HoltForecaster

DEFAULT_STALE_AFTER_S = 90.0  # three of a sidecar's 30 s rewrites missed (sidecar/load.py)
SCALE_UP_PERCENT = 100
SCALE_UP_INSTANCES = 4
SCALE_DOWN_PERCENT = 100
# A forecast model that missed this many evaluations starts over.
FORECAST_MAX_GAP_PERIODS = 10
_MAX_HISTORY = 8192


@dataclass(frozen=True)
class Decision:
    """One evaluation's outcome: the new replica count and a sentence saying why."""

    replicas: int
    previous: int
    reason: str
    metric: float | None  # observed per-instance average; None without any fresh report
    recommendation: int | None = None  # before stabilization, rate limits and bounds
    forecast: float | None = None  # predictive mode: per-instance metric one horizon ahead

    @property
    def changed(self) -> bool:
        return self.replicas != self.previous


@dataclass(frozen=True)
class Readings:
    """The fresh values of a policy's metric, and how many instances had none."""

    values: tuple[float, ...]
    missing: int
    registered: int

    @property
    def instances(self) -> int:
        return len(self.values) + self.missing

    @property
    def average(self) -> float | None:
        return _mean(self.values) if self.values else None


def read_metric(
    reports: Mapping[str, LoadReport | None],
    *,
    metric: str,
    current: int,
    now: float,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> Readings:
    """Split ``reports`` (instance id -> its report, None if it has none) into fresh and missing.

    Replicas the scaler expects beyond the registered instances (``current``
    above ``len(reports)``) are missing too, as pods without metrics are to the
    HPA. A report from the future (clock skew) counts as fresh.
    """
    values: list[float] = []
    missing = 0
    for report in reports.values():
        if report is None or now - report.ts > stale_after_s:
            missing += 1
        else:
            values.append(report.value(metric))
    missing += max(0, current - len(reports))
    return Readings(values=tuple(values), missing=missing, registered=len(reports))


def within_tolerance(ratio: float, tolerance: float) -> bool:
    """``|ratio - 1| <= tolerance``; a ratio on the boundary up to float noise is within
    (in floats 5.5 / 5 - 1 is 0.10000000000000009, and a tolerance of 0.1 should hold it)."""
    return abs(ratio - 1.0) <= tolerance + 1e-9


def replica_count(
    values: tuple[float, ...], *, missing: int, current: int, target: float, tolerance: float
) -> tuple[int, str]:
    """The HPA's recommendation from per-instance ``values``; also why missing ones held it."""
    ratio = _mean(values) / target
    if within_tolerance(ratio, tolerance):
        return current, ""
    if missing == 0:
        return _ceil(ratio * len(values)), ""
    fill, counted_as = (0.0, "0") if ratio > 1.0 else (target, "the target")
    new_ratio = _mean((*values, *([fill] * missing))) / target
    held = f"counting them as {counted_as} holds {current}"
    if within_tolerance(new_ratio, tolerance) or (ratio > 1.0) != (new_ratio > 1.0):
        return current, held
    proposed = _ceil(new_ratio * (len(values) + missing))
    if (new_ratio < 1.0 and proposed > current) or (new_ratio > 1.0 and proposed < current):
        return current, held
    return proposed, ""


def stabilize(
    *,
    current: int,
    recommendation: int,
    history: list[tuple[float, int]],
    now: float,
    up_window_s: float,
    down_window_s: float,
) -> int:
    """Clamp ``current`` between the lowest recommendation of the scale-up window and the
    highest of the scale-down window, ``recommendation`` (made at ``now``) included."""
    lowest = highest = recommendation
    for ts, past in history:
        if ts > now - up_window_s:
            lowest = min(lowest, past)
        if ts > now - down_window_s:
            highest = max(highest, past)
    return min(max(current, lowest), highest)


def step_limits(current: int) -> tuple[int, int]:
    """The lowest and highest counts one evaluation may move ``current`` to."""
    up = max(-(-current * (100 + SCALE_UP_PERCENT) // 100), current + SCALE_UP_INSTANCES)
    down = -(-current * (100 - SCALE_DOWN_PERCENT) // 100)
    return down, up


def limit_rate(*, current: int, desired: int, policy: Policy) -> tuple[int, str]:
    """Apply the step limits and the policy's bounds, as the HPA's behavior rate does."""
    down, up = step_limits(current)
    if desired > current:
        allowed, why = (
            (up, f"scale-up step limit {up}")
            if up < policy.max_replicas
            else (policy.max_replicas, f"max_replicas {policy.max_replicas}")
        )
        if desired > allowed:
            return allowed, why
    elif desired < current:
        allowed, why = (
            (down, f"scale-down step limit {down}")
            if down > policy.min_replicas
            else (policy.min_replicas, f"min_replicas {policy.min_replicas}")
        )
        if desired < allowed:
            return allowed, why
    return desired, ""


@dataclass
class _ServiceMemory:
    history: list[tuple[float, int]] = field(default_factory=list)
    forecaster: HoltForecaster | None = None


class Recommender:
    """Evaluates services' policies, remembering each service's recent recommendations
    (for the stabilization windows) and its forecast model. Synchronous and clock-free:
    every call says what time it is."""

    def __init__(self, *, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA) -> None:
        HoltForecaster(alpha=alpha, beta=beta)  # validate once, here
        self._alpha = alpha
        self._beta = beta
        self._memory: dict[str, _ServiceMemory] = {}

    def forget(self, service: str) -> None:
        """Drop a service's memory (its policy was deleted)."""
        self._memory.pop(service, None)

    def remember(self, service: str, ts: float, recommendation: int) -> None:
        """Seed the stabilization history. A new leader remembers each ``targets/``
        count at the time it takes over (as the HPA seeds with now and the current
        replicas), not at the target's ``decided_at``: a seed older than the
        scale-down window would drop out at once and let it scale down straight away."""
        memory = self._memory.setdefault(service, _ServiceMemory())
        memory.history.append((ts, recommendation))
        memory.history.sort(key=lambda entry: entry[0])

    def history(self, service: str) -> tuple[tuple[float, int], ...]:
        """The remembered (timestamp, recommendation) pairs, oldest first."""
        memory = self._memory.get(service)
        return tuple(memory.history) if memory else ()

    def evaluate(
        self,
        service: str,
        policy: Policy,
        *,
        current: int,
        reports: Mapping[str, LoadReport | None],
        now: float,
        interval_s: float,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
    ) -> Decision:
        """Decide ``service``'s replica count at time ``now``.

        ``current`` is the count in force (the last target, or what runs when
        there is none); ``reports`` maps each registered serving instance to its
        load report or None; ``interval_s`` is the scaler's evaluation period.
        """
        if isinstance(current, bool) or not isinstance(current, int) or current < 0:
            raise ValueError(f"current must be an integer >= 0, got {current!r}")
        memory = self._memory.setdefault(service, _ServiceMemory())
        readings = read_metric(
            reports, metric=policy.metric, current=current, now=now, stale_after_s=stale_after_s
        )
        observed = readings.average
        horizon_s = max(policy.scale_up_window_s, interval_s)
        forecast = self._forecast(memory, policy, readings, now, interval_s, horizon_s)

        bound = _out_of_range(current, policy)
        if bound is not None:
            return Decision(bound[0], current, bound[1], observed, forecast=forecast)
        if observed is None:
            reason = (
                f"no fresh load report from any of {readings.instances} instances: "
                f"keeping {current}"
            )
            return Decision(current, current, reason, None, forecast=forecast)

        values, effective = _apply_forecast(readings.values, observed, forecast)
        recommendation, held = replica_count(
            values,
            missing=readings.missing,
            current=current,
            target=policy.target,
            tolerance=policy.tolerance,
        )
        stabilized = stabilize(
            current=current,
            recommendation=recommendation,
            history=memory.history,
            now=now,
            up_window_s=policy.scale_up_window_s,
            down_window_s=policy.scale_down_window_s,
        )
        _remember(memory, now, recommendation, policy)
        replicas, limited_by = limit_rate(current=current, desired=stabilized, policy=policy)
        notes = [_compare(policy, observed, effective, horizon_s)]
        if readings.missing:
            missing = f"{readings.missing} of {readings.instances} instances without a fresh report"
            notes.append(f"{missing}, {held}" if held else missing)
        if stabilized != recommendation:
            which, window = (
                ("scale-down", policy.scale_down_window_s)
                if stabilized > recommendation
                else ("scale-up", policy.scale_up_window_s)
            )
            notes.append(
                f"the {_fmt(window)} s {which} window holds {stabilized} "
                f"(recommended {recommendation})"
            )
        if limited_by:
            notes.append(f"limited by {limited_by}")
        reason = "; ".join([f"{notes[0]}: {current} -> {replicas}", *notes[1:]])
        return Decision(replicas, current, reason, observed, recommendation, forecast)

    def _forecast(
        self,
        memory: _ServiceMemory,
        policy: Policy,
        readings: Readings,
        now: float,
        interval_s: float,
        horizon_s: float,
    ) -> float | None:
        """Feed the model this evaluation's sample; return the per-instance forecast.

        For ``inflight`` and ``rps`` the model follows the service's total
        (average x registered instances), which does not jump when replicas
        are added, and the forecast is divided back per instance; ``p99_ms``
        is not additive, so its average is followed as is.
        """
        if policy.mode != PREDICTIVE:
            memory.forecaster = None
            return None
        if memory.forecaster is None:
            memory.forecaster = HoltForecaster(alpha=self._alpha, beta=self._beta)
        model = memory.forecaster
        model.max_gap_s = max(interval_s, 1e-9) * FORECAST_MAX_GAP_PERIODS
        average = readings.average
        additive = policy.metric != P99_MS
        if average is not None:
            model.observe(now, average * readings.registered if additive else average)
        predicted = model.forecast(horizon_s)
        if predicted is None or average is None:
            return None
        return predicted / readings.registered if additive else predicted


def _out_of_range(current: int, policy: Policy) -> tuple[int, str] | None:
    if current < policy.min_replicas:
        bound, name = policy.min_replicas, "below min_replicas"
    elif current > policy.max_replicas:
        bound, name = policy.max_replicas, "above max_replicas"
    else:
        return None
    return bound, f"{current} replicas {name} {bound}: {current} -> {bound}"


def _apply_forecast(
    values: tuple[float, ...], observed: float, forecast: float | None
) -> tuple[tuple[float, ...], float]:
    """Scale the readings up to the forecast when it is the larger: the recommendation
    is then the HPA's for the forecast load, missing-report rules included."""
    if forecast is None or forecast <= observed:
        return values, observed
    if observed > 0:
        return tuple(v * forecast / observed for v in values), forecast
    return (forecast,) * len(values), forecast


def _compare(policy: Policy, observed: float, effective: float, horizon_s: float) -> str:
    """E.g. "inflight 12.5 > target 5 (x2.50)"."""
    ratio = effective / policy.target
    if within_tolerance(ratio, policy.tolerance):
        compared = f"within {policy.tolerance * 100:g}% of"
    else:
        compared = ">" if ratio > 1.0 else "<"
    shown = f"{policy.metric} {_fmt(observed)}"
    if effective != observed:
        shown = (
            f"{policy.metric} forecast {_fmt(effective)} in {_fmt(horizon_s)} s "
            f"(now {_fmt(observed)})"
        )
    return f"{shown} {compared} target {_fmt(policy.target)} (x{ratio:.2f})"


def _remember(memory: _ServiceMemory, now: float, recommendation: int, policy: Policy) -> None:
    keep_after = now - max(policy.scale_up_window_s, policy.scale_down_window_s)
    history = [(ts, rec) for ts, rec in memory.history if ts > keep_after]
    history.append((now, recommendation))
    memory.history = history[-_MAX_HISTORY:]


def _mean(values: tuple[float, ...]) -> float:
    try:
        return math.fsum(values) / len(values)
    except OverflowError:  # only near float max; divide first instead
        return math.fsum(v / len(values) for v in values)


def _ceil(x: float) -> int:
    """ceil() that forgives float noise (3 x (0.6 / 0.3) is not 6.000000000000001
    instances) and caps at what any policy allows."""
    if not x < MAX_REPLICAS:
        return MAX_REPLICAS
    return max(0, math.ceil(x - 1e-9 * max(1.0, x)))


def _fmt(x: float) -> str:
    return f"{round(x, 2):g}"
