"""The pure core of registry/election.py: the candidate queue and the lease budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.election import Candidate, LeaseBudget, election_prefix, queue, standing
from registry.errors import InvalidName, MeshError
from registry.etcd import KeyValue
from registry.keys import KeyLayout

PREFIX = "/ringmesh/v1/election/scaler/"


def kv(lease: int, create_revision: int, value: bytes = b"scaler") -> KeyValue:
    return KeyValue(
        key=f"{PREFIX}{lease:x}",
        value=value,
        create_revision=create_revision,
        mod_revision=create_revision,
        lease=lease,
    )


def test_election_prefix_follows_the_layout() -> None:
    assert election_prefix(KeyLayout("/ringmesh/v1")) == PREFIX
    assert election_prefix(KeyLayout("/x"), "other") == "/x/election/other/"
    with pytest.raises(InvalidName):
        election_prefix(KeyLayout("/x"), "Not/A/Name")


def test_queue_orders_by_create_revision_not_by_key() -> None:
    # Lease ids sort one way as keys, the other way by create revision.
    found = queue([kv(0xFF, 9, b"late"), kv(0x01, 12, b"later"), kv(0xAA, 4, b"first")])
    assert [(c.id, c.term) for c in found] == [("first", 4), ("late", 9), ("later", 12)]
    assert found[0] == Candidate("first", f"{PREFIX}aa", 4, 0xAA)


def test_queue_keeps_an_undecodable_id_readable() -> None:
    (only,) = queue([kv(1, 3, b"\xff\xfe")])
    assert only.id == "\ufffd\ufffd"


def test_standing_leads_waits_on_the_key_just_ahead_or_is_gone() -> None:
    candidates = queue([kv(1, 4), kv(2, 9), kv(3, 12), kv(4, 20)])
    first, second, third, fourth = candidates

    lead = standing(candidates, first.key, first.term)
    assert lead is not None and lead.leading and lead.ahead is None
    for me, ahead in ((second, first), (third, second), (fourth, third)):
        place = standing(candidates, me.key, me.term)
        assert place is not None and not place.leading and place.ahead == ahead

    # Our key is gone, or it was deleted and created again (a new create revision).
    assert standing(candidates, f"{PREFIX}99", 30) is None
    assert standing(candidates, second.key, 5) is None
    # The one ahead left: the next one ahead is the greatest lower create revision.
    without_second = [c for c in candidates if c != second]
    place = standing(without_second, third.key, third.term)
    assert place is not None and place.ahead == first


@given(st.sets(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=30))
def test_exactly_one_leads_and_every_other_waits_on_its_predecessor(revisions: set[int]) -> None:
    candidates = queue([kv(lease, rev) for lease, rev in enumerate(sorted(revisions), start=1)])
    places = [standing(candidates, c.key, c.term) for c in candidates]
    assert all(p is not None for p in places)
    assert sum(1 for p in places if p is not None and p.leading) == 1
    for before, place in zip(candidates, places[1:], strict=False):
        assert place is not None and place.ahead == before


def test_budget_counts_from_when_the_refresh_was_sent() -> None:
    budget = LeaseBudget(ttl=10, margin=2.5)
    assert not budget.valid(0.0)  # nothing granted yet
    assert budget.span == 7.5 and budget.refresh_interval == 2.5

    budget.renewed(sent_at=100.0, ttl=10)
    assert budget.valid_until == 107.5
    assert budget.valid(107.49) and not budget.valid(107.5)
    assert budget.left(105.0) == 2.5

    # A refresh sent earlier that answers late never shortens the budget.
    budget.renewed(sent_at=99.0, ttl=10)
    assert budget.valid_until == 107.5
    # etcd granting more than asked does not stretch it; less does shorten it.
    budget.renewed(sent_at=101.0, ttl=60)
    assert budget.valid_until == 108.5
    budget.renewed(sent_at=102.0, ttl=3)
    assert budget.valid_until == 108.5  # 102 + 3 - 2.5 is earlier: keep the later one


def test_budget_steps_down_before_the_lease_could_expire() -> None:
    for ttl, margin in ((2, 0.5), (3, 0.75), (10, 2.5), (10, 0.0)):
        budget = LeaseBudget(ttl=ttl, margin=margin)
        budget.renewed(sent_at=50.0, ttl=ttl)
        # etcd expires the lease at the earliest TTL after it saw the refresh (>= sent_at).
        assert budget.valid_until <= 50.0 + ttl
        assert not budget.valid(50.0 + ttl)
        # Two refreshes may fail in a row before the budget runs out.
        assert 3 * budget.refresh_interval <= budget.span


@pytest.mark.parametrize(("ttl", "margin"), [(1, 0.1), (0, 0.0), (5, -1.0), (5, 5.0), (5, 6.0)])
def test_budget_rejects_bad_settings(ttl: int, margin: float) -> None:
    with pytest.raises(MeshError):
        LeaseBudget(ttl=ttl, margin=margin)
