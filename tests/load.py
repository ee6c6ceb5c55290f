"""A steady load of keyed unary calls through a sidecar, recording every outcome."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import TracebackType

import grpc

from proto import demo_pb2, demo_pb2_grpc


@dataclass(frozen=True)
class Result:
    started: float
    ended: float
    ok: bool
    instance: str = ""
    code: str = ""
    details: str = ""
    attempts: int = 1


class Load:
    """``callers`` threads calling Echo in a loop until stopped (bounded by ``max_seconds``)."""

    def __init__(
        self,
        outbound: str,
        *,
        callers: int = 4,
        idempotent: bool = True,
        delay_ms: int = 5,
        service: str = "echo",
        keys: int = 200,
        timeout: float = 5.0,
        max_seconds: float = 60.0,
    ) -> None:
        self._channel = grpc.insecure_channel(outbound)
        self._stub = demo_pb2_grpc.DemoStub(self._channel)
        self._callers = callers
        self._idempotent = idempotent
        self._delay_ms = delay_ms
        self._service = service
        self._keys = keys
        self._timeout = timeout
        self._max_seconds = max_seconds
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.results: list[Result] = []

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        for i in range(self._callers):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> list[Result]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self._timeout + 5)
        self._channel.close()
        return self.results

    def _run(self, caller: int) -> None:
        end = time.monotonic() + self._max_seconds
        n = caller
        while not self._stop.is_set() and time.monotonic() < end:
            key = f"key-{n % self._keys}"
            n += self._callers
            md: list[tuple[str, str]] = [
                ("ringmesh-service", self._service),
                ("ringmesh-hash-key", key),
            ]
            if self._idempotent:
                md.append(("ringmesh-idempotent", "1"))
            started = time.monotonic()
            try:
                reply, call = self._stub.Echo.with_call(
                    demo_pb2.EchoRequest(text=key, delay_ms=self._delay_ms),
                    metadata=md,
                    timeout=self._timeout,
                )
                attempts = dict(call.trailing_metadata() or ()).get("ringmesh-attempts", "1")
                result = Result(
                    started, time.monotonic(), True, reply.instance, attempts=int(attempts)
                )
            except grpc.RpcError as exc:
                result = Result(
                    started,
                    time.monotonic(),
                    False,
                    code=exc.code().name,
                    details=exc.details() or "",
                )
            with self._lock:
                self.results.append(result)

    def failures(self) -> list[Result]:
        return [r for r in self.results if not r.ok]
