"""Certificate authority, service and tenant certificates for mutual TLS.

Layout under ``cert_dir``::

    ca.crt, ca.key
    services/<name>.crt, services/<name>.key
    tenants/<tenant_id>.crt, tenants/<tenant_id>.key
    admins/<name>.crt, admins/<name>.key

Keys are ECDSA P-256, signatures SHA-256. Private keys are created with mode
0600. Existing files are never overwritten, so running ``init_certs`` again
only adds what is missing. The identity of a certificate is its single URI
SAN (see ``services.common.identity``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.identity import PeerKind, peer_uri

logger = logging.getLogger(__name__)

SERVICE_NAMES = ("admission", "scheduler", "worker-gpu", "cache")
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# A DNS name for a SAN: dot-separated labels of letters, digits, '-' and '_'
# (Docker service names use '_'), optionally starting with a '*.' wildcard.
_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
DNS_NAME_PATTERN = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*")

CA_VALID_DAYS = 3650
SERVICE_VALID_DAYS = 825
# Certificates start this long before "now" so that a peer whose clock is a
# little behind still accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
LOCK_FILE = ".lock"


class CertificateError(RuntimeError):
    """The certificate directory is missing files or contains an incomplete certificate and key pair."""


def ca_cert_path(cert_dir: Path) -> Path:
    return Path(cert_dir) / CA_CERT_FILE


def service_cert_paths(cert_dir: Path, service_name: str) -> tuple[Path, Path]:
    """Return the (certificate, key) paths of a service."""
    base = Path(cert_dir) / "services" / service_name
    return base.with_suffix(".crt"), base.with_suffix(".key")


def tenant_cert_paths(cert_dir: Path, tenant_id: str) -> tuple[Path, Path]:
    """Return the (certificate, key) paths of a tenant."""
    base = Path(cert_dir) / "tenants" / tenant_id
    return base.with_suffix(".crt"), base.with_suffix(".key")


def init_certs(
    cert_dir: Path,
    hosts: Sequence[str],
    service_names: Sequence[str] = SERVICE_NAMES,
    service_valid_days: int = SERVICE_VALID_DAYS,
) -> None:
    """Create the CA and each service certificate that does not exist yet.

    ``hosts`` become DNS SANs, or IP SANs for IP literals, in every service
    certificate, next to the service's own name as a DNS SAN.
    NOTE: an existing certificate is kept as it is, even when ``hosts``
    changed or it expired; delete its files to issue a new one.
    """
    cert_dir = Path(cert_dir)
    for name in service_names:
        _check_name("service name", name)
    # With every file present nothing is written, so a read-only cert_dir works.
    if _all_present(cert_dir, service_names):
        return
    with _locked(cert_dir):
        ca_certificate, ca_key = _load_or_create_ca(cert_dir)
        for name in service_names:
            cert_path, key_path = service_cert_paths(cert_dir, name)
            if _pair_exists(cert_path, key_path):
                continue
            sans = [*_host_sans([*hosts, name]), x509.UniformResourceIdentifier(peer_uri(PeerKind.SERVICE, name))]
            _issue(
                ca_certificate,
                ca_key,
                common_name=name,
                sans=sans,
                usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                validity=_validity(service_valid_days),
                cert_path=cert_path,
                key_path=key_path,
            )
            logger.info("issued service certificate %s", cert_path)


def admin_cert_paths(cert_dir: Path, admin_name: str) -> tuple[Path, Path]:
    """Return the (certificate, key) paths of an Admin API operator."""
    base = Path(cert_dir) / "admins" / admin_name
    return base.with_suffix(".crt"), base.with_suffix(".key")


def certificate_fingerprint(pem: bytes) -> str:
    """Return the SHA-256 fingerprint of a PEM certificate's DER encoding, as lowercase hex.

    This is the fingerprint that revocation uses, and the one that
    ``openssl x509 -noout -fingerprint -sha256`` prints (with colons).
    Raises ValueError when ``pem`` is not a PEM certificate.
    """
    certificate = x509.load_pem_x509_certificate(pem)
    return certificate.fingerprint(hashes.SHA256()).hex()


def add_admin(cert_dir: Path, admin_name: str, valid_days: int = 365) -> tuple[Path, Path]:
    """Issue a client certificate for the Admin API and return its (certificate, key) paths.

    The certificate's only SAN is ``spiffe://tenantserve/admin/<admin_name>``.
    An operator that already has a certificate keeps it. Raises
    CertificateError when the CA does not exist yet, and ValueError for an
    invalid name.
    """
    cert_dir = Path(cert_dir)
    _check_name("admin name", admin_name)
    cert_path, key_path = admin_cert_paths(cert_dir, admin_name)
    with _locked(cert_dir):
        ca_certificate, ca_key = load_ca(cert_dir)
        if _pair_exists(cert_path, key_path):
            logger.info("admin %s already has a certificate at %s; keeping it", admin_name, cert_path)
            return cert_path, key_path
        _issue(
            ca_certificate,
            ca_key,
            common_name=admin_name,
            sans=[x509.UniformResourceIdentifier(peer_uri(PeerKind.ADMIN, admin_name))],
            usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
            validity=_validity(valid_days),
            cert_path=cert_path,
            key_path=key_path,
        )
        logger.info("issued admin certificate %s", cert_path)
    return cert_path, key_path


def issue_tenant_pem(cert_dir: Path, tenant_id: str, valid_days: int = 365) -> tuple[bytes, bytes]:
    """Issue a new tenant client certificate and return its (certificate, key) PEM, writing no file.

    Used by the Admin API, which hands the pair to the caller: the server
    keeps no copy of the key. Each call issues a new certificate with a new
    key, so a tenant may hold several valid certificates at once. Raises
    CertificateError when the CA does not exist, ValueError for an invalid
    tenant id or ``valid_days`` below 1.
    """
    _check_name("tenant id", tenant_id)
    ca_certificate, ca_key = load_ca(cert_dir)
    certificate, key = _build_certificate(
        ca_certificate,
        ca_key,
        common_name=tenant_id,
        sans=[x509.UniformResourceIdentifier(peer_uri(PeerKind.TENANT, tenant_id))],
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        validity=_validity(valid_days),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), _private_key_pem(key)


def add_tenant(
    cert_dir: Path,
    tenant_id: str,
    valid_days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue a client certificate for a tenant and return its (certificate, key) paths.

    The certificate's only SAN is ``spiffe://tenantserve/tenant/<tenant_id>``.
    ``not_before``/``not_after`` override ``valid_days`` (timezone-aware UTC).
    A tenant that already has a certificate keeps it: its paths are returned
    and nothing is written. Raises CertificateError when the CA does not
    exist yet, and ValueError for an invalid tenant id.
    """
    cert_dir = Path(cert_dir)
    _check_name("tenant id", tenant_id)
    cert_path, key_path = tenant_cert_paths(cert_dir, tenant_id)
    with _locked(cert_dir):
        ca_certificate, ca_key = load_ca(cert_dir)
        if _pair_exists(cert_path, key_path):
            logger.info("tenant %s already has a certificate at %s; keeping it", tenant_id, cert_path)
            return cert_path, key_path
        start, end = _validity(valid_days)
        _issue(
            ca_certificate,
            ca_key,
            common_name=tenant_id,
            sans=[x509.UniformResourceIdentifier(peer_uri(PeerKind.TENANT, tenant_id))],
            usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
            validity=(not_before or start, not_after or end),
            cert_path=cert_path,
            key_path=key_path,
        )
        logger.info("issued tenant certificate %s", cert_path)
    return cert_path, key_path


def create_ca(cert_dir: Path, common_name: str = "tenantserve CA", valid_days: int = CA_VALID_DAYS) -> Path:
    """Create ``ca.crt`` and ``ca.key`` in ``cert_dir`` unless both exist; return the certificate path."""
    cert_dir = Path(cert_dir)
    with _locked(cert_dir):
        _load_or_create_ca(cert_dir, common_name, valid_days)
    return ca_cert_path(cert_dir)


def load_ca(cert_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the CA certificate and key; raise CertificateError when they are missing."""
    cert_path = ca_cert_path(cert_dir)
    key_path = Path(cert_dir) / CA_KEY_FILE
    if not (cert_path.exists() and key_path.exists()):
        raise CertificateError(
            f"no certificate authority in {cert_dir}: {cert_path} and {key_path} are required; "
            "create them with `tenantserve certs init`"
        )
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path} is not an EC private key")
    return certificate, key


def _load_or_create_ca(
    cert_dir: Path, common_name: str = "tenantserve CA", valid_days: int = CA_VALID_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path = ca_cert_path(cert_dir)
    key_path = cert_dir / CA_KEY_FILE
    if _pair_exists(cert_path, key_path):
        return load_ca(cert_dir)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start, end = _validity(valid_days)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(certificate, key, cert_path, key_path)
    logger.info("created certificate authority %s", cert_path)
    return certificate, key


def _issue(
    ca_certificate: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    sans: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    validity: tuple[dt.datetime, dt.datetime],
    cert_path: Path,
    key_path: Path,
) -> None:
    certificate, key = _build_certificate(
        ca_certificate, ca_key, common_name=common_name, sans=sans, usages=usages, validity=validity
    )
    _write_pair(certificate, key, cert_path, key_path)


def _build_certificate(
    ca_certificate: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    sans: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    validity: tuple[dt.datetime, dt.datetime],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return certificate, key


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _host_sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if len(host) > 253 or not DNS_NAME_PATTERN.fullmatch(host):
            raise ValueError(f"host {host!r} is invalid; use a DNS name or an IP address")
        sans.append(x509.DNSName(host))
    return sans


def _validity(valid_days: int) -> tuple[dt.datetime, dt.datetime]:
    if valid_days < 1:
        raise ValueError(f"valid_days must be >= 1, got {valid_days}")
    now = dt.datetime.now(dt.timezone.utc)
    return now - CLOCK_SKEW, now + dt.timedelta(days=valid_days)


def _check_name(label: str, name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{label} {name!r} is invalid; use 1 to 63 lowercase letters, digits or '-', "
            "starting with a letter or digit"
        )


def _all_present(cert_dir: Path, service_names: Sequence[str]) -> bool:
    # Checked without the lock, so a half pair may be one that another
    # process is writing; the locked path decides about it.
    pairs = [(ca_cert_path(cert_dir), cert_dir / CA_KEY_FILE)]
    pairs += [service_cert_paths(cert_dir, name) for name in service_names]
    return all(cert_path.exists() and key_path.exists() for cert_path, key_path in pairs)


def _pair_exists(cert_path: Path, key_path: Path) -> bool:
    """Return whether both files exist, and raise CertificateError when only one does."""
    cert_exists, key_exists = cert_path.exists(), key_path.exists()
    if cert_exists != key_exists:
        present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
        raise CertificateError(f"{present} exists but {missing} is missing; delete {present} to issue a new pair")
    return cert_exists


def _write_pair(certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path) -> None:
    # The key is written first so that a crash in between leaves a key
    # without a certificate, which _pair_exists reports, and never a
    # certificate whose key is lost.
    _write_new_file(key_path, _private_key_pem(key), mode=0o600)
    _write_new_file(cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file at ``path``; raise FileExistsError when it exists.

    The data goes to a temporary file created with ``mode`` (O_EXCL, so the
    mode applies from the first byte), which is then hard-linked to
    ``path``. Readers therefore never see a partly written file, and
    link() never replaces an existing one. On a file system without hard
    links the file is written in place, still with O_EXCL and ``mode``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    _write_exclusive(temporary, data, mode)
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise
    except OSError as exc:
        logger.warning("hard link to %s failed (%s); writing it in place", path, exc.strerror)
        _write_exclusive(path, data, mode)
    finally:
        temporary.unlink()


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


@contextlib.contextmanager
def _locked(cert_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``cert_dir`` so that concurrent starts create one CA."""
    cert_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cert_dir / LOCK_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
