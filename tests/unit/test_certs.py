"""ringmesh/certs.py without files: lifetimes, and what a certificate says (a fixed clock)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from registry.errors import ConfigError, InvalidName, MeshError
from ringmesh.certs import BACKDATE, issue, lifetime, new_ca, spiffe_id

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (1, timedelta(days=1)),
        (0.5, timedelta(hours=12)),
        (1 / 24, timedelta(hours=1)),
        (3650, timedelta(days=3650)),
    ],
)
def test_lifetimes(days: float, expected: timedelta) -> None:
    assert lifetime(days) == expected


@pytest.mark.parametrize("days", [0, -1, 3650.01, 10**9, math.nan, math.inf, -math.inf, True])
def test_bad_lifetimes_are_usage_errors(days: float) -> None:
    with pytest.raises(ConfigError, match="--days must be a number of days above 0"):
        lifetime(days)


def test_a_lifetime_under_a_minute_is_refused() -> None:
    with pytest.raises(ConfigError, match="under a minute"):
        lifetime(0.0001)


def test_a_leaf_names_its_service_and_lives_inside_its_ca() -> None:
    ca = new_ca(now=NOW)
    leaf = issue(ca, "orders", now=NOW, days=0.5).certificate
    assert leaf.not_valid_before_utc == NOW - BACKDATE
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=12)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://ringmesh/orders"]
    assert san.get_values_for_type(x509.DNSName) == []
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    leaf.verify_directly_issued_by(ca.certificate)
    assert ca.certificate.not_valid_after_utc == NOW + timedelta(days=3650)


def test_a_leaf_may_not_outlive_its_ca() -> None:
    ca = new_ca(now=NOW, days=2)
    issue(ca, "orders", now=NOW, days=2)  # ends with the CA: fine
    with pytest.raises(MeshError, match="expires at 2030-01-04 03:04 UTC, before"):
        issue(ca, "orders", now=NOW, days=2.5)
    with pytest.raises(MeshError, match="expired at"):
        issue(ca, "orders", now=NOW + timedelta(days=3), days=1)


def test_a_leaf_never_starts_before_its_ca() -> None:
    ca = new_ca(now=NOW)
    # Issued by a machine whose clock is a minute behind the one that made the CA.
    leaf = issue(ca, "orders", now=NOW - timedelta(minutes=1)).certificate
    assert leaf.not_valid_before_utc == ca.certificate.not_valid_before_utc


def test_service_names_are_dns_labels() -> None:
    assert spiffe_id("orders-v2") == "spiffe://ringmesh/orders-v2"
    with pytest.raises(InvalidName):
        issue(new_ca(now=NOW), "Orders", now=NOW)
