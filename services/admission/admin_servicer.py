"""The Admin API: tenants, their limits and their certificates, for admin certificates only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio
import redis.exceptions

from services.common import certs
from services.common.config import TENANT_NAME_PATTERN
from services.common.errors import InvalidArgument, NotFound, ServiceError, Unavailable, map_errors
from services.common.grpc_server import wrap_handler
from services.common.identity import PeerKind, peer_from_context
from tenantserve.v1 import admin_pb2, admin_pb2_grpc, common_pb2

from . import tenant_limits
from .revocation import RevocationList, normalize_fingerprint
from .tenant_limits import InvalidLimits, TenantExists, TenantLimits, TenantNotFound

logger = logging.getLogger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
ADMIN_METHOD_PREFIX = f"/{ADMIN_SERVICE}/"
QUOTA_STORE_UNAVAILABLE = "the quota store is unavailable; retry the request"
DEFAULT_CERTIFICATE_DAYS = 365
MAX_CERTIFICATE_DAYS = 3650

SERVICE_CLASS_BY_NAME = {
    "interactive": common_pb2.SERVICE_CLASS_INTERACTIVE,
    "batch": common_pb2.SERVICE_CLASS_BATCH,
    "background": common_pb2.SERVICE_CLASS_BACKGROUND,
}
SERVICE_CLASS_NAME_BY_VALUE = {value: name for name, value in SERVICE_CLASS_BY_NAME.items()}
# Tenant fields that UpdateTenant's update_mask may name.
UPDATABLE_FIELDS = frozenset(
    {
        "weight",
        *tenant_limits.INTEGER_LIMITS,
        "allowed_models",
        "allowed_service_classes",
        "service_class_overrides",
        "disabled",
    }
)


class AdminOnlyInterceptor(grpc.aio.ServerInterceptor):
    """Reject Admin RPCs from any certificate but an admin one with PERMISSION_DENIED."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(ADMIN_METHOD_PREFIX):
            return handler
        return wrap_handler(handler, _check_admin)


async def _check_admin(context: grpc.aio.ServicerContext) -> None:
    peer = peer_from_context(context)
    if peer is None or peer.kind is not PeerKind.ADMIN:
        logger.warning("rejected Admin call from peer %s: %s", context.peer(), peer or "no tenantserve identity")
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "the Admin API requires an admin certificate (spiffe://tenantserve/admin/NAME); "
            "create one with `tenantserve certs add-admin NAME`",
        )


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """Serve operators. Every change is logged with the admin's name."""

    def __init__(self, client: redis.asyncio.Redis, cert_dir: Path, revocations: RevocationList) -> None:
        self._client = client
        self._cert_dir = cert_dir
        self._revocations = revocations

    @map_errors
    async def CreateTenant(self, request: admin_pb2.CreateTenantRequest, context: grpc.aio.ServicerContext) -> admin_pb2.Tenant:
        """Create a tenant. Status codes: INVALID_ARGUMENT, ALREADY_EXISTS, UNAVAILABLE."""
        limits = tenant_from_proto(request.tenant)
        async with _quota_store_errors():
            created = await tenant_limits.create_tenant(self._client, limits)
        _log_change(context, "created tenant %s", created.name)
        return tenant_to_proto(created)

    @map_errors
    async def UpdateTenant(self, request: admin_pb2.UpdateTenantRequest, context: grpc.aio.ServicerContext) -> admin_pb2.Tenant:
        """Change the masked fields. Status codes: INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE."""
        name = _check_tenant_name(request.tenant.name, "tenant.name")
        changes = changes_from_mask(request.tenant, list(request.update_mask.paths))
        async with _quota_store_errors():
            updated = await tenant_limits.update_tenant(self._client, name, **changes)
        _log_change(context, "updated tenant %s: %s", name, ", ".join(sorted(changes)))
        return tenant_to_proto(updated)

    @map_errors
    async def DisableTenant(self, request: admin_pb2.DisableTenantRequest, context: grpc.aio.ServicerContext) -> admin_pb2.Tenant:
        """Disable a tenant. Status codes: INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE."""
        name = _check_tenant_name(request.name, "name")
        async with _quota_store_errors():
            disabled = await tenant_limits.disable_tenant(self._client, name)
        _log_change(context, "disabled tenant %s", name)
        return tenant_to_proto(disabled)

    @map_errors
    async def EnableTenant(self, request: admin_pb2.EnableTenantRequest, context: grpc.aio.ServicerContext) -> admin_pb2.Tenant:
        """Enable a disabled tenant. Status codes: INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE."""
        name = _check_tenant_name(request.name, "name")
        async with _quota_store_errors():
            enabled = await tenant_limits.enable_tenant(self._client, name)
        _log_change(context, "enabled tenant %s", name)
        return tenant_to_proto(enabled)

    @map_errors
    async def ListTenants(
        self, request: admin_pb2.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListTenantsResponse:
        """List every tenant. Status codes: UNAVAILABLE."""
        async with _quota_store_errors():
            tenants = await tenant_limits.list_tenants(self._client)
        return admin_pb2.ListTenantsResponse(tenants=[tenant_to_proto(tenant) for tenant in tenants])

    @map_errors
    async def IssueCertificate(
        self, request: admin_pb2.IssueCertificateRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.IssueCertificateResponse:
        """Issue a tenant certificate. Status codes: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, UNAVAILABLE."""
        tenant_id = _check_tenant_name(request.tenant_id, "tenant_id")
        valid_days = request.valid_days or DEFAULT_CERTIFICATE_DAYS
        if not 1 <= valid_days <= MAX_CERTIFICATE_DAYS:
            raise InvalidArgument("valid_days", f"must be between 1 and {MAX_CERTIFICATE_DAYS}, got {valid_days}")
        async with _quota_store_errors():
            tenant = await tenant_limits.get_tenant(self._client, tenant_id)
        if tenant is None:
            raise NotFound(f"tenant {tenant_id!r} not found; create it first")
        try:
            cert_pem, key_pem = await asyncio.to_thread(certs.issue_tenant_pem, self._cert_dir, tenant_id, valid_days)
        except certs.CertificateError as exc:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"this admission server cannot issue certificates: {exc}") from exc
        fingerprint = certs.certificate_fingerprint(cert_pem)
        _log_change(context, "issued certificate %s for tenant %s", fingerprint, tenant_id)
        return admin_pb2.IssueCertificateResponse(
            certificate_pem=cert_pem.decode(), private_key_pem=key_pem.decode(), fingerprint_sha256=fingerprint
        )

    @map_errors
    async def RevokeCertificate(
        self, request: admin_pb2.RevokeCertificateRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeCertificateResponse:
        """Revoke a certificate by fingerprint. Status codes: INVALID_ARGUMENT, UNAVAILABLE."""
        try:
            fingerprint = normalize_fingerprint(request.fingerprint_sha256)
        except ValueError as exc:
            raise InvalidArgument("fingerprint_sha256", str(exc)) from exc
        async with _quota_store_errors():
            added = await self._revocations.revoke(fingerprint)
        _log_change(context, "revoked certificate %s", fingerprint)
        return admin_pb2.RevokeCertificateResponse(fingerprint_sha256=fingerprint, already_revoked=not added)


def tenant_to_proto(limits: TenantLimits) -> admin_pb2.Tenant:
    """Convert stored limits to the Admin API's Tenant message."""
    return admin_pb2.Tenant(
        name=limits.name,
        weight=limits.weight,
        **{limit: getattr(limits, limit) for limit in tenant_limits.INTEGER_LIMITS},
        allowed_models=limits.allowed_models,
        allowed_service_classes=[SERVICE_CLASS_BY_NAME[name] for name in limits.allowed_service_classes],
        service_class_overrides=[
            admin_pb2.ServiceClassOverride(service_class=SERVICE_CLASS_BY_NAME[name], limits=dict(values))
            for name, values in sorted(limits.service_class_overrides.items())
        ],
        disabled=limits.disabled,
        version=limits.version,
    )


def tenant_from_proto(tenant: admin_pb2.Tenant) -> TenantLimits:
    """Convert a Tenant message to limits; raise InvalidArgument for an invalid service class."""
    return TenantLimits(
        name=_check_tenant_name(tenant.name, "tenant.name"),
        weight=tenant.weight,
        **{limit: getattr(tenant, limit) for limit in tenant_limits.INTEGER_LIMITS},
        allowed_models=tuple(tenant.allowed_models),
        allowed_service_classes=_service_class_names(tenant.allowed_service_classes, "tenant.allowed_service_classes"),
        service_class_overrides=_overrides_from_proto(tenant.service_class_overrides),
    )


def changes_from_mask(tenant: admin_pb2.Tenant, paths: list[str]) -> dict[str, Any]:
    """Return the TenantLimits changes that ``paths`` select from ``tenant``; raise InvalidArgument."""
    if not paths:
        raise InvalidArgument("update_mask", "must name at least one field, for example requests_per_minute")
    unknown = sorted(set(paths) - UPDATABLE_FIELDS)
    if unknown:
        raise InvalidArgument(
            "update_mask", f"unknown or read-only field(s) {', '.join(unknown)}; use {', '.join(sorted(UPDATABLE_FIELDS))}"
        )
    everything = {
        "weight": tenant.weight,
        **{limit: getattr(tenant, limit) for limit in tenant_limits.INTEGER_LIMITS},
        "allowed_models": tuple(tenant.allowed_models),
        "disabled": tenant.disabled,
    }
    changes = {}
    for path in paths:
        if path == "allowed_service_classes":
            changes[path] = _service_class_names(tenant.allowed_service_classes, "tenant.allowed_service_classes")
        elif path == "service_class_overrides":
            changes[path] = _overrides_from_proto(tenant.service_class_overrides)
        else:
            changes[path] = everything[path]
    return changes


def _overrides_from_proto(overrides: Any) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = {}
    for index, override in enumerate(overrides):
        field = f"tenant.service_class_overrides[{index}]"
        (name,) = _service_class_names([override.service_class], f"{field}.service_class")
        if name in result:
            raise InvalidArgument(f"{field}.service_class", f"{name} appears twice; give one entry per class")
        result[name] = dict(override.limits)
    return result


def _service_class_names(values: Any, field: str) -> tuple[str, ...]:
    names = []
    for value in values:
        if value not in SERVICE_CLASS_NAME_BY_VALUE:
            raise InvalidArgument(field, f"{value} is not a service class; use INTERACTIVE, BATCH or BACKGROUND")
        names.append(SERVICE_CLASS_NAME_BY_VALUE[value])
    return tuple(names)


def _check_tenant_name(name: str, field: str) -> str:
    if not TENANT_NAME_PATTERN.match(name):
        raise InvalidArgument(field, f"{name!r} is not a tenant id; use 1 to 63 lowercase letters, digits or '-'")
    return name


@contextlib.asynccontextmanager
async def _quota_store_errors() -> AsyncIterator[None]:
    """Map the tenant store's exceptions inside the block to gRPC status errors."""
    try:
        yield
    except InvalidLimits as exc:
        raise InvalidArgument("tenant", str(exc)) from exc
    except TenantExists as exc:
        raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from exc
    except TenantNotFound as exc:
        raise NotFound(str(exc)) from exc
    except redis.exceptions.RedisError as exc:
        logger.error("Admin call failed in Redis: %s", exc)
        raise Unavailable(QUOTA_STORE_UNAVAILABLE) from exc


def _log_change(context: grpc.aio.ServicerContext, message: str, *args: Any) -> None:
    peer = peer_from_context(context)
    admin_name = peer.name if peer is not None else "?"
    logger.info("admin %s " + message, admin_name, *args)
