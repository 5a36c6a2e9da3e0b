"""Per-tenant limits decided, and reservations settled, atomically in Redis.

One admission decision is one EVALSHA of ``DECIDE_SCRIPT``. The script
reads the tenant's limits from ``{tenant}:limits`` and checks every limit.
Only when all pass does it reserve a rate slot, a concurrency lease, and
``prompt_tokens + max_tokens`` tokens against the tokens-per-minute window
and the daily and monthly budgets. A rejected request reserves nothing. When the stream
ends, one EVALSHA of ``SETTLE_SCRIPT`` returns the unused tokens and
records the usage, at most once per request id. quota_scripts.py
describes the keys.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass

import redis.asyncio
import redis.exceptions

from . import quota_scripts

logger = logging.getLogger(__name__)

RATE_WINDOW_SECONDS = 60
DEFAULT_LEASE_TTL_SECONDS = 30.0
KEY_SUFFIXES = ("limits", "rpm", "tpm", "tpm_sum", "streams", "reservations", "budget", "usage", "settled", "reclaimed")


class Limit(enum.Enum):
    """A per-tenant limit, named as in the tenant's stored limits."""

    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_MINUTE = "tokens_per_minute"
    MAX_CONCURRENT_STREAMS = "max_concurrent_streams"
    DAILY_TOKEN_BUDGET = "daily_token_budget"
    MONTHLY_TOKEN_BUDGET = "monthly_token_budget"
    MAX_PROMPT_TOKENS = "max_prompt_tokens"
    MAX_TOKENS = "max_tokens"
    ALLOWED_MODELS = "allowed_models"
    ALLOWED_SERVICE_CLASSES = "allowed_service_classes"
    DISABLED = "disabled"


class Outcome(enum.Enum):
    ADMITTED = 0
    RESOURCE_EXHAUSTED = 1
    PERMISSION_DENIED = 2
    INVALID_ARGUMENT = 3
    UNKNOWN_TENANT = 4


@dataclass(frozen=True)
class AdmissionRequest:
    """The fields of one request that the decision script checks."""

    tenant_id: str
    request_id: str
    model: str
    # interactive, batch or background.
    service_class: str
    num_prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class Decision:
    """Outcome of one admission decision."""

    outcome: Outcome
    # The limit that rejected the request; None when admitted.
    limit: Limit | None = None
    # The limit's value and the count it was compared with (for the
    # request-size checks, the request's own size).
    limit_value: int = 0
    used: int = 0
    # Seconds until the limit has room again; 0 when not known.
    retry_after_seconds: float = 0.0
    # Version of the limits the decision used.
    version: int = 0

    @property
    def admitted(self) -> bool:
        return self.outcome is Outcome.ADMITTED


@dataclass(frozen=True)
class LimitUsage:
    """Use of one limit: ``limit`` 0 means no limit; ``reset_time`` in Unix seconds, 0 when none."""

    limit: Limit
    limit_value: int
    used: int
    reset_time: float

    @property
    def remaining(self) -> int:
        return max(self.limit_value - self.used, 0) if self.limit_value > 0 else 0


@dataclass(frozen=True)
class UsageReport:
    """A tenant's settled usage and the use of each counted limit."""

    version: int
    limits: tuple[LimitUsage, ...]
    num_requests: int
    prompt_tokens: int
    completion_tokens: int
    num_reclaimed_requests: int
    reclaimed_tokens: int

    def limit(self, limit: Limit) -> LimitUsage:
        return next(usage for usage in self.limits if usage.limit is limit)


REPORTED_LIMITS = (
    Limit.REQUESTS_PER_MINUTE,
    Limit.TOKENS_PER_MINUTE,
    Limit.MAX_CONCURRENT_STREAMS,
    Limit.DAILY_TOKEN_BUDGET,
    Limit.MONTHLY_TOKEN_BUDGET,
)


def tenant_keys(tenant_id: str) -> list[str]:
    """Return the KEYS of every quota script for ``tenant_id``, in the scripts' order."""
    return [f"{{{tenant_id}}}:{suffix}" for suffix in KEY_SUFFIXES]


def rate_key(tenant_id: str) -> str:
    return f"{{{tenant_id}}}:rpm"


def streams_key(tenant_id: str) -> str:
    return f"{{{tenant_id}}}:streams"


def rejection_message(tenant_id: str, decision: Decision) -> str:
    """Describe a rejection for the caller: which limit, its value and what to do."""
    limit = decision.limit
    assert limit is not None, "an admitted request has no rejection message"
    name = limit.value
    if limit is Limit.DISABLED:
        return f"tenant {tenant_id!r} is disabled"
    if limit is Limit.ALLOWED_MODELS:
        return f"tenant {tenant_id!r} may not use this model; ListModels returns the models it may use"
    if limit is Limit.ALLOWED_SERVICE_CLASSES:
        return f"tenant {tenant_id!r} may not use this service class"
    if decision.outcome is Outcome.INVALID_ARGUMENT:
        return f"{decision.used} exceeds the tenant's limit {name}={decision.limit_value}"
    if limit is Limit.MAX_CONCURRENT_STREAMS:
        return f"tenant {tenant_id!r} reached its limit {name}={decision.limit_value}; retry when one of its streams ends"
    return (
        f"tenant {tenant_id!r} reached its limit {name}={decision.limit_value} "
        f"({decision.used} used); retry in {decision.retry_after_seconds:.1f} s"
    )


class TenantLimiter:
    """Admit requests under each tenant's stored limits, renew their leases and settle them."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        lease_ttl_seconds: float = DEFAULT_LEASE_TTL_SECONDS,
        settled_retention_seconds: float = quota_scripts.SETTLED_RETENTION_SECONDS,
    ) -> None:
        if lease_ttl_seconds <= 0:
            raise ValueError(f"lease_ttl_seconds must be > 0, got {lease_ttl_seconds}")
        self.client = client
        self.lease_ttl_seconds = lease_ttl_seconds
        self._lease_ttl_us = int(lease_ttl_seconds * 1_000_000)
        self._retention_us = int(settled_retention_seconds * 1_000_000)
        self._decide = client.register_script(quota_scripts.DECIDE_SCRIPT)
        self._settle = client.register_script(quota_scripts.SETTLE_SCRIPT)
        self._renew = client.register_script(quota_scripts.RENEW_SCRIPT)
        self._report = client.register_script(quota_scripts.REPORT_SCRIPT)

    async def admit(self, request: AdmissionRequest) -> Decision:
        """Decide whether the request may start. An admitted request keeps its reservation until settled.

        Raises redis.exceptions.RedisError when the server cannot be reached.
        """
        outcome, limit_name, limit_value, used, retry_after_us, version = await self._decide(
            keys=tenant_keys(request.tenant_id),
            args=[
                request.request_id,
                request.model,
                request.service_class,
                request.num_prompt_tokens,
                request.max_tokens,
                self._lease_ttl_us,
                self._retention_us,
            ],
        )
        limit_text = limit_name.decode() if isinstance(limit_name, bytes) else str(limit_name)
        return Decision(
            outcome=Outcome(int(outcome)),
            limit=Limit(limit_text) if limit_text else None,
            limit_value=int(limit_value),
            used=int(used),
            retry_after_seconds=max(int(retry_after_us), 0) / 1e6,
            version=int(version),
        )

    async def settle(
        self,
        tenant_id: str,
        request_id: str,
        *,
        num_completion_tokens: int,
        started: bool,
        reserved: bool = True,
        num_prompt_tokens: int = 0,
    ) -> bool:
        """Return the unused part of the reservation and record the usage, once per request id.

        ``started`` is False for a request that never reached the model: it
        is then refunded in full, its rate slot included, and no usage is
        recorded. ``reserved`` is False for a request admitted while Redis
        was unreachable; its ``num_prompt_tokens`` and completion tokens
        are then counted once. A request whose lease was reclaimed is
        settled too, replacing its full charge. Returns False when the
        request was already settled. Raises redis.exceptions.RedisError.
        """
        outcome, _unused = await self._settle(
            keys=tenant_keys(tenant_id),
            args=[
                request_id,
                num_completion_tokens,
                "1" if started else "0",
                "1" if reserved else "0",
                num_prompt_tokens,
                self._retention_us,
            ],
        )
        return int(outcome) == 0

    async def renew(self, tenant_id: str, request_id: str) -> bool:
        """Extend the lease of an open stream; False when it had already expired or been settled."""
        renewed = await self._renew(keys=tenant_keys(tenant_id), args=[request_id, self._lease_ttl_us])
        return renewed == 1

    async def report(self, tenant_id: str) -> UsageReport:
        """Return the tenant's usage per limit, after reclaiming expired leases. Raises RedisError."""
        values = [int(value) for value in await self._report(keys=tenant_keys(tenant_id), args=[self._retention_us])]
        limits = tuple(
            LimitUsage(limit, values[1 + 3 * i], values[2 + 3 * i], values[3 + 3 * i] / 1e6)
            for i, limit in enumerate(REPORTED_LIMITS)
        )
        num_requests, prompt_tokens, completion_tokens, num_reclaimed, reclaimed_tokens = values[16:21]
        return UsageReport(values[0], limits, num_requests, prompt_tokens, completion_tokens, num_reclaimed, reclaimed_tokens)

    async def num_active_streams(self, tenant_id: str) -> int:
        """Return the tenant's unexpired leases across every admission process."""
        return (await self.report(tenant_id)).limit(Limit.MAX_CONCURRENT_STREAMS).used


class StreamLease:
    """Renew the concurrency lease of one admitted stream every third of its time to live.

    A lease therefore survives two missed renewals. ``stop`` is idempotent.
    """

    def __init__(self, limiter: TenantLimiter, tenant_id: str, request_id: str) -> None:
        self._limiter = limiter
        self._tenant_id = tenant_id
        self._request_id = request_id
        self._renew_task: asyncio.Task[None] | None = asyncio.create_task(self._renew_periodically())

    async def _renew_periodically(self) -> None:
        interval = self._limiter.lease_ttl_seconds / 3
        log_extra = {"request_id": self._request_id, "tenant_id": self._tenant_id}
        while True:
            await asyncio.sleep(interval)
            try:
                renewed = await self._limiter.renew(self._tenant_id, self._request_id)
            except redis.exceptions.RedisError as exc:
                logger.warning("renewing the stream lease failed: %s", exc, extra=log_extra)
                continue
            if not renewed:
                # The lease was reclaimed: the full reservation stays charged
                # and the stream no longer counts against max_concurrent_streams.
                logger.warning("the stream lease expired before its renewal and was reclaimed", extra=log_extra)
                return

    def stop(self) -> None:
        """Stop renewing; settlement removes the lease itself."""
        if self._renew_task is not None:
            self._renew_task.cancel()
            self._renew_task = None
