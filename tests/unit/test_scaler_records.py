"""scaler/records.py: policy/, load/ and targets/ values: round trips, validation, garbage."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.errors import ConfigError, RecordError
from registry.scaling import (
    MAX_REPLICAS,
    LoadReport,
    Policy,
    Target,
)

POLICY: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 10,
    "metric": "inflight",
    "target": 5.0,
    "tolerance": 0.1,
    "scale_up_window_s": 0.0,
    "scale_down_window_s": 300.0,
    "mode": "reactive",
}
LOAD: dict[str, Any] = {
    "ts": 1700000000.5,
    "window_s": 5.0,
    "rps": 120.0,
    "inflight": 3.0,
    "error_rate": 0.01,
    "p50_ms": 2.5,
    "p99_ms": 40.0,
}
TARGET: dict[str, Any] = {
    "replicas": 5,
    "previous": 2,
    "reason": "inflight 12.5 > target 5 (x2.50): 2 -> 5",
    "metric": 12.5,
    "decided_at": 1700000000.0,
    "term": 7,
    "leader": "scaler-a",
}


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def changed(doc: dict[str, Any], **updates: Any) -> dict[str, Any]:
    return {**doc, **updates}


def without(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != name}


# -- round trips -----------------------------------------------------------------------


def test_policy_round_trip_is_compact_and_sorted() -> None:
    policy = Policy.from_json(raw(POLICY))
    assert policy == Policy(min_replicas=1, max_replicas=10, metric="inflight", target=5)
    assert policy.to_json() == (
        b'{"max_replicas":10,"metric":"inflight","min_replicas":1,"mode":"reactive",'
        b'"scale_down_window_s":300.0,"scale_up_window_s":0.0,"target":5.0,"tolerance":0.1}'
    )
    assert Policy.from_json(policy.to_json()) == policy


def test_policy_defaults_fill_missing_optional_fields() -> None:
    doc = {"min_replicas": 0, "max_replicas": 3, "metric": "rps", "target": 100}
    policy = Policy.from_json(raw(doc))
    assert (policy.tolerance, policy.scale_up_window_s, policy.scale_down_window_s) == (
        0.1,
        0.0,
        300.0,
    )
    assert policy.mode == "reactive"
    assert isinstance(policy.target, float)  # a JSON integer is stored as a number


def test_load_and_target_round_trip() -> None:
    load = LoadReport.from_json(raw(LOAD))
    assert load.rps == 120.0 and load.error_rate == 0.01
    assert LoadReport.from_json(load.to_json()) == load
    target = Target.from_json(raw(TARGET))
    assert (target.replicas, target.previous, target.term, target.leader) == (5, 2, 7, "scaler-a")
    assert Target.from_json(target.to_json()) == target
    assert json.loads(target.to_json()) == TARGET


def test_unknown_fields_are_ignored() -> None:
    assert Policy.from_json(raw(changed(POLICY, future="x"))) == Policy.from_json(raw(POLICY))


def test_load_value_reads_the_named_metric() -> None:
    load = LoadReport.from_json(raw(LOAD))
    assert (load.value("inflight"), load.value("rps"), load.value("p99_ms")) == (3.0, 120.0, 40.0)
    with pytest.raises(ValueError, match="unknown metric"):
        load.value("cpu")


# -- validation messages name the field ----------------------------------------------


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"min_replicas": -1}, "min_replicas must be an integer from 0 to 10000, got -1"),
        ({"max_replicas": 0}, "max_replicas must be an integer from 1 to 10000, got 0"),
        ({"max_replicas": MAX_REPLICAS + 1}, "max_replicas must be an integer from 1 to 10000"),
        (
            {"min_replicas": 5, "max_replicas": 3},
            r"min_replicas \(5\) must not exceed max_replicas \(3\)",
        ),
        ({"min_replicas": 1.5}, "min_replicas must be an integer"),
        ({"min_replicas": True}, "min_replicas must be an integer"),
        ({"metric": "cpu"}, "metric must be one of inflight, rps, p99_ms; got 'cpu'"),
        ({"target": 0}, "target must be a finite number > 0"),
        ({"target": -5}, "target must be a finite number > 0"),
        ({"target": float("nan")}, "target must be a finite number"),
        ({"target": float("inf")}, "target must be a finite number"),
        ({"target": "5"}, "target must be a finite number"),
        ({"tolerance": 1.0}, "tolerance must be a finite number >= 0 and < 1"),
        ({"tolerance": -0.1}, "tolerance must be a finite number >= 0 and < 1"),
        ({"scale_up_window_s": -1}, "scale_up_window_s must be a finite number >= 0 and <= 3600"),
        (
            {"scale_down_window_s": 3601},
            "scale_down_window_s must be a finite number >= 0 and <= 3600",
        ),
        ({"mode": "psychic"}, "mode must be one of reactive, predictive"),
    ],
)
def test_policy_validation_names_the_field(updates: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid policy: {message}"):
        Policy(**changed(POLICY, **updates))


def test_policy_edges_are_allowed() -> None:
    Policy(**changed(POLICY, min_replicas=0, max_replicas=1, tolerance=0.0))
    Policy(**changed(POLICY, min_replicas=MAX_REPLICAS, max_replicas=MAX_REPLICAS))
    Policy(**changed(POLICY, scale_up_window_s=3600, scale_down_window_s=0, tolerance=0.99))


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"rps": -1.0}, "rps must be a finite number >= 0"),
        ({"inflight": float("nan")}, "inflight must be a finite number"),
        ({"p99_ms": float("inf")}, "p99_ms must be a finite number"),
        ({"error_rate": 1.5}, "error_rate must be a finite number >= 0 and <= 1"),
        ({"ts": -1.0}, "ts must be a finite number >= 0"),
    ],
)
def test_load_validation(updates: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid load report: {message}"):
        LoadReport(**changed(LOAD, **updates))


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"replicas": -1}, "replicas must be an integer from 0 to 10000"),
        ({"previous": MAX_REPLICAS + 1}, "previous must be an integer from 0 to 10000"),
        ({"term": -3}, "term must be an integer from 0 to 9223372036854775807"),
        ({"term": 2**63}, "term must be an integer from 0 to 9223372036854775807"),
        ({"metric": float("nan")}, "metric must be a finite number"),
        ({"decided_at": float("inf")}, "decided_at must be a finite number"),
        ({"leader": 7}, "leader must be a string"),
    ],
)
def test_target_validation(updates: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid target: {message}"):
        Target(**changed(TARGET, **updates))


# -- garbage in etcd is a RecordError, never anything else ---------------------------

GARBAGE = [
    b"",
    b"not json",
    b"\xff\xfe\x00",
    b"[]",
    b'"policy"',
    b"null",
    b"[" * 100_000 + b"]" * 100_000,
    b'{"min_replicas": 1',
]


@pytest.mark.parametrize("blob", GARBAGE)
@pytest.mark.parametrize("record", [Policy, LoadReport, Target])
def test_garbage_is_a_record_error(record: type[Policy | LoadReport | Target], blob: bytes) -> None:
    with pytest.raises(RecordError):
        record.from_json(blob)


@pytest.mark.parametrize(
    "doc",
    [
        without(POLICY, "target"),
        without(POLICY, "metric"),
        changed(POLICY, target="5"),
        changed(POLICY, target=None),
        changed(POLICY, min_replicas=1.0),  # a count must be a JSON integer
        changed(POLICY, min_replicas=True),
        changed(POLICY, max_replicas=10**400),
        changed(POLICY, target=10**400),  # does not fit a float
        changed(POLICY, metric=["inflight"]),
        changed(POLICY, min_replicas=11),
        changed(POLICY, mode="manual"),
    ],
)
def test_malformed_policy_is_a_record_error(doc: dict[str, Any]) -> None:
    with pytest.raises(RecordError):
        Policy.from_json(raw(doc))


@pytest.mark.parametrize(
    "blob", [b'{"target": NaN}', b'{"target": Infinity}', b'{"target": 1e400}']
)
def test_non_finite_numbers_in_json_are_rejected(blob: bytes) -> None:
    doc = blob.replace(b"{", b'{"min_replicas":1,"max_replicas":2,"metric":"rps",', 1)
    with pytest.raises(RecordError, match="target"):
        Policy.from_json(doc)


@pytest.mark.parametrize("name", sorted(LOAD))
def test_every_load_field_is_required(name: str) -> None:
    with pytest.raises(RecordError, match=f"missing field '{name}'"):
        LoadReport.from_json(raw(without(LOAD, name)))


@pytest.mark.parametrize("name", sorted(TARGET))
def test_every_target_field_is_required(name: str) -> None:
    with pytest.raises(RecordError, match=f"missing field '{name}'"):
        Target.from_json(raw(without(TARGET, name)))


def test_record_error_message_says_what_was_wrong() -> None:
    with pytest.raises(RecordError, match="invalid load report: error_rate"):
        LoadReport.from_json(raw(changed(LOAD, error_rate=2)))
    with pytest.raises(RecordError, match="field 'replicas' has the wrong type"):
        Target.from_json(raw(changed(TARGET, replicas="5")))


# -- properties ----------------------------------------------------------------------

valid_policies = st.builds(
    lambda lo, extra, metric, target, tol, up, down, mode: Policy(
        min_replicas=lo,
        max_replicas=max(1, lo + extra),
        metric=metric,
        target=target,
        tolerance=tol,
        scale_up_window_s=up,
        scale_down_window_s=down,
        mode=mode,
    ),
    st.integers(0, 5000),
    st.integers(0, 5000),
    st.sampled_from(["inflight", "rps", "p99_ms"]),
    st.floats(min_value=1e-6, max_value=1e9),
    st.floats(min_value=0, max_value=0.999),
    st.floats(min_value=0, max_value=3600),
    st.floats(min_value=0, max_value=3600),
    st.sampled_from(["reactive", "predictive"]),
)


@settings(max_examples=100)
@given(valid_policies)
def test_any_valid_policy_round_trips(policy: Policy) -> None:
    assert Policy.from_json(policy.to_json()) == policy


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(sorted(POLICY | LOAD | TARGET)), children, max_size=8)
    ),
    max_leaves=20,
)


def one_field_changed(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    return st.tuples(st.sampled_from(sorted(base)), json_values).map(
        lambda kv: raw(changed(base, **{kv[0]: kv[1]}))
    )


@settings(max_examples=300)
@given(
    st.binary(max_size=64)
    | json_values.map(raw)
    | one_field_changed(POLICY)
    | one_field_changed(LOAD)
    | one_field_changed(TARGET)
)
def test_arbitrary_input_parses_or_is_a_record_error(blob: bytes) -> None:
    for record in (Policy, LoadReport, Target):
        with contextlib.suppress(RecordError):
            record.from_json(blob)


# -- hostile values: RecordError with one short line, never another exception -------


def assert_short_record_error(record: type[Policy | LoadReport | Target], blob: Any) -> None:
    try:
        record.from_json(blob)
    except RecordError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) <= 300, message[:400]
        return
    raise AssertionError(f"{record.__name__} parsed {blob!r:.80}")


HOSTILE_VALUES: list[Any] = [
    int("9" * 4300),  # the longest integer JSON can carry
    -int("9" * 4300),
    10**400,
    "x" * 1_000_000,
    "1" * 5000,
    [[[[[["nested"]]]]]],
    {"a": {"b": [1, None, {"c": float("nan")}]}},
    float("nan"),
    float("-inf"),
    None,
    True,
]


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=range(len(HOSTILE_VALUES)))
@pytest.mark.parametrize(
    ("record", "base"), [(Policy, POLICY), (LoadReport, LOAD), (Target, TARGET)]
)
def test_hostile_field_values_are_a_short_record_error(
    record: type[Policy | LoadReport | Target], base: dict[str, Any], value: Any
) -> None:
    for name in base:
        if record is Target and name in ("reason", "leader") and isinstance(value, str):
            continue  # any string is a valid reason or leader
        assert_short_record_error(record, raw(changed(base, **{name: value})))


@pytest.mark.parametrize("literal", [b"1" * 4301, b"-" + b"9" * 100_000, b"1e99999", b"NaN"])
@pytest.mark.parametrize(
    ("record", "base"), [(Policy, POLICY), (LoadReport, LOAD), (Target, TARGET)]
)
def test_hostile_number_literals_are_a_short_record_error(
    record: type[Policy | LoadReport | Target], base: dict[str, Any], literal: bytes
) -> None:
    for name in base:
        blob = raw(changed(base, **{name: "@"})).replace(b'"@"', literal)
        assert_short_record_error(record, blob)


@pytest.mark.parametrize("blob", [None, 42, ["{}"], {"target": 1}])
@pytest.mark.parametrize("record", [Policy, LoadReport, Target])
def test_what_is_not_text_is_a_record_error(
    record: type[Policy | LoadReport | Target], blob: Any
) -> None:
    assert_short_record_error(record, blob)


@pytest.mark.parametrize(
    "updates",
    [
        {"max_replicas": 10**5000},  # repr() of it raises ValueError
        {"target": 10**5000},
        {"metric": "m" * 1_000_000},
        {"min_replicas": [[[]]] * 10_000},
    ],
    ids=["huge-int", "huge-float", "huge-str", "big-list"],
)
def test_validation_of_hostile_values_is_a_short_config_error(updates: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        Policy(**changed(POLICY, **updates))
    assert "\n" not in str(info.value) and len(str(info.value)) <= 300
