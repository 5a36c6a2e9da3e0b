"""Certificate authority, service and tenant certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from services.common import certs


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def san_values(certificate: x509.Certificate, kind: type) -> list:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(kind)


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_certs_creates_layout(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])

    assert (tmp_path / "ca.crt").is_file()
    assert (tmp_path / "ca.key").is_file()
    for name in certs.SERVICE_NAMES:
        assert (tmp_path / "services" / f"{name}.crt").is_file()
        assert (tmp_path / "services" / f"{name}.key").is_file()
    leftovers = [path.name for path in tmp_path.rglob(".*") if path.name != ".lock"]
    assert leftovers == []


def test_private_keys_have_mode_0600(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])
    _, tenant_key = certs.add_tenant(tmp_path, "alpha")

    keys = [tmp_path / "ca.key", tenant_key, *(tmp_path / "services").glob("*.key")]
    assert len(keys) == 2 + len(certs.SERVICE_NAMES)
    for key_path in keys:
        assert file_mode(key_path) == 0o600, key_path


def test_ca_is_a_signing_ca(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])
    ca = load_certificate(tmp_path / "ca.crt")

    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert basic.value.ca is True
    assert basic.critical is True
    assert usage.value.key_cert_sign is True
    assert ca.signature_hash_algorithm.name == "sha256"
    assert ca.public_key().curve.name == "secp256r1"


def test_service_certificate_sans(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost", "127.0.0.1", "::1", "scheduler.internal"])
    cert_path, _ = certs.service_cert_paths(tmp_path, "scheduler")
    certificate = load_certificate(cert_path)

    assert san_values(certificate, x509.DNSName) == ["localhost", "scheduler.internal", "scheduler"]
    assert san_values(certificate, x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san_values(certificate, x509.UniformResourceIdentifier) == ["spiffe://tenantserve/service/scheduler"]


def test_service_certificate_usages(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])
    certificate = load_certificate(certs.service_cert_paths(tmp_path, "admission")[0])

    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert certificate.public_key().curve.name == "secp256r1"
    assert certificate.signature_hash_algorithm.name == "sha256"


def test_service_certificate_chain_verifies(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost", "127.0.0.1"])
    store = Store([load_certificate(tmp_path / "ca.crt")])
    certificate = load_certificate(certs.service_cert_paths(tmp_path, "worker-gpu")[0])

    for subject in (x509.DNSName("worker-gpu"), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier = PolicyBuilder().store(store).build_server_verifier(subject)
        chain = verifier.verify(certificate, [])
        assert chain[-1] == load_certificate(tmp_path / "ca.crt"), subject


def test_service_certificate_rejects_other_hostname(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])
    store = Store([load_certificate(tmp_path / "ca.crt")])
    certificate = load_certificate(certs.service_cert_paths(tmp_path, "worker-gpu")[0])

    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("example.com"))
    with pytest.raises(VerificationError):
        verifier.verify(certificate, [])


def test_tenant_certificate_has_only_uri_san(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])
    cert_path, key_path = certs.add_tenant(tmp_path, "alpha")
    certificate = load_certificate(cert_path)

    assert cert_path == tmp_path / "tenants" / "alpha.crt"
    assert key_path == tmp_path / "tenants" / "alpha.key"
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://tenantserve/tenant/alpha")]
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_tenant_certificate_chain_verifies(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])
    cert_path, _ = certs.add_tenant(tmp_path, "alpha")
    store = Store([load_certificate(tmp_path / "ca.crt")])

    verifier = PolicyBuilder().store(store).build_client_verifier()
    verified = verifier.verify(load_certificate(cert_path), [])
    assert verified.subjects == [x509.UniformResourceIdentifier("spiffe://tenantserve/tenant/alpha")]


def test_tenant_certificate_from_other_ca_fails(tmp_path: Path) -> None:
    certs.init_certs(tmp_path / "ours", ["localhost"])
    certs.create_ca(tmp_path / "foreign")
    cert_path, _ = certs.add_tenant(tmp_path / "foreign", "alpha")
    store = Store([load_certificate(tmp_path / "ours" / "ca.crt")])

    verifier = PolicyBuilder().store(store).build_client_verifier()
    with pytest.raises(VerificationError):
        verifier.verify(load_certificate(cert_path), [])


def test_tenant_certificate_explicit_dates(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])
    not_before = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    not_after = dt.datetime(2020, 1, 2, tzinfo=dt.timezone.utc)
    cert_path, _ = certs.add_tenant(tmp_path, "expired", not_before=not_before, not_after=not_after)
    certificate = load_certificate(cert_path)

    assert certificate.not_valid_before_utc == not_before
    assert certificate.not_valid_after_utc == not_after


def test_tenant_certificate_valid_days(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])
    certificate = load_certificate(certs.add_tenant(tmp_path, "alpha", valid_days=30)[0])

    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime == dt.timedelta(days=30) + certs.CLOCK_SKEW


@pytest.mark.parametrize(
    "tenant_id",
    ["", "Alpha", "-alpha", "alpha/beta", "alpha beta", "a" * 64, "alpha\n", "../alpha", "alpha_beta", "ä"],
)
def test_add_tenant_rejects_invalid_id(tmp_path: Path, tenant_id: str) -> None:
    certs.init_certs(tmp_path, ["localhost"])

    with pytest.raises(ValueError, match="tenant id"):
        certs.add_tenant(tmp_path, tenant_id)
    assert not (tmp_path / "tenants").exists()


@pytest.mark.parametrize("tenant_id", ["a", "0", "alpha-2", "a" * 63])
def test_add_tenant_accepts_valid_id(tmp_path: Path, tenant_id: str) -> None:
    certs.init_certs(tmp_path, ["localhost"])

    cert_path, _ = certs.add_tenant(tmp_path, tenant_id)

    assert san_values(load_certificate(cert_path), x509.UniformResourceIdentifier) == [
        f"spiffe://tenantserve/tenant/{tenant_id}"
    ]


def test_add_tenant_without_ca_fails(tmp_path: Path) -> None:
    with pytest.raises(certs.CertificateError, match="tenantserve certs init"):
        certs.add_tenant(tmp_path, "alpha")


def test_add_tenant_keeps_existing_certificate(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])
    cert_path, key_path = certs.add_tenant(tmp_path, "alpha")
    before = (cert_path.read_bytes(), key_path.read_bytes())

    assert certs.add_tenant(tmp_path, "alpha") == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_init_certs_is_idempotent(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])
    files = sorted(p for p in tmp_path.rglob("*") if p.suffix in (".crt", ".key"))
    before = {path: path.read_bytes() for path in files}

    certs.init_certs(tmp_path, ["localhost", "other-host"])

    after = {path: path.read_bytes() for path in sorted(p for p in tmp_path.rglob("*") if p.suffix in (".crt", ".key"))}
    assert after == before


def test_init_certs_adds_missing_service(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"], service_names=["scheduler"])
    ca_before = (tmp_path / "ca.crt").read_bytes()

    certs.init_certs(tmp_path, ["localhost"])

    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    for name in certs.SERVICE_NAMES:
        assert certs.service_cert_paths(tmp_path, name)[0].is_file()


def test_init_certs_reports_half_pair(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])
    cert_path, key_path = certs.service_cert_paths(tmp_path, "scheduler")
    cert_path.unlink()

    with pytest.raises(certs.CertificateError, match="scheduler.crt is missing"):
        certs.init_certs(tmp_path, ["localhost"])
    assert key_path.exists()


@pytest.mark.parametrize("host", ["", " localhost", "host name", "hôte", "a..b", "-host", "host/path", "1.2.3.4:80", "host.example."])
def test_init_certs_rejects_invalid_host(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValueError, match="host"):
        certs.init_certs(tmp_path, [host])


def test_init_certs_accepts_wildcard_and_underscore_hosts(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["*.example.com", "stack_worker_1"], service_names=["admission"])

    certificate = load_certificate(certs.service_cert_paths(tmp_path, "admission")[0])
    assert san_values(certificate, x509.DNSName) == ["*.example.com", "stack_worker_1", "admission"]


def test_init_certs_rejects_invalid_service_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="service name 'Worker_GPU' is invalid"):
        certs.init_certs(tmp_path, ["localhost"], service_names=["Worker_GPU"])


def test_concurrent_init_creates_one_ca(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def init() -> None:
        try:
            certs.init_certs(tmp_path, ["localhost"])
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=init) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    ca = load_certificate(tmp_path / "ca.crt")
    for name in certs.SERVICE_NAMES:
        service = load_certificate(certs.service_cert_paths(tmp_path, name)[0])
        service.verify_directly_issued_by(ca)


def test_init_certs_on_read_only_directory(tmp_path: Path) -> None:
    certs.init_certs(tmp_path, ["localhost"])
    (tmp_path / ".lock").unlink()
    tmp_path.chmod(0o555)
    try:
        certs.init_certs(tmp_path, ["localhost"])
    finally:
        tmp_path.chmod(0o755)

    assert not (tmp_path / ".lock").exists()
