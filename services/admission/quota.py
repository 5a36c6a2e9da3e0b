"""Admit a request under its tenant's quotas and settle it when its stream ends.

``QuotaGate`` turns a decision of the Redis script into either a
``Reservation`` or a ServiceError with google.rpc details the caller can act
on: RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure, PERMISSION_DENIED
with ErrorInfo, INVALID_ARGUMENT with BadRequest. While Redis cannot be
reached it applies the configured failure policy (quota_outage.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from services.common.config import Config, TenantConfig
from services.common.errors import InvalidArgument, PermissionDenied, ResourceExhausted, ServiceError, Unavailable

from . import metrics
from .limits import AdmissionRequest, Decision, Limit, Outcome, StreamLease, TenantLimiter, rejection_message
from .quota_outage import LocalFallback, QuotaStoreHealth
from .tenant_limits import seed_tenants

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "tenantserve.admission"
QUOTA_STORE_UNAVAILABLE = "the quota store is unavailable; retry the request"
# Retry hint for a full max_concurrent_streams, whose slots free when
# streams end, which no counter predicts.
STREAMS_RETRY_SECONDS = 1.0
SETTLE_RETRY_DELAYS_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
# Request fields that each request-size limit applies to.
LIMIT_FIELDS = {
    Limit.MAX_PROMPT_TOKENS: "prompt",
    Limit.MAX_TOKENS: "sampling.max_tokens",
    Limit.TOKENS_PER_MINUTE: "sampling.max_tokens",
    Limit.DAILY_TOKEN_BUDGET: "sampling.max_tokens",
    Limit.MONTHLY_TOKEN_BUDGET: "sampling.max_tokens",
}


@dataclass
class Reservation:
    """An admitted request's hold on its tenant's quotas until it is settled."""

    tenant_id: str
    request_id: str
    num_prompt_tokens: int
    # False when admitted by the local fallback, with nothing reserved in Redis.
    reserved: bool
    lease: StreamLease | None


class QuotaGate:
    """Admit, settle and undo requests against the tenant quotas in Redis."""

    def __init__(self, config: Config, limiter: TenantLimiter) -> None:
        self._config = config
        self._limiter = limiter
        self.health = QuotaStoreHealth()
        self._fallback = LocalFallback(config.admission)
        # Strong references to fire-and-forget tasks, which asyncio keeps only weakly.
        self._background_tasks: set[asyncio.Task[None]] = set()

    async def admit(self, tenant: TenantConfig, request: AdmissionRequest) -> Reservation:
        """Reserve the request's quotas or raise the ServiceError that explains the rejection.

        A caller cancelled while the decision runs leaves no reservation:
        one admitted after the caller left is settled as never started.
        """
        decision_task = asyncio.create_task(self._limiter.admit(request))
        try:
            decision = await asyncio.shield(decision_task)
        except asyncio.CancelledError:
            decision_task.add_done_callback(lambda task: self._undo_after_cancel(task, request))
            raise
        except redis.exceptions.RedisError as exc:
            self.health.mark_unavailable(exc)
            return self._admit_locally(tenant, request)
        self.health.mark_available()
        if decision.outcome is Outcome.UNKNOWN_TENANT:
            decision = await self._reseed_and_decide(tenant, request)
        _count_decision(request.tenant_id, decision)
        if not decision.admitted:
            raise rejection_error(request.tenant_id, decision)
        lease = StreamLease(self._limiter, request.tenant_id, request.request_id)
        return Reservation(request.tenant_id, request.request_id, request.num_prompt_tokens, True, lease)

    async def _reseed_and_decide(self, tenant: TenantConfig, request: AdmissionRequest) -> Decision:
        """Store the config file's limits again when Redis lost them (a restart without persistence), then decide."""
        try:
            seeded = await seed_tenants(self._limiter.client, [tenant])
            if seeded:
                logger.warning("the limits of tenant %s were missing in Redis; stored them from the config file", tenant.name)
            return await self._limiter.admit(request)
        except redis.exceptions.RedisError as exc:
            self.health.mark_unavailable(exc)
            raise Unavailable(QUOTA_STORE_UNAVAILABLE) from exc

    def _admit_locally(self, tenant: TenantConfig, request: AdmissionRequest) -> Reservation:
        log_extra = {"request_id": request.request_id, "tenant_id": request.tenant_id}
        try:
            self._fallback.admit(tenant)
        except ServiceError as exc:
            logger.error("rejected while the quota store is unavailable: %s", exc.message, extra=log_extra)
            metrics.QUOTA_DECISIONS.labels(request.tenant_id, exc.code.name.lower(), "quota_store").inc()
            raise
        logger.warning("admitted by the local fallback while the quota store is unavailable", extra=log_extra)
        metrics.QUOTA_DECISIONS.labels(request.tenant_id, "admitted_locally", "").inc()
        return Reservation(request.tenant_id, request.request_id, request.num_prompt_tokens, False, None)

    async def settle(self, reservation: Reservation, *, num_completion_tokens: int, started: bool) -> None:
        """Settle once; when Redis fails, retry in the background (the script makes retries idempotent)."""
        if reservation.lease is not None:
            reservation.lease.stop()
        if not reservation.reserved:
            self._fallback.release(reservation.tenant_id)
        try:
            await self._settle(reservation, num_completion_tokens, started)
        except redis.exceptions.RedisError as exc:
            self.health.mark_unavailable(exc)
            logger.warning(
                "settling the request failed: %s; retrying in the background",
                exc,
                extra={"request_id": reservation.request_id, "tenant_id": reservation.tenant_id},
            )
            self._spawn(self._settle_with_retries(reservation, num_completion_tokens, started))

    async def _settle(self, reservation: Reservation, num_completion_tokens: int, started: bool) -> None:
        settled = await self._limiter.settle(
            reservation.tenant_id,
            reservation.request_id,
            num_completion_tokens=num_completion_tokens,
            started=started,
            reserved=reservation.reserved,
            num_prompt_tokens=reservation.num_prompt_tokens,
        )
        self.health.mark_available()
        metrics.SETTLEMENTS.labels("settled" if settled else "duplicate").inc()

    async def _settle_with_retries(self, reservation: Reservation, num_completion_tokens: int, started: bool) -> None:
        log_extra = {"request_id": reservation.request_id, "tenant_id": reservation.tenant_id}
        for delay in SETTLE_RETRY_DELAYS_SECONDS:
            await asyncio.sleep(delay)
            try:
                await self._settle(reservation, num_completion_tokens, started)
                logger.info("settled the request after a retry", extra=log_extra)
                return
            except redis.exceptions.RedisError as exc:
                self.health.mark_unavailable(exc)
        metrics.SETTLEMENTS.labels("failed").inc()
        # A reserved request's lease expires and is reclaimed with its full
        # reservation charged; a locally admitted one is not counted at all.
        logger.error("settling the request failed after every retry; its usage is not recorded", extra=log_extra)

    def _undo_after_cancel(self, decision_task: asyncio.Task[Decision], request: AdmissionRequest) -> None:
        if decision_task.cancelled() or decision_task.exception() is not None or not decision_task.result().admitted:
            return
        reservation = Reservation(request.tenant_id, request.request_id, request.num_prompt_tokens, True, None)
        self._spawn(self.settle(reservation, num_completion_tokens=0, started=False))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)


def rejection_error(tenant_id: str, decision: Decision) -> ServiceError:
    """Build the error for a rejecting decision, with the google.rpc details of its kind."""
    message = rejection_message(tenant_id, decision)
    limit = decision.limit
    assert limit is not None, "an admitted decision is no rejection"
    if decision.outcome is Outcome.RESOURCE_EXHAUSTED:
        retry_after = decision.retry_after_seconds or STREAMS_RETRY_SECONDS
        retry_info = error_details_pb2.RetryInfo(retry_delay=_duration(retry_after))
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=f"tenant:{tenant_id}",
            description=message,
            quota_id=limit.value,
            quota_value=decision.limit_value,
        )
        return ResourceExhausted(message, [retry_info, error_details_pb2.QuotaFailure(violations=[violation])])
    if decision.outcome is Outcome.INVALID_ARGUMENT:
        return InvalidArgument(LIMIT_FIELDS[limit], message)
    if decision.outcome is Outcome.PERMISSION_DENIED:
        info = error_details_pb2.ErrorInfo(reason=limit.name, domain=ERROR_DOMAIN, metadata={"tenant_id": tenant_id})
        return PermissionDenied(message, [info])
    return PermissionDenied(f"tenant {tenant_id!r} has no stored limits; an administrator must create it")


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = math.floor(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))


def _count_decision(tenant_id: str, decision: Decision) -> None:
    if decision.admitted:
        metrics.QUOTA_DECISIONS.labels(tenant_id, "admitted", "").inc()
        return
    limit_name = decision.limit.value if decision.limit else "unknown_tenant"
    metrics.QUOTA_DECISIONS.labels(tenant_id, decision.outcome.name.lower(), limit_name).inc()
