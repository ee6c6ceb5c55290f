"""The inbound side: calls from peers, forwarded to the local app."""

from __future__ import annotations

from collections.abc import Callable

from sidecar.proxy import Metadata, Target
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

    def __init__(
        self, app_address: str, *, on_app_state: Callable[[bool], None] = lambda _up: None
    ) -> None:
        self.app = Target(app_address)
        self.inflight = 0
        self.app_up = True
        self._on_app_state = on_app_state

    def plan(self, method: str, metadata: Metadata) -> _AppPlan:
        return _AppPlan(self.app)

    def started(self, target: Target) -> None:
        self.inflight += 1

    def finished(self, target: Target, outcome: Outcome | None) -> None:
        self.inflight -= 1
        up = outcome is not Outcome.NEVER_SENT
        if up != self.app_up:
            self.app_up = up
            self._on_app_state(up)

    def failure_metadata(self, outcome: Outcome) -> Metadata:
        return _NOT_PROCESSED if outcome is Outcome.NEVER_SENT else ()
