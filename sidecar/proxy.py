"""Opaque-bytes gRPC forwarding for all four RPC kinds, shared by inbound and outbound.

Nothing is (de)serialized. Everything that can be built once is: method
handlers, channels, and multicallables are cached; per call the proxy reads
the metadata once, asks its ``Director`` for a plan, and forwards, retrying
on the plan's next target when the retry rules allow it. Known-unary methods
take the cheaper unary-unary path; every other method is handled as
stream-stream, which fits all four kinds.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Collection
from time import perf_counter
from typing import Any, Protocol

import grpc
from opentelemetry.trace import Span

from sidecar.attempts import Attempts, Plan, Target
from sidecar.channels import ChannelPool, NotConnected
from sidecar.replay import RequestReplay
from sidecar.retry import (
    ATTEMPTS_HEADER,
    NOT_PROCESSED_HEADER,
    Outcome,
    RetryBudget,
    RetryPolicy,
    classify,
)
from sidecar.sending import start_sending
from sidecar.stats import DataPlaneStats
from sidecar.telemetry import CallRecorder
from sidecar.tracing import HopTracer

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str | bytes], ...]

# Headers the upstream call sets itself.
_NOT_FORWARDED = frozenset({"user-agent"})
_MAX_CACHED_METHODS = 4096
_MESH_TRAILERS = frozenset({ATTEMPTS_HEADER, NOT_PROCESSED_HEADER})
# A call the mesh could not deliver waits this long for the caller to finish sending.
_DRAIN_BEFORE_FAILING = 0.25


class CallRejected(Exception):
    """A Director refusing a call: the proxy answers with this status, nothing is forwarded."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Director(Protocol):
    """Decides where a call goes and learns how each attempt went."""

    # True when the upstream is another sidecar, whose ``ringmesh-not-processed``
    # is passed on; an app's never is (only a sidecar may say so).
    upstream_is_mesh: bool

    def plan(self, method: str, metadata: Metadata) -> Plan:
        """The call's plan, or raise CallRejected."""

    def started(self, target: Target) -> None: ...

    def finished(self, target: Target, outcome: Outcome | None) -> None:
        """``outcome`` is None when the attempt succeeded."""

    def failure_metadata(self, outcome: Outcome) -> Metadata:
        """Extra trailing metadata for a call that failed with ``outcome``."""


def split_metadata(metadata: Any) -> Metadata:
    return tuple((m[0], m[1]) for m in metadata if m[0] not in _NOT_FORWARDED)


class ProxyHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler forwarding every method through a ChannelPool."""

    def __init__(
        self,
        director: Director,
        pool: ChannelPool,
        *,
        unary_methods: Callable[[], Collection[str]] = frozenset,
        retry: RetryPolicy | None = None,
        stats: DataPlaneStats | None = None,
        rng: random.Random | None = None,
        recorder: CallRecorder | None = None,
    ) -> None:
        self._director = director
        self._pool = pool
        self._dropped_trailers = (
            frozenset({ATTEMPTS_HEADER}) if director.upstream_is_mesh else _MESH_TRAILERS
        )
        self._unary_methods = unary_methods
        self._retry = retry
        self._budget = RetryBudget(retry) if retry is not None else None
        self.stats = stats or DataPlaneStats()
        # Calls begun and not yet answered, waits between attempts included
        # (a drain must not end while a call waits for its retry).
        self.active = 0
        self._rng = rng or random.Random()
        self.recorder = recorder
        self.tracing: HopTracer | None = None
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = self._build(method)
            if len(self._handlers) < _MAX_CACHED_METHODS:
                self._handlers[method] = handler
        return handler

    def forget_handlers(self) -> None:
        """Drop cached handlers (when the set of known-unary methods changes)."""
        self._handlers = {}

    def _build(self, method: str) -> grpc.RpcMethodHandler:
        if method in self._unary_methods():
            return grpc.unary_unary_rpc_method_handler(self._unary_forwarder(method))
        return grpc.stream_stream_rpc_method_handler(self._stream_forwarder(method))

    async def _begin(
        self, method: str, context: grpc.aio.ServicerContext
    ) -> tuple[Attempts, Metadata, Span | None]:
        metadata = split_metadata(context.invocation_metadata())
        span = None
        if self.tracing is not None:
            span, metadata = self.tracing.begin(method, metadata)
        self.stats.calls += 1
        try:
            plan = self._director.plan(method, metadata)
        except CallRejected as exc:
            self.stats.failed_calls += 1
            if span is not None:
                HopTracer.end(span, exc.code)
            await context.abort(exc.code, exc.details)
        self.active += 1
        if self._budget is not None:
            self._budget.call_started()
        attempts = Attempts(
            plan, self._retry, self._budget, self.stats, self._rng, context.time_remaining()
        )
        return attempts, metadata, span

    async def _fail(
        self,
        context: grpc.aio.ServicerContext,
        attempts: Attempts,
        error: grpc.aio.AioRpcError | None,
        outcome: Outcome,
        unsent: str,
    ) -> None:
        self.stats.failed_calls += 1
        upstream = self._forwardable(error.trailing_metadata()) if error is not None else ()
        trailing = upstream + self._director.failure_metadata(outcome) + self._attempts_md(attempts)
        if outcome in (Outcome.NEVER_SENT, Outcome.NOT_PROCESSED):
            # The mesh could not deliver the call: say so, naming the service.
            last = error.details() if error is not None else unsent or "nothing to try"
            code = grpc.StatusCode.UNAVAILABLE
            details = f"no instance of {attempts.plan.service} could take the call after {attempts.count} attempt(s): {last}"
        else:
            assert error is not None
            code, details = error.code(), error.details() or ""
        await context.abort(code, details, trailing)

    def _observe(
        self, method: str, context: grpc.aio.ServicerContext, started: float, span: Span | None
    ) -> None:
        code = context.code() or grpc.StatusCode.OK
        if self.recorder is not None:
            self.recorder.record(method, code, (perf_counter() - started) * 1000.0)
        if span is not None:
            HopTracer.end(span, code)

    def _forwardable(self, upstream: Any) -> Metadata:
        """The upstream's trailers, less the mesh's own that are not ours to pass on:
        a downstream hop's attempt count, and a not-processed flag set by an app."""
        dropped = self._dropped_trailers
        return tuple((m[0], m[1]) for m in (upstream or ()) if m[0] not in dropped)

    def _attempts_md(self, attempts: Attempts) -> Metadata:
        if self._retry is None:
            return ()
        return ((ATTEMPTS_HEADER, str(attempts.count)),)

    def _set_trailing(
        self, context: grpc.aio.ServicerContext, upstream: Any, attempts: Attempts
    ) -> None:
        trailing = (self._forwardable(upstream) if upstream else ()) + self._attempts_md(attempts)
        if trailing:
            context.set_trailing_metadata(trailing)

    def _unary_forwarder(self, method: str) -> Callable[..., Any]:
        director, pool = self._director, self._pool

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            started = perf_counter()
            attempts: Attempts | None = None
            span: Span | None = None
            try:
                attempts, metadata, span = await self._begin(method, context)
                target = attempts.first()
                error: grpc.aio.AioRpcError | None = None
                outcome, unsent = Outcome.NEVER_SENT, ""
                while target is not None:
                    director.started(target)
                    # Until the attempt ends one way or another, it counts as
                    # cancelled (the caller left or its deadline passed).
                    result: Outcome | None = Outcome.CANCELLED
                    try:
                        await pool.connect(target.address, attempts.connect_wait())
                        call = pool.unary(target.address, method)(
                            request, timeout=attempts.timeout(), metadata=metadata
                        )
                        response: bytes = await call  # cancelling us cancels the call
                        result = None
                    except (grpc.aio.AioRpcError, NotConnected) as exc:
                        error, outcome, unsent = _failure(exc)
                        result = outcome
                    finally:
                        director.finished(target, attempts.ended(result))
                    if result is None:
                        self._set_trailing(context, await call.trailing_metadata(), attempts)
                        return response
                    target = await attempts.retry(outcome)
                await self._fail(context, attempts, error, outcome, unsent)
                raise AssertionError("unreachable")
            finally:
                if attempts is not None:
                    attempts.release()
                    self.active -= 1
                self._observe(method, context, started, span)

        return forward

    def _stream_forwarder(self, method: str) -> Callable[..., Any]:
        director, pool = self._director, self._pool
        limit = self._retry.stream_buffer_bytes if self._retry is not None else 0

        async def forward(
            request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            started = perf_counter()
            attempts: Attempts | None = None
            span: Span | None = None
            replay = RequestReplay(request_iterator, limit=limit)
            try:
                attempts, metadata, span = await self._begin(method, context)
                target = attempts.first()
                error: grpc.aio.AioRpcError | None = None
                outcome, unsent = Outcome.NEVER_SENT, ""
                committed = False
                while target is not None:
                    director.started(target)
                    committed = False
                    result: Outcome | None = Outcome.CANCELLED
                    call: grpc.aio.StreamStreamCall | None = None
                    sender: asyncio.Task[None] | None = None
                    try:
                        # The request stream first: nothing may make it unreplayable
                        # between the retry's check and this attempt taking it.
                        requests = replay.attempt()
                        await pool.connect(target.address, attempts.connect_wait())
                        call = pool.stream(target.address, method)(
                            timeout=attempts.timeout(), metadata=metadata
                        )
                        sender = start_sending(call, requests)
                        async for response in call:
                            if not committed:
                                replay.commit()
                                committed = True
                            yield response
                        result = None
                    except (grpc.aio.AioRpcError, NotConnected) as exc:
                        error, outcome, unsent = _failure(exc)
                        result = outcome
                    finally:
                        director.finished(target, attempts.ended(result, responded=committed))
                        if call is not None and not call.done():
                            call.cancel()  # our caller left while we were yielding
                        if sender is not None:
                            sender.cancel()  # done, or still reading what no one will take
                    if result is None:
                        assert call is not None
                        self._set_trailing(context, await call.trailing_metadata(), attempts)
                        return
                    if committed or not replay.replayable:
                        break
                    # The caller may send past the replay buffer during the backoff.
                    target = await attempts.retry(outcome, possible=lambda: replay.replayable)
                if outcome in (Outcome.NEVER_SENT, Outcome.NOT_PROCESSED) and not committed:
                    left = attempts.timeout()
                    await replay.drain(
                        _DRAIN_BEFORE_FAILING if left is None else min(_DRAIN_BEFORE_FAILING, left)
                    )
                await self._fail(context, attempts, error, outcome, unsent)
            finally:
                replay.close()
                if attempts is not None:
                    attempts.release()
                    self.active -= 1
                self._observe(method, context, started, span)

        return forward


def _failure(exc: Exception) -> tuple[grpc.aio.AioRpcError | None, Outcome, str]:
    """A failed attempt as (the upstream's error, its outcome, why nothing was sent).

    Streams are written by ``start_sending``, so an upstream that ends a call
    while a request is being written is reported with its own status, never
    as gRPC's INTERNAL "Internal error from Core". Any INTERNAL is the app's
    answer: FINAL, never retried.
    """
    if isinstance(exc, NotConnected):
        return None, Outcome.NEVER_SENT, str(exc)
    assert isinstance(exc, grpc.aio.AioRpcError)
    return exc, classify(exc.code(), exc.details() or "", exc.trailing_metadata() or ()), ""
