"""The inbound side: calls from peers, forwarded to the local app."""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic

from sidecar.attempts import Target
from sidecar.proxy import Metadata
from sidecar.retry import NOT_PROCESSED_HEADER, Outcome

_NOT_PROCESSED: Metadata = ((NOT_PROCESSED_HEADER, "1"),)


class _AppPlan:
    __slots__ = ("_target", "idempotent", "service")

    def __init__(self, target: Target | None) -> None:
        self._target = target
        self.idempotent = False
        self.service = "the app"

    def next(self) -> Target | None:
        target, self._target = self._target, None
        return target


class InboundDirector:
    """Sends every call to the app, counts what is in flight, and tells callers when a
    call never reached the app (so they may safely retry it elsewhere)."""

    upstream_is_mesh = False  # the upstream is the app

    def __init__(
        self, app_address: str, *, on_app_state: Callable[[bool], None] = lambda _up: None
    ) -> None:
        self.app = Target(app_address)
        self.inflight = 0
        self._area = 0.0  # integral of inflight over time (call-seconds)
        self._since = monotonic()
        self._last_started = 0.0
        self.app_up = True
        self._on_app_state = on_app_state

    def plan(self, method: str, metadata: Metadata) -> _AppPlan:
        return _AppPlan(self.app)

    def busy_seconds(self) -> float:
        """Call-seconds spent in flight since start: the load record's in-flight average."""
        now = monotonic()
        return self._area + self.inflight * (now - self._since)

    def _count(self, change: int) -> None:
        now = monotonic()
        self._area += self.inflight * (now - self._since)
        self._since = now
        self.inflight += change

    def quiet_for(self) -> float:
        """Seconds since the last call arrived (0 while any is in flight)."""
        return 0.0 if self.inflight else monotonic() - self._last_started

    def started(self, target: Target) -> None:
        self._last_started = monotonic()
        self._count(1)

    def finished(self, target: Target, outcome: Outcome | None) -> None:
        self._count(-1)
        if outcome is not Outcome.CANCELLED:  # a caller leaving says nothing of the app
            self.note_app(up=outcome is not Outcome.NEVER_SENT)

    def note_app(self, *, up: bool) -> None:
        """What a call or a probe learnt about the app; the owner hears of each change."""
        if up != self.app_up:
            self.app_up = up
            self._on_app_state(up)

    def failure_metadata(self, outcome: Outcome) -> Metadata:
        return _NOT_PROCESSED if outcome is Outcome.NEVER_SENT else ()
