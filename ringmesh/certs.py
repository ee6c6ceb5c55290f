"""`ringmesh certs init DIR` and `ringmesh certs issue DIR SERVICE`: the mesh's certificates.

``init`` makes the mesh CA (ECDSA P-256, self-signed, CA:TRUE, 10 years):
``DIR/ca.pem`` and ``DIR/ca.key``. ``issue`` makes one service's key and
certificate, signed by that CA, with the URI SAN ``spiffe://ringmesh/<service>``
(the identity the inbound side authorizes on), serverAuth and clientAuth, for
a day by default (as Linkerd's 24 h), in the layout ``--tls-dir`` reads:
``DIR/<service>/cert.pem`` (the leaf alone), ``key.pem`` and ``ca.pem`` (the
trust root).

Private keys are 0600. Nothing is overwritten without ``--force``. Each file
is written to a temporary file beside it and renamed into place, so a
sidecar reloading its certificates never reads half a file; ``cert.pem`` is
renamed last, so a reloader that follows it sees the new key already there.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registry.errors import ConfigError, MeshError
from registry.keys import validate_service

TRUST_DOMAIN = "ringmesh"
CA_DAYS = 3650.0  # ten years
LEAF_DAYS = 1.0
MAX_DAYS = 3650.0
MIN_LIFETIME = timedelta(minutes=1)
# Backdate not-before a little: a peer whose clock is a few minutes behind
# must not reject a certificate issued just now.
BACKDATE = timedelta(minutes=5)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
LEAF_CERT = "cert.pem"
LEAF_KEY = "key.pem"
TRUST_ROOT = "ca.pem"

KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700


def spiffe_id(service: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{validate_service(service)}"


def lifetime(days: float) -> timedelta:
    """``--days`` as a validity period: more than 0 and at most MAX_DAYS, fractions allowed."""
    problem = (
        f"--days must be a number of days above 0 and at most {MAX_DAYS:g} "
        f"(fractions allowed: 0.5 is 12 hours), got {days!r}"
    )
    if isinstance(days, bool) or not isinstance(days, int | float):
        raise ConfigError(problem)
    if not (math.isfinite(days) and 0 < days <= MAX_DAYS):
        raise ConfigError(problem)
    period = timedelta(seconds=round(days * 86400))
    if period < MIN_LIFETIME:
        raise ConfigError(f"--days {days!r} is under a minute: too short to be of use")
    return period


# -- making certificates (no files) -------------------------------------------------


@dataclass(frozen=True)
class MeshCa:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Leaf:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def new_ca(*, now: datetime, days: float = CA_DAYS) -> MeshCa:
    """A self-signed mesh CA valid from ``now`` (backdated) for ``days``."""
    period = lifetime(days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{TRUST_DOMAIN} mesh CA"),
        ]
    )
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + period)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return MeshCa(certificate, key)


def issue(ca: MeshCa, service: str, *, now: datetime, days: float = LEAF_DAYS) -> Leaf:
    """A key and certificate for ``service`` signed by ``ca``; MeshError if ``ca`` expires first."""
    identity = spiffe_id(service)
    period = lifetime(days)
    not_after = now + period
    ca_expires = ca.certificate.not_valid_after_utc
    if ca_expires <= now:
        raise MeshError(f"the mesh CA expired at {ca_expires:%Y-%m-%d %H:%M} UTC: make a new one")
    if not_after > ca_expires:
        raise MeshError(
            f"the mesh CA expires at {ca_expires:%Y-%m-%d %H:%M} UTC, before a certificate "
            f"for {days:g} days would: ask for fewer --days, or make a new CA"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
                    x509.NameAttribute(NameOID.COMMON_NAME, service),
                ]
            )
        )
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - BACKDATE, ca.certificate.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Leaf(certificate, key)


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# -- files ----------------------------------------------------------------------------


def load_ca(directory: Path) -> MeshCa:
    """The CA that ``certs init`` wrote into ``directory``; MeshError saying what is wrong."""
    if not directory.exists():
        raise MeshError(
            f"no mesh CA at {directory}: it does not exist (`ringmesh certs init DIR` makes one)"
        )
    if not directory.is_dir():
        raise MeshError(f"no mesh CA at {directory}: not a directory")
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.is_file():
        raise MeshError(
            f"no mesh CA in {directory}: {cert_path} is missing (`ringmesh certs init`)"
        )
    if not key_path.is_file():
        raise MeshError(
            f"{key_path} is missing: certificates are issued where the CA's key is "
            f"({directory} has only the CA certificate)"
        )
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise MeshError(f"{cert_path} is not a PEM certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: an encrypted key
        raise MeshError(f"{key_path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise MeshError(f"{key_path} is not an ECDSA P-256 key")
    if certificate.public_key() != key.public_key():
        raise MeshError(f"{key_path} is not the key of {cert_path}")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        certificate.verify_directly_issued_by(certificate)
    except (x509.ExtensionNotFound, ValueError, TypeError, InvalidSignature) as exc:
        raise MeshError(f"{cert_path} is not a self-signed CA certificate") from exc
    if not constraints.value.ca:
        raise MeshError(f"{cert_path} is not a CA certificate (CA:FALSE)")
    return MeshCa(certificate, key)


def write_file(path: Path, data: bytes, *, mode: int, replace: bool) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, then a rename.

    Without ``replace`` an existing file is never touched (FileExistsError), even
    one that appeared since the caller looked: the new file is hard-linked into
    place, which fails rather than overwrite.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
            os.unlink(temporary)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    # The renames survive a crash only once the directory itself is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(files: list[tuple[Path, bytes, int]], *, force: bool, why: str = "") -> None:
    if not force:
        existing = [str(path) for path, _data, _mode in files if path.exists()]
        if existing:
            verb = "exists" if len(existing) == 1 else "exist"
            raise MeshError(f"{', '.join(existing)} already {verb}{why}: --force replaces")
    for path, data, mode in files:
        try:
            write_file(path, data, mode=mode, replace=force)
        except FileExistsError as exc:
            raise MeshError(f"{path} appeared meanwhile: --force replaces it") from exc
        except OSError as exc:
            raise MeshError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _make_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise MeshError(f"cannot create {directory}: {exc.strerror or exc}") from exc
    if not directory.is_dir():
        raise MeshError(f"{directory} is not a directory")


def init_ca(directory: Path, *, now: datetime, days: float = CA_DAYS, force: bool) -> MeshCa:
    """Make a mesh CA and write ``ca.key`` then ``ca.pem`` into ``directory``."""
    lifetime(days)  # a bad --days is refused before anything is touched
    _make_directory(directory)
    ca = new_ca(now=now, days=days)
    _write_all(
        [
            (directory / CA_KEY, _key_pem(ca.key), KEY_MODE),
            (directory / CA_CERT, _cert_pem(ca.certificate), CERT_MODE),
        ],
        force=force,
        why=" (a new CA invalidates every certificate the old one issued)",
    )
    return ca


def issue_into(
    directory: Path, service: str, *, now: datetime, days: float = LEAF_DAYS, force: bool
) -> Leaf:
    """Issue ``service`` a certificate from the CA in ``directory``, into ``directory/service/``.

    Written in the order ca.pem, key.pem, cert.pem: a reloader watching cert.pem
    finds the matching key already in place.
    """
    validate_service(service)
    lifetime(days)
    ca = load_ca(directory)
    leaf = issue(ca, service, now=now, days=days)
    target = directory / service
    _make_directory(target)
    _write_all(
        [
            (target / TRUST_ROOT, _cert_pem(ca.certificate), CERT_MODE),
            (target / LEAF_KEY, _key_pem(leaf.key), KEY_MODE),
            (target / LEAF_CERT, _cert_pem(leaf.certificate), CERT_MODE),
        ],
        force=force,
    )
    return leaf


def certs_command(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    now = datetime.now(UTC)
    if args.action == "init":
        ca = init_ca(directory, now=now, days=args.days, force=args.force)
        expires = ca.certificate.not_valid_after_utc
        print(
            f"mesh CA in {directory / CA_CERT} (key {directory / CA_KEY}), "
            f"valid until {expires:%Y-%m-%d %H:%M} UTC"
        )
        return 0
    leaf = issue_into(directory, args.service, now=now, days=args.days, force=args.force)
    expires = leaf.certificate.not_valid_after_utc
    print(
        f"{spiffe_id(args.service)} in {directory / args.service}/ "
        f"({LEAF_CERT}, {LEAF_KEY}, {TRUST_ROOT}), valid until {expires:%Y-%m-%d %H:%M} UTC",
        file=sys.stdout,
    )
    return 0
