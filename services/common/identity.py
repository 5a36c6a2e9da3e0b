"""Caller identity from the verified TLS client certificate.

Every tenantserve certificate carries exactly one URI SAN:
``spiffe://tenantserve/service/<name>`` for a service,
``spiffe://tenantserve/tenant/<tenant_id>`` for a tenant and
``spiffe://tenantserve/admin/<name>`` for an operator of the Admin API.
Identity comes from that SAN only; request metadata is never consulted.
"""

from __future__ import annotations

import enum
import functools
import logging
import re
from dataclasses import dataclass

import grpc
from cryptography import x509

logger = logging.getLogger(__name__)

SPIFFE_TRUST_DOMAIN = "tenantserve"
# Matched with fullmatch, so no prefix, suffix or trailing newline passes.
PEER_URI_PATTERN = re.compile(r"spiffe://tenantserve/(tenant|service|admin)/([a-z0-9][a-z0-9-]{0,62})")


class PeerKind(enum.Enum):
    TENANT = "tenant"
    SERVICE = "service"
    ADMIN = "admin"


@dataclass(frozen=True)
class Peer:
    kind: PeerKind
    name: str


def peer_uri(kind: PeerKind, name: str) -> str:
    """Build the URI SAN that identifies a peer of ``kind`` called ``name``."""
    return f"spiffe://{SPIFFE_TRUST_DOMAIN}/{kind.value}/{name}"


def peer_from_context(context: grpc.aio.ServicerContext) -> Peer | None:
    """Return the peer named by the verified client certificate, or None.

    None means the connection is not TLS, carries no client certificate, or
    the certificate does not have exactly one URI SAN of the tenantserve form.
    """
    auth_context = context.auth_context()
    if auth_context.get("transport_security_type") != [b"ssl"]:
        return None
    pem_certificates = auth_context.get("x509_pem_cert") or []
    if len(pem_certificates) != 1:
        return None
    return peer_from_pem(pem_certificates[0])


@functools.lru_cache(maxsize=1024)
def peer_from_pem(pem: bytes) -> Peer | None:
    """Return the peer named by a PEM certificate's URI SAN, or None.

    The certificate's chain is not checked here; only call this on a
    certificate that TLS has verified.
    """
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        logger.warning("peer certificate is not valid PEM")
        return None
    return peer_from_certificate(certificate)


def peer_from_certificate(certificate: x509.Certificate) -> Peer | None:
    """Return the peer named by the certificate's only URI SAN, or None."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        logger.warning("peer certificate has a malformed extension: %s", exc)
        return None
    if len(uris) != 1:
        return None
    match = PEER_URI_PATTERN.fullmatch(uris[0])
    if match is None:
        return None
    return Peer(kind=PeerKind(match.group(1)), name=match.group(2))
