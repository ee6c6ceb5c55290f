"""The cache demo's store (ringmesh/cache.py): LRU, TTL from the fill, versions, counters."""

from __future__ import annotations

import math

import pytest

from ringmesh.cache import CacheStore, Entry, backend_value


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(capacity: int = 10, ttl: float = 10.0) -> tuple[CacheStore, FakeClock]:
    clock = FakeClock()
    return CacheStore(capacity, ttl, clock=clock), clock


def read(cache: CacheStore, key: str) -> tuple[Entry, bool]:
    """What the servicer does, minus the backend's wait: a hit, or a miss then a load."""
    entry = cache.cached(key)
    if entry is not None:
        return entry, True
    return cache.load(key), False


def test_a_miss_loads_the_backend_value_and_the_next_read_hits() -> None:
    cache, _ = store()
    assert cache.cached("k") is None
    entry = cache.load("k")
    assert (entry.value, entry.version) == (backend_value("k"), 0)
    assert cache.cached("k") == entry
    assert cache.counters() == {
        "hits": 1,
        "misses": 1,
        "evictions": 0,
        "expirations": 0,
        "entries": 1,
    }


def test_backend_values_are_deterministic_and_differ_per_key() -> None:
    assert backend_value("a") == backend_value("a")
    assert backend_value("a") != backend_value("b")


def test_an_entry_expires_ttl_seconds_after_it_was_filled_not_after_its_last_hit() -> None:
    cache, clock = store(ttl=10.0)
    cache.load("k")
    clock.now += 9.999
    assert cache.cached("k") is not None  # a hit: it does not extend the entry's life
    clock.now += 0.001
    assert cache.cached("k") is None
    assert cache.counters()["expirations"] == 1
    assert cache.counters()["misses"] == 1
    assert cache.counters()["entries"] == 0, "an expired entry is dropped, not kept"

    reloaded = cache.load("k")
    assert reloaded.filled_at == clock.now
    clock.now += 9.9
    assert cache.cached("k") == reloaded


def test_the_least_recently_used_entry_is_evicted_first() -> None:
    cache, _ = store(capacity=2)
    cache.load("a")
    cache.load("b")
    assert cache.cached("a") is not None  # now "b" is the least recently used
    cache.load("c")
    assert cache.counters()["evictions"] == 1
    assert cache.counters()["entries"] == 2
    assert cache.cached("b") is None
    assert cache.cached("a") is not None
    assert cache.cached("c") is not None


def test_reloading_a_cached_key_does_not_evict_another() -> None:
    cache, _ = store(capacity=2)
    cache.load("a")
    cache.load("b")
    cache.load("a")  # two concurrent misses of "a" both load it
    assert cache.counters()["evictions"] == 0
    assert cache.cached("b") is not None


def test_put_versions_count_per_key_and_the_cache_serves_the_new_value() -> None:
    cache, _ = store()
    assert cache.put("k", "one").version == 1
    assert cache.put("k", "two").version == 2
    assert cache.put("other", "x").version == 1
    entry, hit = read(cache, "k")
    assert (entry.value, entry.version, hit) == ("two", 2, True)
    assert cache.counters()["misses"] == 0, "a Put fills the cache"


def test_the_backend_keeps_put_values_after_the_cache_forgets_them() -> None:
    cache, clock = store(capacity=1, ttl=5.0)
    cache.put("k", "mine")
    cache.load("other")  # evicts "k"
    entry, hit = read(cache, "k")
    assert (entry.value, entry.version, hit) == ("mine", 1, False)
    clock.now += 5.0
    entry, hit = read(cache, "k")
    assert (entry.value, entry.version, hit) == ("mine", 1, False)
    assert cache.put("k", "again").version == 2


def test_a_put_refreshes_the_entry_s_ttl() -> None:
    cache, clock = store(ttl=10.0)
    cache.load("k")
    clock.now += 8.0
    cache.put("k", "new")
    clock.now += 8.0
    entry = cache.cached("k")
    assert entry is not None and entry.value == "new"


def test_a_put_while_a_miss_waits_for_the_backend_is_not_undone_by_the_load() -> None:
    cache, _ = store()
    assert cache.cached("k") is None  # the miss; the servicer now waits for the backend
    cache.put("k", "written meanwhile")
    entry = cache.load("k")
    assert (entry.value, entry.version) == ("written meanwhile", 1)


@pytest.mark.parametrize(
    ("capacity", "ttl", "message"),
    [
        (0, 10.0, "capacity"),
        (-1, 10.0, "capacity"),
        (10, 0.0, "ttl"),
        (10, -1.0, "ttl"),
        (10, math.nan, "ttl"),
        (10, math.inf, "ttl"),
    ],
)
def test_a_store_refuses_a_capacity_or_ttl_it_cannot_honour(
    capacity: int, ttl: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CacheStore(capacity, ttl)
