"""Identify the calling tenant from its verified client certificate."""

from __future__ import annotations

import dataclasses
import logging
import time

import grpc
import redis.asyncio
import redis.exceptions

from services.common.config import Config, TenantConfig
from services.common.errors import PermissionDenied, Unauthenticated, Unavailable
from services.common.identity import PeerKind, peer_from_context

from . import tenant_limits

logger = logging.getLogger(__name__)

# Seconds a tenant created at runtime stays known to this replica without
# asking Redis again. Disabling and limit changes do not wait for this: the
# decision script reads them from Redis on every request.
RUNTIME_TENANT_CACHE_SECONDS = 5.0


def tenant_peer_name(context: grpc.aio.ServicerContext) -> str:
    """Return the tenant id of the caller's certificate.

    The certificate's URI SAN is the only source of the tenant id: request
    metadata and request fields are never read. Raises Unauthenticated when
    the caller has no tenantserve identity, and PermissionDenied for a
    service or admin certificate.
    """
    peer = peer_from_context(context)
    if peer is None:
        raise Unauthenticated("the client certificate has no tenantserve identity (URI SAN spiffe://tenantserve/...)")
    if peer.kind is not PeerKind.TENANT:
        raise PermissionDenied(f"the Inference API is for tenants; {peer.kind.value} {peer.name!r} may not call it")
    return peer.name


class TenantDirectory:
    """Tenants of the config file, and tenants created at runtime through the Admin API."""

    def __init__(self, config: Config, client: redis.asyncio.Redis) -> None:
        self._config = config
        self._client = client
        # Tenant id -> (tenant, monotonic time when it was read from Redis).
        self._runtime_tenants: dict[str, tuple[TenantConfig, float]] = {}

    async def authenticate(self, context: grpc.aio.ServicerContext) -> TenantConfig:
        """Return the tenant named by the caller's certificate.

        Raises Unauthenticated or PermissionDenied as tenant_peer_name does,
        PermissionDenied for a tenant that is neither configured nor
        created at runtime, and Unavailable when Redis cannot be reached.
        """
        name = tenant_peer_name(context)
        tenant = self._config.tenant(name)
        if tenant is not None:
            return tenant
        cached = self._runtime_tenants.get(name)
        if cached is not None and time.monotonic() - cached[1] < RUNTIME_TENANT_CACHE_SECONDS:
            return cached[0]
        tenant = await self._read_runtime_tenant(name)
        self._runtime_tenants[name] = (tenant, time.monotonic())
        return tenant

    async def _read_runtime_tenant(self, name: str) -> TenantConfig:
        try:
            limits = await tenant_limits.get_tenant(self._client, name)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            logger.warning("cannot look up tenant %s: %s", name, exc, extra={"tenant_id": name})
            raise Unavailable("the tenant store is unavailable; retry the request") from exc
        if limits is None:
            logger.warning("rejected a certificate of unknown tenant %s", name, extra={"tenant_id": name})
            raise PermissionDenied(f"tenant {name!r} is not configured")
        # The decision script enforces the limits stored in Redis. The
        # TenantConfig copies them, and settings that exist only in the
        # config file, such as cache budgets, keep their defaults.
        known = {field.name for field in dataclasses.fields(TenantConfig)}
        values = {key: value for key, value in dataclasses.asdict(limits).items() if key in known}
        return TenantConfig(**values)
