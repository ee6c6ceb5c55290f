"""Holt's linear trend (double exponential smoothing) for the ``predictive`` mode.

The scaler feeds one sample per evaluation, with the evaluation's timestamp.
The trend is kept per second, so irregular sampling (a slow etcd round, a
skipped period) stretches the extrapolation instead of distorting it:

    level_t = alpha * x_t + (1 - alpha) * (level + trend * dt)
    trend_t = beta * (level_t - level) / dt + (1 - beta) * trend

``alpha`` and ``beta`` are per sample; the defaults (0.5, 0.3) follow the load
within two or three periods and keep one noisy period from setting the trend.
The second sample initialises the trend to the slope between the first two
(the textbook b_1 = x_1 - x_0), so a ramp is tracked from its second sample on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_ALPHA = 0.5
DEFAULT_BETA = 0.3


@dataclass
class HoltForecaster:
    """One metric's level and trend. Plain synchronous state: time comes in as floats.

    A gap longer than ``max_gap_s`` between samples (a scaler that just won the
    election, a service that was idle) starts the model over: extrapolating an
    old trend across the gap would invent load.
    """

    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    max_gap_s: float = math.inf
    _level: float = field(default=0.0, init=False)
    _trend: float = field(default=0.0, init=False)
    _last_ts: float | None = field(default=None, init=False)
    _samples: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        for name, value in (("alpha", self.alpha), ("beta", self.beta)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if not self.max_gap_s > 0.0:
            raise ValueError(f"max_gap_s must be positive, got {self.max_gap_s!r}")

    @property
    def samples(self) -> int:
        """Samples since the model last (re)started."""
        return self._samples

    @property
    def trend_per_s(self) -> float:
        return self._trend

    def observe(self, ts: float, value: float) -> None:
        """Add the sample ``value`` taken at ``ts``; an out-of-order or repeated ``ts`` is ignored."""
        if not math.isfinite(value) or not math.isfinite(ts):
            return
        last = self._last_ts
        if last is None or ts - last > self.max_gap_s:
            self._restart(ts, value)
            return
        dt = ts - last
        if dt <= 0.0:
            return
        if self._samples == 1:
            self._trend = (value - self._level) / dt
            self._level = value
        else:
            previous = self._level
            self._level = self.alpha * value + (1.0 - self.alpha) * (previous + self._trend * dt)
            self._trend = (
                self.beta * (self._level - previous) / dt + (1.0 - self.beta) * self._trend
            )
        self._last_ts = ts
        self._samples += 1
        if not (math.isfinite(self._level) and math.isfinite(self._trend)):
            self._restart(ts, value)

    def forecast(self, horizon_s: float) -> float | None:
        """The level ``horizon_s`` after the last sample, never below 0; None before any sample."""
        if self._samples == 0:
            return None
        predicted = self._level + self._trend * max(horizon_s, 0.0)
        if not math.isfinite(predicted):
            return None
        return max(predicted, 0.0)

    def _restart(self, ts: float, value: float) -> None:
        self._level = value
        self._trend = 0.0
        self._last_ts = ts
        self._samples = 1
