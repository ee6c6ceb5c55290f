"""Counters the data plane keeps (retries by reason, ejections, budget exhaustion).

Plain integers on the hot path; the telemetry issue exports them through
OpenTelemetry, and the admin port serves them as JSON at ``/stats``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataPlaneStats:
    calls: int = 0
    failed_calls: int = 0
    retries: Counter[str] = field(default_factory=Counter)  # by reason (retry.Outcome value)
    retry_budget_waits: int = 0  # retries that had to wait for a budget slot
    retry_budget_exhausted: int = 0  # ...and found none within the wait
    retries_in_flight_peak: int = 0  # the most retries the budget let run at once
    ejections: int = 0
    attempts: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "failed_calls": self.failed_calls,
            "attempts": self.attempts,
            "retries": dict(self.retries),
            "retry_budget_waits": self.retry_budget_waits,
            "retry_budget_exhausted": self.retry_budget_exhausted,
            "retries_in_flight_peak": self.retries_in_flight_peak,
            "ejections": self.ejections,
        }
