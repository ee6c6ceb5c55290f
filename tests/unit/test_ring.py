"""BoundedRing and Peer: ring invariants and minimal disruption, through the data plane's
lookup on the exported ring (the bounded-load choice and P2C are tested in Rust)."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from uhashring import HashRing

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


def _uhashring(ps: list[Peer], vnodes: int = 160) -> HashRing:
    """The reference: uhashring itself, given the peers in the ring's order (by id)."""
    ordered = sorted(ps, key=lambda p: p.id)
    return HashRing({p.id: {"instance": p, "weight": p.weight, "vnodes": vnodes} for p in ordered})


def test_the_ring_looks_up_exactly_as_uhashring() -> None:
    """The data plane's ring gives uhashring's own owners, order and arcs."""
    ps = [peer(f"n{i}", weight=1 + i % 3) for i in range(10)]
    ring, reference = BoundedRing(ps), _uhashring(ps)
    for key in [*KEYS_10K[:2000], "", "ключ", "键", "a b"]:
        expected = [node["instance"] for node in reference.range(key)]
        assert ring.order(key) == expected
        assert ring.owner(key) == reference.get(key)["instance"]
    assert len(ring.lookup) == len(reference.get_points())


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=12), st.integers(min_value=1, max_value=3)),
        min_size=1,
        max_size=6,
        unique_by=lambda t: t[0],
    ),
    st.lists(st.text(max_size=10), min_size=1, max_size=10),
)
def test_property_the_ring_is_uhashrings_point_for_point(
    nodes: list[tuple[str, int]], keys: list[str]
) -> None:
    ps = [Peer(name, f"127.0.0.1:{1000 + i}", weight) for i, (name, weight) in enumerate(nodes)]
    ring, reference = BoundedRing(ps, vnodes=8), _uhashring(ps, vnodes=8)
    assert len(ring.lookup) == len(reference.get_points())
    for key in keys:
        assert [p.id for p in ring.order(key)] == [n["instance"].id for n in reference.range(key)]
