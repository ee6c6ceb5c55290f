"""`ringmesh certs init|issue`: real files, checked with `cryptography` as a peer would check them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ringmesh import cli

pytestmark = pytest.mark.integration


def ringmesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringmesh", *args], capture_output=True, text=True, timeout=30,
        env=env,
    )  # fmt: skip


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def verify_as_a_peer(ca: x509.Certificate, leaf: x509.Certificate, at: datetime) -> str:
    """Verify the chain as an mTLS server checks a client; return the leaf's one URI SAN."""
    verifier = PolicyBuilder().store(Store([ca])).time(at).build_client_verifier()
    verified = verifier.verify(leaf, [])
    assert verified.chain == [leaf, ca]
    subjects = verified.subjects or []
    (uri,) = [s.value for s in subjects if isinstance(s, x509.UniformResourceIdentifier)]
    return uri


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_init_and_issue_make_a_chain_a_peer_accepts(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    before = datetime.now(UTC).replace(microsecond=0)
    done = ringmesh("certs", "init", str(pki))
    assert done.returncode == 0, done.stderr
    done = ringmesh("certs", "issue", str(pki), "orders")
    assert done.returncode == 0, done.stderr
    assert "spiffe://ringmesh/orders" in done.stdout
    after = datetime.now(UTC)

    # The CA: P-256, self-signed, CA:TRUE, ten years, its key 0600.
    ca = load_cert(pki / "ca.pem")
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey) and isinstance(ca_key.curve, ec.SECP256R1)
    assert ca.public_key() == ca_key.public_key()
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert before + timedelta(days=3650) <= ca.not_valid_after_utc <= after + timedelta(days=3650)
    assert mode(pki / "ca.key") == 0o600

    # The leaf, in the layout --tls-dir reads.
    service_dir = pki / "orders"
    assert sorted(p.name for p in service_dir.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
    assert (service_dir / "ca.pem").read_bytes() == (pki / "ca.pem").read_bytes()
    cert_pem = (service_dir / "cert.pem").read_bytes()
    assert cert_pem.count(b"BEGIN CERTIFICATE") == 1  # the leaf, nothing else
    leaf = load_cert(service_dir / "cert.pem")
    key = serialization.load_pem_private_key((service_dir / "key.pem").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert leaf.public_key() == key.public_key()
    assert mode(service_dir / "key.pem") == 0o600

    leaf.verify_directly_issued_by(ca)  # the signature
    now = datetime.now(UTC)
    assert verify_as_a_peer(ca, leaf, now) == "spiffe://ringmesh/orders"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://ringmesh/orders"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    # Valid now (backdated a few minutes for clock skew), for one day.
    assert leaf.not_valid_before_utc <= before
    assert before - leaf.not_valid_before_utc <= timedelta(minutes=10)
    assert before + timedelta(days=1) <= leaf.not_valid_after_utc <= after + timedelta(days=1)
    with pytest.raises(VerificationError):
        verify_as_a_peer(ca, leaf, leaf.not_valid_after_utc + timedelta(seconds=1))
    with pytest.raises(VerificationError):
        verify_as_a_peer(ca, leaf, leaf.not_valid_before_utc - timedelta(seconds=1))


def test_days_sets_the_lifetime_and_fractions_are_allowed(tmp_path: Path) -> None:
    assert cli.main(["certs", "init", str(tmp_path)]) == 0
    start = datetime.now(UTC).replace(microsecond=0)
    assert cli.main(["certs", "issue", str(tmp_path), "orders", "--days", "0.25"]) == 0
    assert cli.main(["certs", "issue", str(tmp_path), "search", "--days", "30"]) == 0
    end = datetime.now(UTC)
    short = load_cert(tmp_path / "orders" / "cert.pem").not_valid_after_utc
    assert start + timedelta(hours=6) <= short <= end + timedelta(hours=6)
    long = load_cert(tmp_path / "search" / "cert.pem").not_valid_after_utc
    assert start + timedelta(days=30) <= long <= end + timedelta(days=30)


def test_nothing_is_overwritten_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = tmp_path / "pki"
    assert cli.main(["certs", "init", str(pki)]) == 0
    assert cli.main(["certs", "issue", str(pki), "orders"]) == 0
    first = files_of(pki)
    capsys.readouterr()

    assert cli.main(["certs", "init", str(pki)]) == 1
    err = capsys.readouterr().err
    assert "ca.key" in err and "already exist" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1
    assert cli.main(["certs", "issue", str(pki), "orders"]) == 1
    err = capsys.readouterr().err
    assert "key.pem" in err and "already exist" in err and "--force" in err
    assert files_of(pki) == first, "a refusal changes nothing"

    # One file left from an earlier run is enough to refuse, and nothing else is written.
    (pki / "search").mkdir()
    (pki / "search" / "key.pem").write_bytes(b"precious")
    assert cli.main(["certs", "issue", str(pki), "search"]) == 1
    assert sorted(p.name for p in (pki / "search").iterdir()) == ["key.pem"]
    assert (pki / "search" / "key.pem").read_bytes() == b"precious"


def test_force_renews_in_place_without_leftovers(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert cli.main(["certs", "init", str(pki)]) == 0
    assert cli.main(["certs", "issue", str(pki), "orders"]) == 0
    old_cert = (pki / "orders" / "cert.pem").read_bytes()
    old_key = (pki / "orders" / "key.pem").read_bytes()

    assert cli.main(["certs", "issue", str(pki), "orders", "--force"]) == 0
    assert (pki / "orders" / "cert.pem").read_bytes() != old_cert
    assert (pki / "orders" / "key.pem").read_bytes() != old_key
    assert mode(pki / "orders" / "key.pem") == 0o600
    ca = load_cert(pki / "ca.pem")
    leaf = load_cert(pki / "orders" / "cert.pem")
    assert verify_as_a_peer(ca, leaf, datetime.now(UTC)) == "spiffe://ringmesh/orders"
    assert sorted(p.name for p in (pki / "orders").iterdir()) == ["ca.pem", "cert.pem", "key.pem"]

    # A new CA with --force: the old leaf no longer verifies against it.
    assert cli.main(["certs", "init", str(pki), "--force"]) == 0
    assert mode(pki / "ca.key") == 0o600
    with pytest.raises(VerificationError):
        verify_as_a_peer(load_cert(pki / "ca.pem"), leaf, datetime.now(UTC))
    assert sorted(p.name for p in pki.iterdir()) == ["ca.key", "ca.pem", "orders"]


def _ca_without_key(root: Path) -> Path:
    assert cli.main(["certs", "init", str(root / "ca")]) == 0
    (root / "ca" / "ca.key").unlink()
    return root / "ca"


def _ca_with_garbage(root: Path) -> Path:
    (root / "junk").mkdir()
    (root / "junk" / "ca.pem").write_text("not a certificate\n")
    (root / "junk" / "ca.key").write_text("not a key\n")
    return root / "junk"


def _ca_with_a_foreign_key(root: Path) -> Path:
    assert cli.main(["certs", "init", str(root / "a")]) == 0
    assert cli.main(["certs", "init", str(root / "b")]) == 0
    (root / "a" / "ca.key").write_bytes((root / "b" / "ca.key").read_bytes())
    return root / "a"


@pytest.mark.parametrize(
    ("make_dir", "args", "status", "message"),
    [
        (lambda root: root / "missing", ["orders"], 1, "does not exist"),
        (lambda root: root, ["orders"], 1, "ca.pem is missing"),
        (_ca_without_key, ["orders"], 1, "ca.key is missing"),
        (_ca_with_garbage, ["orders"], 1, "is not a PEM certificate"),
        (_ca_with_a_foreign_key, ["orders"], 1, "is not the key of"),
        (_ca_without_key, ["Not_A_Label"], 2, "invalid service name 'Not_A_Label'"),
        (_ca_without_key, ["orders", "--days", "0"], 2, "--days must be"),
        (_ca_without_key, ["orders", "--days", "-3"], 2, "--days must be"),
        (_ca_without_key, ["orders", "--days", "3651"], 2, "at most 3650"),
        (_ca_without_key, ["orders", "--days", "nan"], 2, "--days must be"),
        (_ca_without_key, ["orders", "--days", "soon"], 2, "invalid float value"),
        (lambda root: root, [], 2, "required: SERVICE"),
    ],
    ids=[
        "no-dir",
        "no-ca",
        "no-ca-key",
        "garbage",
        "foreign-key",
        "bad-service",
        "zero-days",
        "negative-days",
        "too-many-days",
        "nan-days",
        "word-days",
        "no-service",
    ],
)
def test_bad_issue_inputs_are_one_line_and_write_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_dir: Callable[[Path], Path],
    args: list[str],
    status: int,
    message: str,
) -> None:
    directory = make_dir(tmp_path)
    before = files_of(tmp_path)
    capsys.readouterr()
    try:
        code = cli.main(["certs", "issue", str(directory), *args])
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    assert code == status
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert files_of(tmp_path) == before


def test_bad_days_from_the_environment_is_a_usage_error(tmp_path: Path) -> None:
    done = ringmesh("certs", "init", str(tmp_path), env={**os.environ, "RINGMESH_DAYS": "0"})
    assert done.returncode == 2
    assert "--days must be" in done.stderr
    assert not (tmp_path / "ca.key").exists()
