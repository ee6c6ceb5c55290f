"""The load generator of `ringmesh up`: Zipf-distributed keys at a rate a script sets.

Open loop, like real clients: calls start on schedule whether or not earlier
ones have answered (up to a bound on calls in flight, past which the
schedule waits rather than piling up tasks). Half the calls carry the key as
``ringmesh-hash-key`` (so the key's owner on the ring serves them), half
the same key mix without it (the mesh then picks the less loaded of two
random instances): the cache hit rates of the two halves show what key
affinity buys. Keys of the two halves never collide (``k:``/``u:``), so
neither warms the other's cache entries.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from proto import cache_pb2, cache_pb2_grpc

KEYED = "keyed"
UNKEYED = "unkeyed"
MODES = (KEYED, UNKEYED)
CALL_TIMEOUT_S = 5.0
MAX_INFLIGHT = 256
TICK_S = 0.01
FAILURES_KEPT = 10


class ZipfKeys:
    """Keys ``0..n-1`` drawn with probability proportional to ``1 / (rank + 1) ** s``."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        if n < 1 or s <= 0:
            raise ValueError(f"need n >= 1 and s > 0, got n={n}, s={s}")
        self._cumulative = list(itertools.accumulate(1.0 / (rank + 1) ** s for rank in range(n)))
        self._rng = rng

    def draw(self) -> int:
        point = self._rng.random() * self._cumulative[-1]
        return min(bisect.bisect_left(self._cumulative, point), len(self._cumulative) - 1)


@dataclass
class ModeTally:
    """What one half of the load (keyed or unkeyed) saw."""

    calls: int = 0
    ok: int = 0
    failed: int = 0
    gets: int = 0  # answered Gets: what a hit rate is out of
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.gets if self.gets else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "ok": self.ok,
            "failed": self.failed,
            "gets": self.gets,
            "hits": self.hits,
            "hit_rate": round(self.hit_rate, 4),
        }


@dataclass
class Tally:
    """Everything counted so far; read by the story and the view."""

    modes: dict[str, ModeTally] = field(default_factory=lambda: {m: ModeTally() for m in MODES})
    failovers: int = 0  # calls answered after more than one attempt (ringmesh-attempts > 1)
    gets: Counter[str] = field(default_factory=Counter)  # answered Gets per instance
    hits: Counter[str] = field(default_factory=Counter)  # cache hits per instance
    failures: list[dict[str, Any]] = field(default_factory=list)  # the first few, for the summary
    inflight: int = 0

    @property
    def calls(self) -> int:
        return sum(t.calls for t in self.modes.values())

    @property
    def failed(self) -> int:
        return sum(t.failed for t in self.modes.values())

    def hit_rate(self, instance: str) -> float | None:
        gets = self.gets.get(instance, 0)
        return self.hits.get(instance, 0) / gets if gets else None


class LoadGenerator:
    """Calls ``Cache.Get`` (and 1 in ``put_every`` times ``Cache.Put``) through a sidecar."""

    def __init__(
        self,
        outbound: str,
        *,
        service: str,
        rate: Callable[[], float],
        keys: int = 1000,
        zipf_s: float = 0.8,
        put_every: int = 20,
        seed: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbound = outbound
        self.service = service
        self.rate = rate  # total calls per second, read every tick
        self.tally = Tally()
        self._rng = random.Random(seed)
        self._keys = ZipfKeys(keys, zipf_s, self._rng)
        self._put_every = put_every
        self._clock = clock
        self._started = clock()
        self._sequence = itertools.count()

    async def probe(self) -> bool:
        """One keyed Get: does a call through the sidecar get answered now?"""
        async with grpc.aio.insecure_channel(self.outbound) as channel:
            stub = cache_pb2_grpc.CacheStub(channel)
            try:
                await stub.Get(
                    cache_pb2.GetRequest(key="probe"),
                    metadata=(("ringmesh-service", self.service), ("ringmesh-hash-key", "probe")),
                    timeout=CALL_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError:
                return False
        return True

    async def run(self) -> None:
        """Send calls until cancelled; calls in flight then are cancelled and not counted."""
        limit = asyncio.Semaphore(MAX_INFLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        async with grpc.aio.insecure_channel(self.outbound) as channel:
            stub = cache_pb2_grpc.CacheStub(channel)
            owed = 0.0
            last = self._clock()
            try:
                while True:
                    await asyncio.sleep(TICK_S)
                    now = self._clock()
                    owed += max(0.0, self.rate()) * (now - last)
                    last = now
                    while owed >= 1.0:
                        owed -= 1.0
                        await limit.acquire()
                        task = asyncio.create_task(self._call(stub, limit))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _call(self, stub: cache_pb2_grpc.CacheStub, limit: asyncio.Semaphore) -> None:
        n = next(self._sequence)
        mode = KEYED if n % 2 == 0 else UNKEYED
        key = f"{'k' if mode == KEYED else 'u'}:{self._keys.draw()}"
        metadata: tuple[tuple[str, str], ...] = (("ringmesh-service", self.service),)
        if mode == KEYED:
            metadata += (("ringmesh-hash-key", key),)
        tally = self.tally.modes[mode]
        is_get = n % self._put_every != self._put_every - 1
        self.tally.inflight += 1
        try:
            if not is_get:
                call: Any = stub.Put(
                    cache_pb2.PutRequest(key=key, value=f"v{n}"),
                    metadata=metadata,
                    timeout=CALL_TIMEOUT_S,
                )
            else:
                call = stub.Get(
                    cache_pb2.GetRequest(key=key), metadata=metadata, timeout=CALL_TIMEOUT_S
                )
            reply = await call
            trailers = await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            tally.calls += 1
            tally.failed += 1
            if len(self.tally.failures) < FAILURES_KEPT:
                self.tally.failures.append({
                    "at_s": round(self._clock() - self._started, 3),
                    "mode": mode,
                    "code": exc.code().name,
                    "details": exc.details() or "",
                })  # fmt: skip
            return
        finally:
            self.tally.inflight -= 1
            limit.release()
        tally.calls += 1
        tally.ok += 1
        if is_get:
            tally.gets += 1
            self.tally.gets[reply.instance] += 1
            if reply.hit:
                tally.hits += 1
                self.tally.hits[reply.instance] += 1
        attempts = dict(trailers or ()).get("ringmesh-attempts", "1")
        if attempts != "1":
            self.tally.failovers += 1
