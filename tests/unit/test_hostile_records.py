"""Every etcd record parser and the routing inputs, fuzzed: hostile input parses or is
refused with a RecordError, never another exception; routing never breaks on it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from registry.authz import AuthzRecord
from registry.errors import RecordError
from registry.records import InstanceRecord
from registry.scaling import LoadReport, Policy, Target
from registry.topology import Registered, Topology
from sidecar.routing import RoutingTable

PARSERS: list[Callable[[bytes], Any]] = [
    InstanceRecord.from_json,
    LoadReport.from_json,
    Policy.from_json,
    Target.from_json,
    AuthzRecord.from_json,
]
FIELDS = [
    "id", "service", "address", "zone", "weight", "state", "grpc_services", "unary_methods",
    "version", "started_at", "ts", "window_s", "rps", "inflight", "error_rate", "p50_ms",
    "p99_ms", "min_replicas", "max_replicas", "metric", "target", "tolerance",
    "scale_up_window_s", "scale_down_window_s", "mode", "replicas", "previous", "reason",
    "decided_at", "term", "leader", "allow",
]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
documents = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=12)


def parses_or_refuses(parse: Callable[[bytes], Any], raw: bytes) -> None:
    """Any other exception fails the test (hypothesis shows the input)."""
    with contextlib.suppress(RecordError):
        parse(raw)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_are_refused_by_every_parser(raw: bytes) -> None:
    for parse in PARSERS:
        parses_or_refuses(parse, raw)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_any_json_object_parses_or_is_refused_by_every_parser(doc: dict[str, Any]) -> None:
    raw = json.dumps(doc, allow_nan=True).encode()
    for parse in PARSERS:
        parses_or_refuses(parse, raw)


instances = st.builds(
    InstanceRecord,
    id=st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True),
    service=st.sampled_from(["echo", "billing", "x"]),
    address=st.from_regex(r"127\.0\.0\.1:[1-9][0-9]{0,3}", fullmatch=True),
    weight=st.integers(min_value=1, max_value=5),
    state=st.sampled_from(["serving", "draining"]),
    grpc_services=st.lists(st.sampled_from(["a.A", "b.B", "c.C"]), max_size=2).map(tuple),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(instances, max_size=12), st.lists(instances, max_size=12), st.text(max_size=12))
def test_routing_builds_from_any_records_and_routes_every_key(
    first: list[InstanceRecord], second: list[InstanceRecord], key: str
) -> None:
    def topology(records: list[InstanceRecord], revision: int) -> Topology:
        return Topology.build(
            revision, [Registered(r, lease=1, mod_revision=i) for i, r in enumerate(records)]
        )

    table = RoutingTable.build(topology(first, 1))
    table = RoutingTable.build(topology(second, 2), previous=table)
    for ring in table.rings.values():
        order = ring.order(key)
        assert sorted(p.id for p in order) == sorted(ring.peers)
