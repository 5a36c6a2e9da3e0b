"""Per-tenant request rate and concurrency limits, decided atomically in Redis.

Each admission decision is one Lua script run (EVALSHA) over two keys that
share the tenant's hash tag, so the decision is atomic on a single server
and on a cluster:

- ``{tenant}:rpm``: sorted set of request ids scored by admission time in
  microseconds (a sliding-window log). Entries older than 60 s are removed
  before counting.
- ``{tenant}:streams``: sorted set of request ids scored by the expiry of
  their concurrency lease in microseconds. An open stream renews its lease;
  the lease of a stream whose admission process died expires by itself.

All times come from the Redis server's clock (``TIME``), so admission
processes on hosts with skewed clocks agree. A rejected request writes
nothing.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass

import redis.asyncio
import redis.exceptions

from services.common.config import TenantConfig

logger = logging.getLogger(__name__)

RATE_WINDOW_SECONDS = 60
DEFAULT_LEASE_TTL_SECONDS = 30.0

# KEYS[1] = {tenant}:rpm, KEYS[2] = {tenant}:streams
# ARGV[1] = request id, ARGV[2] = max requests per window,
# ARGV[3] = max concurrent streams, ARGV[4] = window in microseconds,
# ARGV[5] = lease time to live in microseconds.
# Returns {status, count, retry_after_us}: status 0 admitted, 1 rejected by
# the rate limit, 2 rejected by the concurrency limit. count is the number
# of requests in the window or of open streams before this request.
ADMIT_SCRIPT = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local request_id = ARGV[1]
local max_requests = tonumber(ARGV[2])
local max_streams = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local lease_ttl = tonumber(ARGV[5])

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local num_requests = redis.call('ZCARD', KEYS[1])
if num_requests >= max_requests then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local retry_after = tonumber(oldest[2]) + window - now
  return {1, num_requests, retry_after}
end

redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local num_streams = redis.call('ZCARD', KEYS[2])
if num_streams >= max_streams then
  return {2, num_streams, 0}
end

redis.call('ZADD', KEYS[1], now, request_id)
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
redis.call('ZADD', KEYS[2], now + lease_ttl, request_id)
redis.call('PEXPIRE', KEYS[2], math.ceil(lease_ttl / 1000))
return {0, num_requests, 0}
"""

# KEYS[1] = {tenant}:streams; ARGV[1] = request id, ARGV[2] = lease time to
# live in microseconds. Returns 1 when the lease was renewed, 0 when it had
# already expired or been released.
RENEW_SCRIPT = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now then
  return 0
end
local lease_ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + lease_ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease_ttl / 1000))
return 1
"""

# KEYS[1] = {tenant}:streams. Returns the number of unexpired leases.
COUNT_STREAMS_SCRIPT = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


class Limit(enum.Enum):
    """A per-tenant limit, named as in the tenant's config."""

    REQUESTS_PER_MINUTE = "requests_per_minute"
    MAX_CONCURRENT_STREAMS = "max_concurrent_streams"


@dataclass(frozen=True)
class Decision:
    """Outcome of one admission decision."""

    admitted: bool
    # The limit that rejected the request; None when admitted.
    rejected_by: Limit | None = None
    # Requests in the window or open streams, whichever limit rejected.
    count: int = 0
    # Seconds until the rate window has room again; 0 when unknown or admitted.
    retry_after_seconds: float = 0.0


def rate_key(tenant_id: str) -> str:
    return f"{{{tenant_id}}}:rpm"


def streams_key(tenant_id: str) -> str:
    return f"{{{tenant_id}}}:streams"


def rejection_message(tenant: TenantConfig, decision: Decision) -> str:
    """Describe a rejection for the caller: which limit, its value and when to retry."""
    if decision.rejected_by is Limit.REQUESTS_PER_MINUTE:
        return (
            f"tenant {tenant.name!r} reached its limit requests_per_minute={tenant.requests_per_minute}; "
            f"retry in {decision.retry_after_seconds:.1f} s"
        )
    return (
        f"tenant {tenant.name!r} reached its limit max_concurrent_streams={tenant.max_concurrent_streams}; "
        "retry when one of its streams ends"
    )


class TenantLimiter:
    """Admit requests under each tenant's limits and track their stream leases."""

    def __init__(self, client: redis.asyncio.Redis, lease_ttl_seconds: float = DEFAULT_LEASE_TTL_SECONDS) -> None:
        if lease_ttl_seconds <= 0:
            raise ValueError(f"lease_ttl_seconds must be > 0, got {lease_ttl_seconds}")
        self._client = client
        self.lease_ttl_seconds = lease_ttl_seconds
        self._lease_ttl_us = int(lease_ttl_seconds * 1_000_000)
        self._admit = client.register_script(ADMIT_SCRIPT)
        self._renew = client.register_script(RENEW_SCRIPT)
        self._count_streams = client.register_script(COUNT_STREAMS_SCRIPT)

    async def admit(self, tenant: TenantConfig, request_id: str) -> Decision:
        """Decide whether ``request_id`` may start; when admitted it holds a lease until released.

        Raises redis.exceptions.RedisError when the server cannot be reached.
        """
        status, count, retry_after_us = await self._admit(
            keys=[rate_key(tenant.name), streams_key(tenant.name)],
            args=[
                request_id,
                tenant.requests_per_minute,
                tenant.max_concurrent_streams,
                RATE_WINDOW_SECONDS * 1_000_000,
                self._lease_ttl_us,
            ],
        )
        if status == 0:
            return Decision(admitted=True, count=int(count))
        limit = Limit.REQUESTS_PER_MINUTE if status == 1 else Limit.MAX_CONCURRENT_STREAMS
        return Decision(
            admitted=False, rejected_by=limit, count=int(count), retry_after_seconds=max(int(retry_after_us), 0) / 1e6
        )

    async def renew(self, tenant_id: str, request_id: str) -> bool:
        """Extend the lease of an open stream; False when it had already expired or been released."""
        renewed = await self._renew(keys=[streams_key(tenant_id)], args=[request_id, self._lease_ttl_us])
        return renewed == 1

    async def release(self, tenant_id: str, request_id: str, *, refund_rate: bool = False) -> None:
        """Drop the stream's lease; with ``refund_rate`` also remove the request from the rate window.

        A refund is for a request that never started, such as one that the
        scheduler rejected, so that it does not count against the rate.
        """
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zrem(streams_key(tenant_id), request_id)
            if refund_rate:
                pipe.zrem(rate_key(tenant_id), request_id)
            await pipe.execute()

    async def num_active_streams(self, tenant_id: str) -> int:
        """Return the tenant's open streams across every admission process."""
        return int(await self._count_streams(keys=[streams_key(tenant_id)]))


class StreamLease:
    """The concurrency lease of one admitted stream, renewed until released.

    Renewal runs every third of the lease's time to live, so a lease
    survives two missed renewals. ``release`` is idempotent.
    """

    def __init__(self, limiter: TenantLimiter, tenant_id: str, request_id: str) -> None:
        self._limiter = limiter
        self._tenant_id = tenant_id
        self._request_id = request_id
        self._renew_task: asyncio.Task[None] | None = asyncio.create_task(self._renew_periodically())
        self._released = False

    async def _renew_periodically(self) -> None:
        interval = self._limiter.lease_ttl_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                renewed = await self._limiter.renew(self._tenant_id, self._request_id)
            except redis.exceptions.RedisError as exc:
                logger.warning(
                    "renewing the stream lease failed: %s",
                    exc,
                    extra={"request_id": self._request_id, "tenant_id": self._tenant_id},
                )
                continue
            if not renewed:
                # The stream keeps running, but it no longer counts against
                # max_concurrent_streams.
                logger.warning(
                    "the stream lease expired before its renewal",
                    extra={"request_id": self._request_id, "tenant_id": self._tenant_id},
                )
                return

    async def release(self, *, refund_rate: bool = False) -> None:
        """Stop renewing and drop the lease. Raises redis.exceptions.RedisError when Redis fails."""
        if self._renew_task is not None:
            self._renew_task.cancel()
            self._renew_task = None
        if self._released:
            return
        self._released = True
        await self._limiter.release(self._tenant_id, self._request_id, refund_rate=refund_rate)
