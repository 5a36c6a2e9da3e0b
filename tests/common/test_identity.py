"""Peer identity from the URI SAN of a client certificate."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.identity import Peer, PeerKind, peer_from_certificate, peer_from_pem
from tests.common.support import certificate_with_sans


def uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("spiffe://tenantserve/tenant/alpha", Peer(PeerKind.TENANT, "alpha")),
        ("spiffe://tenantserve/service/worker-gpu", Peer(PeerKind.SERVICE, "worker-gpu")),
        ("spiffe://tenantserve/admin/ops", Peer(PeerKind.ADMIN, "ops")),
        ("spiffe://tenantserve/tenant/0", Peer(PeerKind.TENANT, "0")),
        ("spiffe://tenantserve/tenant/" + "a" * 63, Peer(PeerKind.TENANT, "a" * 63)),
    ],
)
def test_identity_accepts_valid_uri(value: str, expected: Peer) -> None:
    assert peer_from_certificate(certificate_with_sans([uri(value)])) == expected


@pytest.mark.parametrize(
    "value",
    [
        "spiffe://tenantserve/tenant/a/b",
        "spiffe://tenantserve/tenant/alpha/",
        "spiffe://tenantserve/tenant/alpha\n",
        "spiffe://tenantserve/tenant/alpha?x=1",
        "spiffe://tenantserve/tenant/alpha#frag",
        "spiffe://tenantserve/tenant/",
        "spiffe://tenantserve/tenant/-alpha",
        "spiffe://tenantserve/tenant/Alpha",
        "spiffe://tenantserve/tenant/" + "a" * 64,
        "spiffe://tenantserve/operator/alpha",
        "spiffe://tenantserve/service",
        "spiffe://other/tenant/alpha",
        "spiffe://tenantserve.evil/tenant/alpha",
        "SPIFFE://tenantserve/tenant/alpha",
        "xspiffe://tenantserve/tenant/alpha",
        "https://tenantserve/tenant/alpha",
        " spiffe://tenantserve/tenant/alpha",
    ],
)
def test_identity_rejects_malformed_uri(value: str) -> None:
    assert peer_from_certificate(certificate_with_sans([uri(value)])) is None


def test_identity_rejects_two_uri_sans() -> None:
    certificate = certificate_with_sans(
        [uri("spiffe://tenantserve/tenant/alpha"), uri("spiffe://tenantserve/service/scheduler")]
    )

    assert peer_from_certificate(certificate) is None


def test_identity_rejects_same_uri_twice() -> None:
    certificate = certificate_with_sans([uri("spiffe://tenantserve/tenant/alpha"), uri("spiffe://tenantserve/tenant/alpha")])

    assert peer_from_certificate(certificate) is None


def test_identity_rejects_extra_foreign_uri() -> None:
    certificate = certificate_with_sans([uri("spiffe://tenantserve/tenant/alpha"), uri("https://example.com/")])

    assert peer_from_certificate(certificate) is None


def test_identity_ignores_dns_and_ip_sans() -> None:
    certificate = certificate_with_sans(
        [
            x509.DNSName("scheduler"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            uri("spiffe://tenantserve/service/scheduler"),
        ]
    )

    assert peer_from_certificate(certificate) == Peer(PeerKind.SERVICE, "scheduler")


def test_identity_needs_uri_san() -> None:
    assert peer_from_certificate(certificate_with_sans([x509.DNSName("spiffe://tenantserve/tenant/alpha")])) is None
    assert peer_from_certificate(certificate_with_sans([])) is None


def test_identity_from_pem() -> None:
    certificate = certificate_with_sans([uri("spiffe://tenantserve/tenant/beta")])
    pem = certificate.public_bytes(serialization.Encoding.PEM)

    assert peer_from_pem(pem) == Peer(PeerKind.TENANT, "beta")


def test_identity_from_invalid_pem() -> None:
    assert peer_from_pem(b"-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n") is None
