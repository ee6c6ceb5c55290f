"""The cache demo service (proto/cache.proto): a local cache in front of a slow backend.

It shows what key affinity buys: every instance caches on its own, so a key
the mesh always sends to one instance waits for the backend (``--miss-ms``)
once per ``--ttl``, while a key spread over N instances waits up to N times.

Run: ``python -m ringmesh.cache --port 0 --instance NAME``; prints one JSON
line with the bound port once serving, and one with the cache's counters
when it stops. Serves reflection and health like a real app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from proto import cache_pb2, cache_pb2_grpc
from ringmesh.demo import abort_if_asked, signalled, start_app


def backend_value(key: str) -> str:
    """What the backend holds for a key nobody has Put: deterministic, so a reply shows
    whether it came from this instance's Puts or from the backend itself."""
    return f"value-of-{key}"


@dataclass(frozen=True)
class Entry:
    """A key's value as this instance knows it."""

    value: str
    version: int  # Puts of the key on this instance so far; 0: the backend's own value
    filled_at: float  # the store's clock when the value entered the cache


class CacheStore:
    """An LRU cache of at most ``capacity`` entries, each valid ``ttl`` seconds after it was
    filled, in front of this instance's backend store (the values Put here, by version).

    Synchronous, with an injectable clock, so eviction and expiry are tested without
    sleeping. The backend's slowness is not in here: the servicer waits between a miss
    (``cached`` returning None) and ``load``, so that concurrent misses overlap.
    """

    def __init__(
        self, capacity: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 entry, got {capacity}")
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"ttl must be a number of seconds > 0, got {ttl}")
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._cache: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._backend: dict[str, tuple[str, int]] = {}  # key -> (value, version)
        self.hits = 0
        self.misses = 0
        self.evictions = 0  # entries dropped to stay within capacity
        self.expirations = 0  # entries found too old (each also a miss)

    def cached(self, key: str) -> Entry | None:
        """The key's entry if it is cached and fresh (it becomes the most recently used);
        None is a miss, the caller then waits for the backend and calls ``load``."""
        entry = self._cache.get(key)
        if entry is not None and self._clock() - entry.filled_at >= self.ttl:
            del self._cache[key]
            self.expirations += 1
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._cache.move_to_end(key)
        self.hits += 1
        return entry

    def load(self, key: str) -> Entry:
        """Fill the cache from the backend: the key's last Put here, else its backend value.

        Read when the wait for the backend is over, so a Put made meanwhile is not undone."""
        value, version = self._backend.get(key, (backend_value(key), 0))
        return self._fill(key, value, version)

    def put(self, key: str, value: str) -> Entry:
        """Write the backend and the cache; the key's version goes up by one."""
        _, version = self._backend.get(key, ("", 0))
        self._backend[key] = (value, version + 1)
        return self._fill(key, value, version + 1)

    def counters(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "entries": len(self._cache),
        }

    def _fill(self, key: str, value: str, version: int) -> Entry:
        entry = Entry(value, version, self._clock())
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
            self.evictions += 1
        return entry


async def _asked_delay_ms(context: grpc.aio.ServicerContext) -> int:
    """Test hook: ``x-delay-ms: N`` delays the call by N ms (a whole number, or the call
    fails with INVALID_ARGUMENT rather than silently not being slow)."""
    metadata = context.invocation_metadata() or ()
    text = next((str(v) for k, v in metadata if k == "x-delay-ms"), "0")
    if not (text.isascii() and text.isdigit()):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"x-delay-ms must be a whole number of milliseconds, got {text!r}",
        )
    return int(text)


class CacheService(cache_pb2_grpc.CacheServicer):
    """The handlers: a CacheStore, the backend's wait on a miss, and Watch subscriptions."""

    def __init__(
        self,
        instance: str,
        store: CacheStore,
        *,
        miss_ms: float,
        slow_ms: float,
        fail_rate: float,
    ) -> None:
        self.instance = instance
        self.store = store
        self.miss_ms = miss_ms
        self.slow_ms = slow_ms
        self.fail_rate = fail_rate
        self._rng = random.Random()
        # Per key, one queue per open Watch; None in a queue ends that stream.
        self._watchers: dict[str, set[asyncio.Queue[Entry | None]]] = {}
        self._stopping = False

    async def Get(
        self, request: cache_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.GetReply:
        await self._misbehave(context)
        entry, hit = await self._read(request.key)
        return cache_pb2.GetReply(
            key=request.key,
            value=entry.value,
            hit=hit,
            instance=self.instance,
            version=entry.version,
        )

    async def Put(
        self, request: cache_pb2.PutRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.PutReply:
        await self._misbehave(context)
        entry = self.store.put(request.key, request.value)
        for queue in self._watchers.get(request.key, ()):
            queue.put_nowait(entry)
        return cache_pb2.PutReply(instance=self.instance, version=entry.version)

    async def Watch(
        self, request: cache_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cache_pb2.WatchEvent]:
        await self._misbehave(context)
        if self._stopping:
            await self._abort_stopping(context)
        key = request.key
        queue: asyncio.Queue[Entry | None] = asyncio.Queue()
        # Subscribed before the first read: a Put while that read waits for the backend
        # is then in the first event, or queued, never lost; versions drop the repeat.
        watchers = self._watchers.setdefault(key, set())
        watchers.add(queue)
        try:
            entry: Entry | None
            entry, _hit = await self._read(key)
            sent = -1
            while entry is not None:
                if entry.version > sent:
                    yield cache_pb2.WatchEvent(
                        key=key, value=entry.value, version=entry.version, instance=self.instance
                    )
                    sent = entry.version
                entry = await queue.get()
            await self._abort_stopping(context)
        finally:
            watchers.discard(queue)
            if not watchers:
                del self._watchers[key]

    def stop(self) -> None:
        """End every Watch with UNAVAILABLE (a watcher re-watches the key's next owner),
        since these streams never end by themselves and the server's stop would wait out
        its whole grace for them."""
        self._stopping = True
        for queues in self._watchers.values():
            for queue in queues:
                queue.put_nowait(None)

    async def _abort_stopping(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"cache {self.instance} is stopping")

    async def _read(self, key: str) -> tuple[Entry, bool]:
        """The key's entry and whether it was a hit; a miss waits for the backend."""
        entry = self.store.cached(key)
        if entry is not None:
            return entry, True
        await asyncio.sleep(self.miss_ms / 1000)
        return self.store.load(key), False

    async def _misbehave(self, context: grpc.aio.ServicerContext) -> None:
        """Slow or failing on demand: ``--slow-ms`` and ``x-delay-ms`` delay the call,
        ``--fail-rate`` fails that share of calls with UNAVAILABLE, ``x-abort`` as asked."""
        delay_ms = self.slow_ms + await _asked_delay_ms(context)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        if self._rng.random() < self.fail_rate:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"cache {self.instance} fails a share of {self.fail_rate:g} of calls (--fail-rate)",
            )
        await abort_if_asked(context)


@dataclass(frozen=True)
class CacheOptions:
    host: str
    port: int
    instance: str
    miss_ms: float
    capacity: int
    ttl: float
    slow_ms: float
    fail_rate: float


async def serve(options: CacheOptions) -> None:
    store = CacheStore(options.capacity, options.ttl)
    service = CacheService(
        options.instance,
        store,
        miss_ms=options.miss_ms,
        slow_ms=options.slow_ms,
        fail_rate=options.fail_rate,
    )
    server = await start_app(
        options.host,
        options.port,
        name="cache",
        add=lambda s: cache_pb2_grpc.add_CacheServicer_to_server(service, s),
        services=(cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name,),
        instance=options.instance,
    )
    await signalled()
    service.stop()
    await server.stop(5)
    stopped = {"event": "stopped", "instance": options.instance, **store.counters()}
    print(json.dumps(stopped), flush=True)


def _number(text: str) -> float:
    """``text`` as a finite float, else nan (which every bound below rejects)."""
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def _milliseconds(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds >= 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return value


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty name")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ringmesh.cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--port", type=_port, default=0, help="0: any free port")
    parser.add_argument("--instance", type=_name, required=True, help="named in every reply")
    parser.add_argument(
        "--miss-ms", type=_milliseconds, default=4.0, help="the backend's wait on a cache miss"
    )
    parser.add_argument("--capacity", type=_count, default=1000, help="cached entries (LRU)")
    parser.add_argument(
        "--ttl", type=_seconds, default=10.0, help="seconds an entry stays valid once filled"
    )
    parser.add_argument(
        "--slow-ms", type=_milliseconds, default=0.0, help="a delay added to every call"
    )
    parser.add_argument(
        "--fail-rate",
        type=_fraction,
        default=0.0,
        help="the share of calls failed with UNAVAILABLE",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    asyncio.run(serve(CacheOptions(**vars(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
