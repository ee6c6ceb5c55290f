"""BoundedRing and Peer: ring invariants, minimal disruption, bounded loads, pick-two."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sidecar.ring import DEFAULT_LOAD_FACTOR, BoundedRing, Peer

KEYS_10K = [f"key-{i}" for i in range(10_000)]


def peer(name: str, weight: int = 1) -> Peer:
    return Peer(id=name, address=f"{name}.svc:50051", weight=weight)


def peers(*names: str) -> list[Peer]:
    return [peer(n) for n in names]


def owners(ring: BoundedRing, keys: list[str]) -> dict[str, str]:
    result = {}
    for key in keys:
        owner = ring.owner(key)
        assert owner is not None
        result[key] = owner.id
    return result


def exact_bound(ring: BoundedRing, p: Peer, total_before: int) -> int:
    """The contract's bound computed exactly: ceil(1.25 x (total + 1) x weight / total weight)."""
    total_weight = sum(q.weight for q in ring.peers.values())
    return math.ceil(
        Fraction(DEFAULT_LOAD_FACTOR) * (total_before + 1) * Fraction(p.weight, total_weight)
    )


def zipf_sampler(rng: random.Random, n: int, s: float) -> list[str]:
    """A Zipf(s) draw over ``n`` keys: key k has weight 1/k^s (k1 hottest)."""
    cum: list[float] = list(itertools.accumulate(1 / k**s for k in range(1, n + 1)))
    population = [f"k{k}" for k in range(1, n + 1)]
    return rng.choices(population, cum_weights=cum, k=50_000)


# -- strategies -------------------------------------------------------------------

peer_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10)
peer_sets = st.lists(
    st.builds(peer, peer_ids, st.integers(min_value=1, max_value=3)),
    min_size=1,
    max_size=7,
    unique_by=lambda p: p.id,
)
key_lists = st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=60, unique=True)


# -- owner and order ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(peer_sets, key_lists)
def test_owner_is_first_of_order_and_order_is_a_permutation(
    ps: list[Peer], keys: list[str]
) -> None:
    ring = BoundedRing(ps)
    assert len(ring) == len(ps)
    for key in keys:
        order = ring.order(key)
        assert order[0] == ring.owner(key)
        assert sorted(p.id for p in order) == sorted(p.id for p in ps)
        assert len({p.id for p in order}) == len(order)
        assert set(order) == set(ps)  # the Peer values themselves, not copies with other fields


def test_ring_is_deterministic_across_builds_and_input_order() -> None:
    ps = peers("a", "b", "c", "d")
    one = BoundedRing(ps)
    other = BoundedRing(reversed(ps))
    for key in KEYS_10K[:500]:
        assert one.order(key) == other.order(key)


def test_single_peer_owns_everything_and_empty_ring_owns_nothing() -> None:
    solo = BoundedRing([peer("only")])
    assert all(solo.owner(k) == peer("only") for k in KEYS_10K[:100])
    assert solo.order("x") == [peer("only")]
    assert solo.shares() == {"only": pytest.approx(1.0)}

    empty = BoundedRing([])
    assert len(empty) == 0
    assert empty.owner("x") is None
    assert empty.order("x") == []
    assert empty.shares() == {}


def test_load_factor_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="load factor"):
        BoundedRing(peers("a"), load_factor=0.99)


def test_keys_spread_over_all_peers() -> None:
    ring = BoundedRing(peers("a", "b", "c", "d"))
    counts = Counter(owners(ring, KEYS_10K).values())
    assert set(counts) == {"a", "b", "c", "d"}
    for count in counts.values():
        assert 1_500 < count < 3_500  # 2,500 each on average, 160 vnodes


# -- minimal disruption ------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "added"),
    [
        (("a", "b", "c"), "d"),
        (("a",), "b"),
        (("svc-0", "svc-1", "svc-2", "svc-3", "svc-4", "svc-5", "svc-6"), "svc-7"),
    ],
)
def test_adding_a_peer_moves_only_keys_to_it(before: tuple[str, ...], added: str) -> None:
    old = owners(BoundedRing(peers(*before)), KEYS_10K)
    new = owners(BoundedRing(peers(*before, added)), KEYS_10K)
    moved = [k for k in KEYS_10K if old[k] != new[k]]
    assert moved, "the added peer took no key at all"
    assert all(new[k] == added for k in moved)
    # And it took about its fair share: 1/(n+1) of the keys.
    expected = len(KEYS_10K) / (len(before) + 1)
    assert 0.6 * expected < len(moved) < 1.4 * expected


@pytest.mark.parametrize(
    ("before", "removed"),
    [
        (("a", "b", "c", "d"), "b"),
        (("a", "b"), "a"),
        (("svc-0", "svc-1", "svc-2", "svc-3", "svc-4", "svc-5", "svc-6"), "svc-3"),
    ],
)
def test_removing_a_peer_moves_only_its_keys(before: tuple[str, ...], removed: str) -> None:
    old_ring = BoundedRing(peers(*before))
    new_ring = BoundedRing(peers(*(n for n in before if n != removed)))
    old = owners(old_ring, KEYS_10K)
    new = owners(new_ring, KEYS_10K)
    moved = {k for k in KEYS_10K if old[k] != new[k]}
    assert moved == {k for k in KEYS_10K if old[k] == removed}
    # A removed owner's keys go to its first failover peer: the failover order is honest.
    for key in list(moved)[:500]:
        assert new[key] == old_ring.order(key)[1].id


@settings(max_examples=50, deadline=None)
@given(peer_sets, peer_ids, key_lists)
def test_property_add_then_remove_peer(ps: list[Peer], extra_id: str, keys: list[str]) -> None:
    assume(all(p.id != extra_id for p in ps))
    extra = peer(extra_id, 2)
    small = BoundedRing(ps)
    big = BoundedRing([*ps, extra])
    for key in keys:
        before, after = small.owner(key), big.owner(key)
        # Adding: a key moves only to the added peer.  Removing (big -> small):
        # only the removed peer's keys move.
        if before != after:
            assert after == extra
        if after != extra:
            assert before == after
        # The failover order of the others is unchanged by the extra peer.
        assert [p for p in big.order(key) if p != extra] == small.order(key)


# -- bounded loads -----------------------------------------------------------------


def test_no_load_choose_is_the_owner() -> None:
    ring = BoundedRing([peer("a"), peer("b", 2), peer("c"), peer("d", 3)])
    for key in KEYS_10K[:2_000]:
        assert ring.choose(key, {}) == ring.owner(key)


@settings(max_examples=60, deadline=None)
@given(peer_sets, key_lists)
def test_property_no_load_choose_is_the_owner(ps: list[Peer], keys: list[str]) -> None:
    ring = BoundedRing(ps, vnodes=40)
    zero = {p.id: 0 for p in ps}
    for key in keys:
        assert ring.choose(key, {}) == ring.owner(key)
        assert ring.choose(key, zero) == ring.owner(key)


def test_choose_skips_a_full_owner_to_the_next_peer_in_ring_order() -> None:
    ring = BoundedRing(peers("a", "b", "c", "d"))
    key = "hot"
    order = ring.order(key)
    # total 8 in flight: each peer may hold ceil(1.25 * 9 / 4) = 3 after one more call.
    inflight = {order[0].id: 3, order[1].id: 3, order[2].id: 2, order[3].id: 0}
    assert ring.capacity(order[0], 8) == 3
    assert ring.choose(key, inflight) == order[2]
    # total 15: ceil(1.25 * 16 / 4) = 5, so the first three are full.
    inflight = {order[0].id: 5, order[1].id: 5, order[2].id: 5, order[3].id: 0}
    assert ring.choose(key, inflight) == order[3]
    # A missing entry counts as idle.
    del inflight[order[3].id]
    assert ring.choose(key, inflight) == order[3]


def test_capacity_is_weighted() -> None:
    heavy, light = peer("heavy", 3), peer("light", 1)
    ring = BoundedRing([heavy, light])
    assert ring.capacity(heavy, 99) == math.ceil(1.25 * 100 * 3 / 4)  # 94
    assert ring.capacity(light, 99) == math.ceil(1.25 * 100 * 1 / 4)  # 32
    assert ring.capacity(light, 0) == 1  # an idle mesh always takes a call


def _assign(ring: BoundedRing, key: str, inflight: dict[str, int]) -> tuple[Peer, int]:
    total_before = sum(inflight.values())
    chosen = ring.choose(key, inflight)
    # Everything ahead of the chosen peer in ring order was full: choose() is
    # "the first peer in ring order from the key below its bound".
    for ahead in ring.order(key):
        if ahead == chosen:
            break
        assert inflight[ahead.id] >= ring.capacity(ahead, total_before)
    inflight[chosen.id] += 1
    return chosen, total_before


def test_bounded_loads_closed_system_with_zipf_hot_keys() -> None:
    rng = random.Random(20240611)
    ring = BoundedRing([peer(f"p{i}", weight=2 if i in (0, 3) else 1) for i in range(8)])
    draws = iter(zipf_sampler(rng, 1000, 1.1))
    inflight = {p: 0 for p in ring.peers}
    calls: list[str] = []
    spilled = assigned = 0
    population = 120
    for step in range(12_000):
        if step % 3_000 == 0:
            population = rng.choice([20, 120, 400])
        if calls and (len(calls) >= population or rng.random() < 0.45):
            done = calls.pop(rng.randrange(len(calls)))
            inflight[done] -= 1
            continue
        key = next(draws)
        chosen, total_before = _assign(ring, key, inflight)
        calls.append(chosen.id)
        assigned += 1
        assert inflight[chosen.id] <= ring.capacity(chosen, total_before), (step, key)
        if chosen != ring.owner(key):
            spilled += 1
    assert sum(inflight.values()) == len(calls)
    # The hot keys really overflowed their owners, so the bound was exercised...
    assert spilled > assigned // 20
    # ...and most calls still went to their owner (the point of consistent hashing).
    assert spilled < assigned // 2


def test_bounded_loads_hold_for_every_peer_while_calls_only_arrive() -> None:
    # Without completions the bound holds for every peer, not only the chosen
    # one (completions can lower the average below what a peer already holds).
    rng = random.Random(7)
    ring = BoundedRing([peer(f"p{i}", weight=1 + i % 2) for i in range(6)])
    inflight = {p: 0 for p in ring.peers}
    served_hottest: set[str] = set()
    for key in zipf_sampler(rng, 1000, 1.1)[:3_000]:
        chosen, total_before = _assign(ring, key, inflight)
        for p in ring.peers.values():
            assert inflight[p.id] <= ring.capacity(p, total_before)
        if key == "k1":
            served_hottest.add(chosen.id)
    # The hottest key is ~1/6 of the calls: more than its owner may take, so it spread.
    assert len(served_hottest) > 1


def test_capacity_is_the_exact_bound() -> None:
    a, b = peer("a", 3), peer("b", 14)
    ring = BoundedRing([a, b])
    key = next(k for k in KEYS_10K if ring.owner(k) == a)
    inflight = {"a": 15, "b": 52}
    chosen = ring.choose(key, inflight)
    assert inflight[chosen.id] + 1 <= exact_bound(ring, chosen, 67)


# -- shares ------------------------------------------------------------------------


def test_shares_sum_to_one_and_follow_weights() -> None:
    heavy = [peer(f"h{i}", 2) for i in range(4)]
    light = [peer(f"l{i}", 1) for i in range(4)]
    ring = BoundedRing([*heavy, *light])
    shares = ring.shares()
    assert set(shares) == set(ring.peers)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    heavy_share = sum(shares[p.id] for p in heavy)
    light_share = sum(shares[p.id] for p in light)
    assert heavy_share / light_share == pytest.approx(2.0, rel=0.15)


def test_weight_two_peer_gets_about_twice_the_keys_of_a_weight_one_peer() -> None:
    ring = BoundedRing([peer("big", 2), peer("small", 1)])
    shares = ring.shares()
    assert shares["big"] / shares["small"] == pytest.approx(2.0, rel=0.2)
    counts = Counter(owners(ring, KEYS_10K).values())
    assert counts["big"] / counts["small"] == pytest.approx(2.0, rel=0.2)
    # shares() describes what owner() does: the measured fractions agree with it.
    for name in ("big", "small"):
        assert counts[name] / len(KEYS_10K) == pytest.approx(shares[name], abs=0.02)


@settings(max_examples=40, deadline=None)
@given(peer_sets)
def test_property_shares_sum_to_one(ps: list[Peer]) -> None:
    shares = BoundedRing(ps, vnodes=40).shares()
    assert set(shares) == {p.id for p in ps}
    assert all(0.0 < s <= 1.0 for s in shares.values())
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)


# -- pick two ----------------------------------------------------------------------


def test_pick_two_returns_the_less_loaded_of_two() -> None:
    a, b = peer("a"), peer("b")
    ring = BoundedRing([a, b])
    rng = random.Random(1)
    for _ in range(50):
        assert ring.pick_two({"a": 5, "b": 2}, rng) == b
        assert ring.pick_two({"a": 0, "b": 1}, rng) == a
        assert ring.pick_two({"b": 1}, rng) == a  # a missing peer has nothing in flight


def test_pick_two_compares_load_per_weight() -> None:
    big, small = peer("big", 3), peer("small", 1)
    ring = BoundedRing([big, small])
    rng = random.Random(2)
    for _ in range(50):
        assert ring.pick_two({"big": 5, "small": 2}, rng) == big  # 5/3 < 2/1
        assert ring.pick_two({"big": 7, "small": 2}, rng) == small  # 7/3 > 2/1


def test_pick_two_never_picks_the_one_overloaded_peer_of_three() -> None:
    ring = BoundedRing(peers("a", "b", "c"))
    rng = random.Random(3)
    picks = Counter(ring.pick_two({"a": 100, "b": 1, "c": 1}, rng).id for _ in range(600))
    assert picks["a"] == 0
    assert picks["b"] > 150 and picks["c"] > 150  # both others are used


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=4), min_size=2, max_size=6),
    st.lists(st.integers(min_value=0, max_value=50), min_size=6, max_size=6),
    st.integers(min_value=0, max_value=2**32),
)
def test_property_pick_two_is_never_the_strictly_most_loaded(
    weights: list[int], loads: list[int], seed: int
) -> None:
    ps = [peer(f"p{i}", w) for i, w in enumerate(weights)]
    ring = BoundedRing(ps, vnodes=4)
    inflight = {p.id: loads[i] for i, p in enumerate(ps)}
    chosen = ring.pick_two(inflight, random.Random(seed))
    per_weight = {p.id: Fraction(inflight[p.id], p.weight) for p in ps}
    assert any(per_weight[chosen.id] <= per_weight[q.id] for q in ps if q != chosen)


def test_pick_two_with_one_peer_returns_it_and_empty_ring_raises() -> None:
    only = peer("only")
    assert BoundedRing([only]).pick_two({"only": 99}, random.Random(0)) == only
    with pytest.raises(LookupError):
        BoundedRing([]).pick_two({}, random.Random(0))
    with pytest.raises(LookupError):
        BoundedRing([]).choose("k", {})
