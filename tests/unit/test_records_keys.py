"""registry/keys.py (names and the key layout) and registry/records.py (instance records)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.errors import ConfigError, InvalidName, RecordError
from registry.keys import (
    DEFAULT_PREFIX,
    KeyLayout,
    validate_instance_id,
    validate_service,
)
from registry.records import DRAINING, MAX_WEIGHT, SERVING, InstanceRecord, validate_weight

# -- service names -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "0", "echo", "echo-v2", "a-b-c", "9lives", "x" * 63, "a" + "-" * 61 + "b", "a--b"],
)
def test_valid_service_names(name: str) -> None:
    assert validate_service(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 64,
        "Echo",
        "ECHO",
        "-echo",
        "echo-",
        "-",
        "ec_ho",
        "echo.v2",
        "echo/v2",
        "echo v2",
        "\u00e9cho",  # accented
        "ech\u03bf",  # a Greek omicron that looks like an o
        "echo\n",
        "\necho",
    ],
)
def test_invalid_service_names(name: str) -> None:
    with pytest.raises(InvalidName, match="invalid service name") as info:
        validate_service(name)
    assert isinstance(info.value, ConfigError)  # a usage error: exit 2


@settings(max_examples=200)
@given(st.text(max_size=70))
def test_service_names_are_exactly_dns_labels(name: str) -> None:
    alphabet = set("abcdefghijklmnopqrstuvwxyz0123456789-")
    is_label = (
        0 < len(name) <= 63
        and set(name) <= alphabet
        and not name.startswith("-")
        and not name.endswith("-")
    )
    if is_label:
        assert validate_service(name) == name
    else:
        with pytest.raises(InvalidName):
            validate_service(name)


# -- instance ids ------------------------------------------------------------------


@pytest.mark.parametrize(
    "instance_id",
    ["a", "host-1", "Host_1.example-15002", "a" * 128, "a.b", "0", "A_b-c.D"],
)
def test_valid_instance_ids(instance_id: str) -> None:
    assert validate_instance_id(instance_id) == instance_id


@pytest.mark.parametrize(
    "instance_id",
    ["", "a" * 129, "-a", "a-", ".a", "a.", "_a", "a/b", "a b", "a:1", "a\n", "ü"],
)
def test_invalid_instance_ids(instance_id: str) -> None:
    with pytest.raises(InvalidName, match="invalid instance id"):
        validate_instance_id(instance_id)


# -- key layout --------------------------------------------------------------------


def test_default_layout_keys_match_the_contract() -> None:
    layout = KeyLayout()
    assert layout.prefix == DEFAULT_PREFIX == "/ringmesh/v1"
    assert layout.instances == "/ringmesh/v1/instances/"
    assert layout.service_instances("echo") == "/ringmesh/v1/instances/echo/"
    assert layout.instance("echo", "host-1") == "/ringmesh/v1/instances/echo/host-1"
    assert layout.load("echo", "host-1") == "/ringmesh/v1/load/echo/host-1"


def test_custom_prefix() -> None:
    layout = KeyLayout("/test/7")
    assert layout.instance("echo", "i1") == "/test/7/instances/echo/i1"
    assert layout.parse_instance("/test/7/instances/echo/i1") == ("echo", "i1")


@pytest.mark.parametrize("prefix", ["", "ringmesh/v1", "/ringmesh/v1/", "/"])
def test_bad_prefix_is_rejected(prefix: str) -> None:
    with pytest.raises(InvalidName, match="invalid prefix"):
        KeyLayout(prefix)


def test_building_keys_validates_names() -> None:
    layout = KeyLayout()
    with pytest.raises(InvalidName):
        layout.instance("Echo", "i1")
    with pytest.raises(InvalidName):
        layout.instance("echo", "../i1")
    with pytest.raises(InvalidName):
        layout.load("echo", "")
    with pytest.raises(InvalidName):
        layout.service_instances("echo/x")


@pytest.mark.parametrize(
    "key",
    [
        "/ringmesh/v1/instances/echo",  # no instance id
        "/ringmesh/v1/instances/echo/",  # empty instance id
        "/ringmesh/v1/instances/echo/i1/extra",
        "/ringmesh/v1/instances/Echo/i1",
        "/ringmesh/v1/load/echo/i1",
        "/other/instances/echo/i1",
        "/ringmesh/v1/instances//i1",
        "/ringmesh/v10/instances/echo/i1",
    ],
)
def test_parse_instance_rejects_malformed_keys(key: str) -> None:
    with pytest.raises(InvalidName):
        KeyLayout().parse_instance(key)


service_names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)
instance_ids = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?", fullmatch=True)


@settings(max_examples=100)
@given(service_names, instance_ids)
def test_instance_keys_round_trip(service: str, instance_id: str) -> None:
    layout = KeyLayout("/mesh")
    key = layout.instance(service, instance_id)
    assert key.startswith(layout.service_instances(service))
    assert layout.parse_instance(key) == (service, instance_id)


# -- weights -----------------------------------------------------------------------


@pytest.mark.parametrize("weight", [1, 2, MAX_WEIGHT])
def test_valid_weights(weight: int) -> None:
    assert validate_weight(weight) == weight


@pytest.mark.parametrize("weight", [0, -1, MAX_WEIGHT + 1, True, False, 1.0, "1", None])
def test_invalid_weights(weight: Any) -> None:
    with pytest.raises(InvalidName, match="invalid weight"):
        validate_weight(weight)


# -- instance records --------------------------------------------------------------


def full_record() -> InstanceRecord:
    return InstanceRecord(
        id="host-1",
        service="echo",
        address="10.0.0.7:15002",
        zone="eu-west-1a",
        weight=3,
        state=DRAINING,
        grpc_services=("demo.Echo", "grpc.health.v1.Health"),
        version="0.1.0",
        started_at=1718000000.25,
        unary_methods=("/demo.Echo/Say",),
    )


def test_record_defaults() -> None:
    record = InstanceRecord(id="i1", service="echo", address="h:1")
    assert record.state == SERVING and record.serving
    assert record.weight == 1
    assert record.grpc_services == () and record.unary_methods == ()
    assert not InstanceRecord(id="i1", service="echo", address="h:1", state=DRAINING).serving


def test_record_json_round_trip() -> None:
    record = full_record()
    raw = record.to_json()
    assert InstanceRecord.from_json(raw) == record
    doc = json.loads(raw)
    # The contract's fields, readable with etcdctl: lists, not tuples; no spaces.
    assert doc == {
        "id": "host-1",
        "service": "echo",
        "address": "10.0.0.7:15002",
        "zone": "eu-west-1a",
        "weight": 3,
        "state": "draining",
        "grpc_services": ["demo.Echo", "grpc.health.v1.Health"],
        "version": "0.1.0",
        "started_at": 1718000000.25,
        "unary_methods": ["/demo.Echo/Say"],
    }
    assert b" " not in raw


@settings(max_examples=100)
@given(
    service=service_names,
    instance_id=instance_ids,
    host=st.sampled_from(["10.0.0.1", "host.example", "[::1]", "localhost"]),
    port=st.integers(min_value=1, max_value=65535),
    weight=st.integers(min_value=1, max_value=MAX_WEIGHT),
    state=st.sampled_from([SERVING, DRAINING]),
    zone=st.text(max_size=20),
    grpc_services=st.lists(st.text(max_size=20), max_size=4),
    started_at=st.floats(allow_nan=False, allow_infinity=False),
)
def test_property_record_json_round_trip(
    service: str,
    instance_id: str,
    host: str,
    port: int,
    weight: int,
    state: str,
    zone: str,
    grpc_services: list[str],
    started_at: float,
) -> None:
    record = InstanceRecord(
        id=instance_id,
        service=service,
        address=f"{host}:{port}",
        zone=zone,
        weight=weight,
        state=state,
        grpc_services=tuple(grpc_services),
        started_at=started_at,
    )
    assert InstanceRecord.from_json(record.to_json()) == record


def test_from_json_fills_optional_fields_with_defaults() -> None:
    record = InstanceRecord.from_json(b'{"id":"i1","service":"echo","address":"h:1"}')
    assert record == InstanceRecord(id="i1", service="echo", address="h:1")


def test_from_json_accepts_an_integer_started_at_and_ignores_unknown_fields() -> None:
    raw = json.dumps(
        {"id": "i1", "service": "echo", "address": "h:1", "started_at": 5, "future": {"x": 1}}
    ).encode()
    record = InstanceRecord.from_json(raw)
    assert record.started_at == 5.0 and isinstance(record.started_at, float)


def _doc(**changes: Any) -> bytes:
    doc: dict[str, Any] = json.loads(full_record().to_json())
    for name, value in changes.items():
        if value is _DELETE:
            del doc[name]
        else:
            doc[name] = value
    return json.dumps(doc).encode()


_DELETE = object()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"hello", "not JSON"),
        (b"[]", "expected a JSON object, got list"),
        (b'"a string"', "expected a JSON object, got str"),
        (b"42", "expected a JSON object, got int"),
        (b"null", "expected a JSON object, got NoneType"),
        (_doc(id=_DELETE), "missing field 'id'"),
        (_doc(service=_DELETE), "missing field 'service'"),
        (_doc(address=_DELETE), "missing field 'address'"),
        (_doc(id=7), "field 'id' has the wrong type"),
        (_doc(service=None), "field 'service' has the wrong type"),
        (_doc(zone=["eu"]), "field 'zone' has the wrong type"),
        (_doc(weight="3"), "field 'weight' has the wrong type"),
        (_doc(weight=2.0), "field 'weight' has the wrong type"),
        (_doc(weight=True), "field 'weight' has the wrong type"),
        (_doc(weight=0), "invalid weight"),
        (_doc(weight=MAX_WEIGHT + 1), "invalid weight"),
        (_doc(state="dead"), "invalid state"),
        (_doc(state=1), "field 'state' has the wrong type"),
        (_doc(version=1), "field 'version' has the wrong type"),
        (_doc(started_at="yesterday"), "field 'started_at' has the wrong type"),
        (_doc(started_at=True), "field 'started_at' has the wrong type"),
        (_doc(grpc_services="demo.Echo"), "'grpc_services' must be a list of strings"),
        (_doc(grpc_services=[1]), "'grpc_services' must be a list of strings"),
        (_doc(unary_methods={"a": 1}), "'unary_methods' must be a list of strings"),
        (_doc(id="bad id"), "invalid instance id"),
        (_doc(service="Echo"), "invalid service name"),
        (_doc(address="no-port"), "invalid address"),
        (_doc(address=":15002"), "invalid address"),
        (_doc(address="host:"), "invalid address"),
        (_doc(address="host:0"), "invalid address"),
        (_doc(address="host:65536"), "invalid address"),
        (_doc(address="host:-1"), "invalid address"),
        (_doc(address="host:http"), "invalid address"),
        (_doc(address="ho st:15002"), "invalid address"),
        (_doc(address="host\n:15002"), "invalid address"),
        (_doc(address="host\u0000:15002"), "invalid address"),
    ],
)
def test_from_json_rejects_garbage_with_record_error(raw: bytes, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        InstanceRecord.from_json(raw)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_from_json_rejects_non_finite_started_at(literal: bytes) -> None:
    raw = b'{"id":"i1","service":"echo","address":"h:1","started_at":' + literal + b"}"
    with pytest.raises(RecordError, match="'started_at' is not finite"):
        InstanceRecord.from_json(raw)


# Each of these is a record that does not parse; the contract says it must be
# skipped and logged, i.e. raise RecordError, which is what topology.py catches.
# Any other exception escapes the topology watch and takes the sidecar down.
def test_from_json_rejects_a_non_ascii_digit_port_with_record_error() -> None:
    with pytest.raises(RecordError):
        InstanceRecord.from_json(_doc(address="host:²"))


def test_from_json_rejects_a_huge_integer_started_at_with_record_error() -> None:
    raw = b'{"id":"i1","service":"echo","address":"h:1","started_at":1' + b"0" * 400 + b"}"
    with pytest.raises(RecordError):
        InstanceRecord.from_json(raw)


def test_from_json_rejects_deeply_nested_json_with_record_error() -> None:
    with pytest.raises(RecordError):
        InstanceRecord.from_json(b"[" * 100_000)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "-bad"),
        ("service", "a" * 64),
        ("weight", 0),
        ("state", "SERVING"),
        ("address", "host"),
        ("address", "host:99999"),
    ],
)
def test_constructor_validates(field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"id": "i1", "service": "echo", "address": "h:1", field: value}
    with pytest.raises(InvalidName):
        InstanceRecord(**kwargs)


def test_ipv6_addresses_are_accepted() -> None:
    assert InstanceRecord(id="i1", service="echo", address="[::1]:15002").address == ("[::1]:15002")


# -- hostile records: RecordError with one short line, never another exception ------

_BASE = {"id": "i1", "service": "echo", "address": "h:1"}


def _assert_record_error(raw: bytes) -> RecordError:
    try:
        InstanceRecord.from_json(raw)
    except RecordError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) <= 300, message[:400]
        return exc
    raise AssertionError(f"parsed: {raw[:80]!r}")


@pytest.mark.parametrize(
    "port",
    [
        "1" * 4301,  # past Python's int max-str-digits: int() raises ValueError
        "9" * 100_000,
        "6" * 4300,
        "123456",
        "000001",  # six digits, even if the number is small
    ],
    ids=["4301-digits", "100k-digits", "4300-digits", "6-digits", "padded"],
)
def test_from_json_rejects_a_huge_digit_port_with_record_error(port: str) -> None:
    exc = _assert_record_error(json.dumps({**_BASE, "address": f"h:{port}"}).encode())
    assert "invalid address" in str(exc)


def test_constructor_rejects_a_huge_digit_port_with_invalid_name() -> None:
    with pytest.raises(InvalidName, match="invalid address"):
        InstanceRecord(id="i1", service="echo", address="h:" + "1" * 5000)


@pytest.mark.parametrize("raw", [None, 42, 1.5, [b"{}"], {"id": "i1"}])
def test_from_json_rejects_what_is_not_text_with_record_error(raw: Any) -> None:
    with pytest.raises(RecordError, match="not JSON"):
        InstanceRecord.from_json(raw)


@pytest.mark.parametrize(
    "changes",
    [
        {"id": "x" * 1_000_000},
        {"service": "e" * 1_000_000},
        {"state": "s" * 1_000_000},
        {"weight": int("9" * 4300)},
        {"weight": -(10**300)},
        {"started_at": int("9" * 4300)},
        {"address": ":" * 100_000},
        {"address": "h\n:1\n" + "7" * 10_000},
        {"zone": [[[[[]]]]]},
        {"grpc_services": [["nested"]]},
        {"unary_methods": [{"a": [1, 2, {"b": None}]}]},
    ],
)
def test_from_json_rejects_hostile_fields_with_a_short_record_error(
    changes: dict[str, Any],
) -> None:
    _assert_record_error(json.dumps({**_BASE, **changes}).encode())


@pytest.mark.parametrize(
    "literal", [b"NaN", b"-Infinity", b"1" * 4301, b"1e99999", b"-" + b"9" * 5000]
)
@pytest.mark.parametrize("name", ["weight", "started_at", "address", "zone", "id"])
def test_from_json_rejects_hostile_numbers_in_any_field(name: str, literal: bytes) -> None:
    raw = json.dumps({**_BASE, name: "@"}).encode().replace(b'"@"', literal)
    _assert_record_error(raw)


json_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=10,
)
ports = (
    st.text(alphabet="0123456789\u00b2\u0663-+ ", max_size=7)
    | st.integers(min_value=0, max_value=99_999).map(str)
    | st.integers(min_value=4290, max_value=20_000).map(lambda n: "7" * n)
)
addresses = st.builds(lambda host, port: f"{host}:{port}", st.text(max_size=8), ports)
record_fields = st.sampled_from(sorted(json.loads(full_record().to_json())))


@settings(max_examples=300, deadline=None)
@given(addresses, st.dictionaries(record_fields, json_values, max_size=3))
def test_any_hostile_record_parses_or_is_a_record_error(
    address: str, changes: dict[str, Any]
) -> None:
    raw = json.dumps({**_BASE, "address": address, **changes}, allow_nan=True).encode()
    try:
        record = InstanceRecord.from_json(raw)
    except RecordError as exc:
        assert "\n" not in str(exc) and len(str(exc)) <= 300
    else:
        assert InstanceRecord.from_json(record.to_json()) == record


def test_records_over_the_size_limit_are_refused_unread() -> None:
    from registry.authz import AuthzRecord
    from registry.records import MAX_RECORD_BYTES
    from registry.scaling import Policy

    padding = " " * MAX_RECORD_BYTES
    good = InstanceRecord(id="a", service="echo", address="127.0.0.1:1").to_json()
    assert InstanceRecord.from_json(good).id == "a"
    for parse, raw in (
        (InstanceRecord.from_json, good[:-1] + padding.encode() + b"}"),
        (AuthzRecord.from_json, b'{"allow": []' + padding.encode() + b"}"),
        (Policy.from_json, b"{" + padding.encode() + b"}"),
    ):
        with pytest.raises(RecordError, match="over the 256 KiB record limit"):
            parse(raw)
