"""Identify the calling tenant from its verified client certificate."""

from __future__ import annotations

import logging

import grpc

from services.common.config import Config, TenantConfig
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.identity import PeerKind, peer_from_context

logger = logging.getLogger(__name__)


def authenticate_tenant(context: grpc.aio.ServicerContext, config: Config) -> TenantConfig:
    """Return the configured tenant named by the caller's certificate.

    The certificate's URI SAN is the only source of the tenant id: request
    metadata and request fields are never read. Raises Unauthenticated when
    the caller has no tenantserve identity, and PermissionDenied for a
    service certificate or a tenant that is not configured.
    """
    peer = peer_from_context(context)
    if peer is None:
        raise Unauthenticated("the client certificate has no tenantserve identity (URI SAN spiffe://tenantserve/...)")
    if peer.kind is not PeerKind.TENANT:
        raise PermissionDenied(f"the Inference API is for tenants; {peer.kind.value} {peer.name!r} may not call it")
    tenant = config.tenant(peer.name)
    if tenant is None:
        logger.warning("rejected a certificate of unconfigured tenant %s", peer.name, extra={"tenant_id": peer.name})
        raise PermissionDenied(f"tenant {peer.name!r} is not configured")
    return tenant
