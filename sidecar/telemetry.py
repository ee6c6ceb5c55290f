"""The data plane's instruments, on the OpenTelemetry API only.

Durations are recorded per call into histograms (the one counting path: the
``load/`` records are computed from the same histograms). Counters that the
proxy already keeps as plain integers (retries, ejections, budget) are
exported by observable instruments reading them at collection time, so the
hot path pays for nothing twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import grpc
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from sidecar.stats import DataPlaneStats

RPC_SERVER_DURATION = "rpc.server.duration"
RPC_CLIENT_DURATION = "rpc.client.duration"
INFLIGHT = "ringmesh.inflight"
RETRIES = "ringmesh.retries"
EJECTIONS = "ringmesh.ejections"
BUDGET_EXHAUSTED = "ringmesh.retry_budget_exhausted"
BUDGET_WAITS = "ringmesh.retry_budget_waits"
# Milliseconds; fine enough below 1 ms, where a sidecar hop lives.
DURATION_BUCKETS_MS = (
    0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 25, 50, 75, 100, 250, 500, 1000, 2500, 5000, 10000,
)  # fmt: skip
_MAX_ATTRIBUTE_SETS = 4096
# Counters that are one integer of DataPlaneStats: (name, field, unit, description).
_PLAIN_COUNTERS = (
    (EJECTIONS, "ejections", "{ejection}", "Peers ejected"),
    (BUDGET_EXHAUSTED, "retry_budget_exhausted", "{retry}", "Retries refused by the retry budget"),
    (
        BUDGET_WAITS,
        "retry_budget_waits",
        "{retry}",
        "Retries that waited for a slot in the retry budget",
    ),
)


class CallRecorder:
    """Records one side's call durations with the semantic-convention attributes."""

    def __init__(self, meter: Meter, name: str, description: str) -> None:
        self._histogram = meter.create_histogram(name, unit="ms", description=description)
        self._attributes: dict[tuple[str, grpc.StatusCode], dict[str, str | int]] = {}

    def record(self, method: str, code: grpc.StatusCode, milliseconds: float) -> None:
        key = (method, code)
        attributes = self._attributes.get(key)
        if attributes is None:
            service, _, name = method.strip("/").partition("/")
            attributes = {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "rpc.grpc.status_code": code.value[0],
            }
            if len(self._attributes) < _MAX_ATTRIBUTE_SETS:
                self._attributes[key] = attributes
        self._histogram.record(milliseconds, attributes)


class DataPlaneMetrics:
    """Every instrument of one sidecar."""

    def __init__(
        self,
        meter: Meter,
        stats: DataPlaneStats,
        *,
        inflight: Callable[[], Mapping[str, int]],
    ) -> None:
        self.server = CallRecorder(
            meter, RPC_SERVER_DURATION, "Calls served through the inbound side"
        )
        self.client = CallRecorder(
            meter, RPC_CLIENT_DURATION, "Calls sent through the outbound side"
        )
        self._stats = stats
        self._inflight = inflight
        meter.create_observable_up_down_counter(
            INFLIGHT,
            callbacks=[self._observe_inflight],
            unit="{call}",
            description="Calls in flight",
        )
        meter.create_observable_counter(
            RETRIES,
            callbacks=[self._observe_retries],
            unit="{retry}",
            description="Retries by reason",
        )
        for name, field, unit, description in _PLAIN_COUNTERS:
            meter.create_observable_counter(
                name, callbacks=[self._observe_field(field)], unit=unit, description=description
            )

    def _observe_inflight(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {"direction": direction}) for direction, n in self._inflight().items()
        ]

    def _observe_retries(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"reason": reason}) for reason, n in self._stats.retries.items()]

    def _observe_field(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """A callback observing one integer counter of the data plane's stats."""

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(getattr(self._stats, field))]

        return observe
