"""registry/authz.py: the ``authz/<service>`` record, the check, and the compare-and-swap loop."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.authz import (
    DENY_ALL,
    AuthzRecord,
    AuthzWatch,
    change_authz,
    permits,
)
from registry.errors import InvalidName, RecordError, WriteConflict
from registry.etcd import EtcdClient, KeyValue, WatchEvent
from registry.keys import KeyLayout

# -- the record ----------------------------------------------------------------------


def test_to_json_is_sorted_unique_and_compact() -> None:
    record = AuthzRecord(frozenset({"orders", "checkout", "a-1"}))
    assert record.to_json() == b'{"allow":["a-1","checkout","orders"]}'
    assert AuthzRecord().to_json() == b'{"allow":[]}'
    assert AuthzRecord.from_json(record.to_json()) == record


def test_from_json_accepts_any_order_duplicates_and_extra_fields() -> None:
    raw = b'{"allow": ["orders", "checkout", "orders"], "note": "set by ops", "v": 2}'
    assert AuthzRecord.from_json(raw).allow == {"checkout", "orders"}


def test_an_empty_list_allows_nobody() -> None:
    record = AuthzRecord.from_json(b'{"allow": []}')
    assert record.allow == DENY_ALL
    assert not record.allows("orders")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b'["orders"]', "expected a JSON object"),
        (b"null", "expected a JSON object"),
        (b"{}", "missing field 'allow'"),
        (b'{"allow": null}', "list of strings"),
        (b'{"allow": "orders"}', "list of strings"),
        (b'{"allow": {"orders": true}}', "list of strings"),
        (b'{"allow": ["orders", 7]}', "list of strings"),
        (b'{"allow": [["orders"]]}', "list of strings"),
        (b'{"allow": ["Orders"]}', "invalid service name"),
        (b'{"allow": ["orders/v2"]}', "invalid service name"),
        (b'{"allow": [""]}', "invalid service name"),
        (json.dumps({"allow": ["x" * 100_000]}).encode(), "invalid service name"),
    ],
)
def test_malformed_records_are_a_short_record_error(raw: bytes, message: str) -> None:
    with pytest.raises(RecordError, match=message) as caught:
        AuthzRecord.from_json(raw)
    text = str(caught.value)
    assert "\n" not in text and len(text) <= 300


def test_the_constructor_validates_callers() -> None:
    with pytest.raises(InvalidName, match="invalid service name"):
        AuthzRecord(frozenset({"Bad_Name"}))
    with pytest.raises(InvalidName, match="collection"):
        AuthzRecord(cast(Any, "orders"))  # a string is not a list of one name
    assert AuthzRecord(cast(Any, ["b", "a", "b"])).allow == {"a", "b"}


def test_allowing_and_denying_return_new_records() -> None:
    empty = AuthzRecord()
    one = empty.allowing("orders")
    assert one.allow == {"orders"} and empty.allow == DENY_ALL
    assert one.allowing("orders") == one
    two = one.allowing("checkout")
    assert two.denying("orders").allow == {"checkout"}
    assert two.denying("nobody") == two
    with pytest.raises(InvalidName):
        two.allowing("NOT-A-LABEL")


def test_permits_no_rule_lets_everyone_in() -> None:
    rules = {"payments": frozenset({"orders"}), "vault": DENY_ALL}
    assert permits(rules, "payments", "orders")
    assert not permits(rules, "payments", "checkout")
    assert not permits(rules, "vault", "orders")
    assert permits(rules, "catalog", "anyone")  # no record


# Hypothesis: whatever is stored, the parser returns a valid record or a RecordError.

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["orders", "a", "x" * 63, "x" * 64, "-a", "a-", "A", "é"])
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.just("allow"), children, max_size=3)
    ),
    max_leaves=12,
)
allow_docs = st.dictionaries(
    st.sampled_from(["allow", "extra"]),
    json_values | st.lists(json_leaves, max_size=6),
    max_size=2,
)


def _parses_or_is_a_record_error(raw: bytes) -> None:
    try:
        record = AuthzRecord.from_json(raw)
    except RecordError as exc:
        text = str(exc)
        assert "\n" not in text and len(text) <= 300, text[:400]
    else:
        assert all(isinstance(caller, str) for caller in record.allow)
        stored = json.loads(record.to_json())
        assert stored == {"allow": sorted(record.allow)}
        assert AuthzRecord.from_json(record.to_json()) == record


@settings(max_examples=200, deadline=None)
@given(json_values | allow_docs)
def test_any_json_parses_or_is_a_record_error(value: Any) -> None:
    _parses_or_is_a_record_error(json.dumps(value, allow_nan=True).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
def test_any_bytes_parse_or_are_a_record_error(raw: bytes) -> None:
    _parses_or_is_a_record_error(raw)


# -- the compare-and-swap loop, against a fake etcd ------------------------------------


class FakeEtcd:
    """get and put_if_unchanged over a dict, with revisions; ``steal`` writes land first."""

    def __init__(self) -> None:
        self.revision = 1
        self.kvs: dict[str, KeyValue] = {}
        self.steals: list[bytes] = []  # written by "someone else" just before each CAS
        self.cas_calls = 0

    def _put(self, key: str, value: bytes) -> None:
        self.revision += 1
        old = self.kvs.get(key)
        created = old.create_revision if old else self.revision
        self.kvs[key] = KeyValue(key, value, created, self.revision, 0)

    async def get(self, key: str) -> KeyValue | None:
        return self.kvs.get(key)

    async def put_if_unchanged(
        self, key: str, value: bytes, *, lease: int | None, mod_revision: int
    ) -> bool:
        self.cas_calls += 1
        if self.steals:
            self._put(key, self.steals.pop(0))
        current = self.kvs.get(key)
        if (current.mod_revision if current else 0) != mod_revision:
            return False
        self._put(key, value)
        return True


async def _no_sleep(_seconds: float) -> None:
    return None


def _change(fake: FakeEtcd, change: Any, **kwargs: Any) -> tuple[AuthzRecord, bool]:
    layout = KeyLayout()
    return asyncio.run(
        change_authz(cast(EtcdClient, fake), layout, "payments", change, sleep=_no_sleep, **kwargs)
    )


def test_change_creates_then_updates_then_skips_a_no_op() -> None:
    fake = FakeEtcd()
    key = KeyLayout().authorization("payments")
    record, wrote = _change(fake, lambda r: (r or AuthzRecord()).allowing("orders"))
    assert wrote and record.allow == {"orders"}
    assert fake.kvs[key].value == b'{"allow":["orders"]}'
    record, wrote = _change(fake, lambda r: r.allowing("checkout"))
    assert wrote and fake.kvs[key].value == b'{"allow":["checkout","orders"]}'
    before = fake.revision
    record, wrote = _change(fake, lambda r: r.allowing("orders"))
    assert not wrote and fake.revision == before  # nothing to change: nothing written


def test_a_lost_race_is_redone_on_the_new_value() -> None:
    fake = FakeEtcd()
    fake.steals = [b'{"allow":["checkout"]}', b'{"allow":["checkout","search"]}']
    record, wrote = _change(fake, lambda r: (r or AuthzRecord()).allowing("orders"))
    assert wrote and record.allow == {"checkout", "search", "orders"}  # nobody's update lost
    assert fake.cas_calls == 3


def test_a_race_lost_every_time_is_a_write_conflict() -> None:
    fake = FakeEtcd()
    fake.steals = [b'{"allow":["x%d"]}' % i for i in range(10)]
    with pytest.raises(WriteConflict, match="kept changing"):
        _change(fake, lambda r: (r or AuthzRecord()).allowing("orders"), attempts=5)
    assert fake.cas_calls == 5


def test_a_malformed_stored_record_is_left_alone() -> None:
    fake = FakeEtcd()
    key = KeyLayout().authorization("payments")
    fake._put(key, b'{"allow": "everyone"}')
    with pytest.raises(RecordError, match=f"{key} does not parse"):
        _change(fake, lambda r: (r or AuthzRecord()).allowing("orders"))
    assert fake.kvs[key].value == b'{"allow": "everyone"}' and fake.cas_calls == 0


# -- what AuthzWatch delivers, event by event (no etcd: its parser and publisher) -------


def test_watch_delivers_the_whole_map_only_when_it_changes() -> None:
    layout = KeyLayout()
    seen: list[dict[str, frozenset[str]]] = []
    watch = AuthzWatch(cast(EtcdClient, None), layout, lambda rules: seen.append(dict(rules)))
    inner = watch._watch
    inner._apply(WatchEvent(layout.authorization("a"), b'{"allow":["x"]}', 5, 0))
    inner._apply(WatchEvent(layout.authorization("a"), b'{"allow":["x","x"]}', 6, 0))  # same
    inner._apply(WatchEvent(layout.authorization("b"), b"garbage", 7, 0))  # fails closed
    inner._apply(WatchEvent(f"{layout.authorizations}Bad_Name", b'{"allow":[]}', 8, 0))
    inner._apply(WatchEvent(layout.authorization("a"), None, 9, 0))
    assert seen == [
        {"a": frozenset({"x"})},
        {"a": frozenset({"x"}), "b": DENY_ALL},
        {"b": DENY_ALL},
    ]
    assert dict(watch.rules) == {"b": DENY_ALL} and watch.revision == 9


def test_the_key_layout() -> None:
    layout = KeyLayout("/mesh")
    assert layout.authorizations == "/mesh/authz/"
    assert layout.authorization("payments") == "/mesh/authz/payments"
    assert layout.parse_last("/mesh/authz/payments", layout.authorizations) == "payments"
    for bad in ("/mesh/authz/Pay", "/mesh/authz/a/b", "/mesh/policy/payments"):
        with pytest.raises(InvalidName):
            layout.parse_last(bad, layout.authorizations)
    with pytest.raises(InvalidName):
        layout.authorization("no_underscores")
