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
