"""Per-tenant limits decided by one Lua script in a real Valkey server."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio

from services.admission.limits import (
    ADMIT_SCRIPT,
    Decision,
    Limit,
    StreamLease,
    TenantLimiter,
    rate_key,
    rejection_message,
    streams_key,
)
from services.common.config import TenantConfig
from services.common.valkey import redis_client


def unique_tenant(requests_per_minute: int = 600, max_concurrent_streams: int = 8) -> TenantConfig:
    """A tenant whose keys no other test touches."""
    return TenantConfig(
        name=f"t-{uuid.uuid4().hex[:12]}",
        requests_per_minute=requests_per_minute,
        max_concurrent_streams=max_concurrent_streams,
    )


def run_with_limiter(
    valkey_url: str, body: Callable[[TenantLimiter, redis.asyncio.Redis], Awaitable[None]], lease_ttl_seconds: float = 30.0
) -> None:
    async def main() -> None:
        client = redis_client(valkey_url)
        try:
            await body(TenantLimiter(client, lease_ttl_seconds), client)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_rate_limit_exact_under_concurrency(valkey_url: str) -> None:
    tenant = unique_tenant(requests_per_minute=20, max_concurrent_streams=100)

    async def body(limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        decisions = await asyncio.gather(*(limiter.admit(tenant, f"r{i}") for i in range(50)))
        rejected = [d for d in decisions if not d.admitted]

        assert sum(d.admitted for d in decisions) == 20
        assert {d.rejected_by for d in rejected} == {Limit.REQUESTS_PER_MINUTE}
        assert await client.zcard(rate_key(tenant.name)) == 20
        assert await client.zcard(streams_key(tenant.name)) == 20
        assert all(0 < d.retry_after_seconds <= 60 for d in rejected)

    run_with_limiter(valkey_url, body)


def test_concurrency_limit_exact_under_concurrency(valkey_url: str) -> None:
    tenant = unique_tenant(requests_per_minute=600, max_concurrent_streams=5)

    async def body(limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        decisions = await asyncio.gather(*(limiter.admit(tenant, f"r{i}") for i in range(50)))

        assert sum(d.admitted for d in decisions) == 5
        assert {d.rejected_by for d in decisions if not d.admitted} == {Limit.MAX_CONCURRENT_STREAMS}
        assert await limiter.num_active_streams(tenant.name) == 5
        # Rejected requests consume no part of the rate.
        assert await client.zcard(rate_key(tenant.name)) == 5

    run_with_limiter(valkey_url, body)


def test_rejection_writes_nothing(valkey_url: str) -> None:
    tenant = unique_tenant(requests_per_minute=2, max_concurrent_streams=8)

    async def body(limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        for request_id in ("a", "b"):
            assert (await limiter.admit(tenant, request_id)).admitted
        keys = [rate_key(tenant.name), streams_key(tenant.name)]
        before = [await client.zrange(key, 0, -1, withscores=True) for key in keys]

        decision = await limiter.admit(tenant, "c")
        after = [await client.zrange(key, 0, -1, withscores=True) for key in keys]

        assert not decision.admitted
        assert after == before

    run_with_limiter(valkey_url, body)


def test_admission_is_one_evalsha(valkey_url: str) -> None:
    tenant = unique_tenant()

    async def body(limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        await limiter.admit(tenant, "warm-up")  # loads the script on a NOSCRIPT reply
        await client.config_resetstat()

        await limiter.admit(tenant, "counted")
        stats = await client.info("commandstats")

        assert stats["cmdstat_evalsha"]["calls"] == 1
        assert "cmdstat_eval" not in stats
        assert await client.script_exists(hashlib.sha1(ADMIT_SCRIPT.encode()).hexdigest()) == [True]

    run_with_limiter(valkey_url, body)


def test_keys_share_tenant_hash_tag(valkey_url: str) -> None:
    tenant = unique_tenant()

    async def body(limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        await limiter.admit(tenant, "r1")

        keys = sorted(key.decode() for key in await client.keys(f"{{{tenant.name}}}:*"))
        assert keys == [f"{{{tenant.name}}}:rpm", f"{{{tenant.name}}}:streams"]
        assert 0 < await client.pttl(rate_key(tenant.name)) <= 60_000
        assert 0 < await client.pttl(streams_key(tenant.name)) <= 30_000

    run_with_limiter(valkey_url, body)


def test_release_frees_stream_place(valkey_url: str) -> None:
    tenant = unique_tenant(max_concurrent_streams=1)

    async def body(limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        assert (await limiter.admit(tenant, "first")).admitted
        assert not (await limiter.admit(tenant, "second")).admitted

        await limiter.release(tenant.name, "first")

        assert await limiter.num_active_streams(tenant.name) == 0
        assert (await limiter.admit(tenant, "third")).admitted
        # A release keeps the request in the rate window.
        assert await client.zcard(rate_key(tenant.name)) == 2

    run_with_limiter(valkey_url, body)


def test_refund_removes_rate_entry(valkey_url: str) -> None:
    tenant = unique_tenant(requests_per_minute=1)

    async def body(limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        assert (await limiter.admit(tenant, "never-started")).admitted

        await limiter.release(tenant.name, "never-started", refund_rate=True)

        assert await client.zcard(rate_key(tenant.name)) == 0
        assert (await limiter.admit(tenant, "next")).admitted

    run_with_limiter(valkey_url, body)


def test_lease_of_dead_process_expires(valkey_url: str) -> None:
    tenant = unique_tenant(max_concurrent_streams=1)

    async def body(limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        # Admitted and never released or renewed, as by a process that died.
        assert (await limiter.admit(tenant, "orphan")).admitted
        assert not (await limiter.admit(tenant, "blocked")).admitted

        await asyncio.sleep(0.4)

        assert await limiter.num_active_streams(tenant.name) == 0
        assert (await limiter.admit(tenant, "after-expiry")).admitted

    run_with_limiter(valkey_url, body, lease_ttl_seconds=0.3)


def test_stream_lease_renews_until_released(valkey_url: str) -> None:
    tenant = unique_tenant(max_concurrent_streams=1)

    async def body(limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        assert (await limiter.admit(tenant, "long-stream")).admitted
        lease = StreamLease(limiter, tenant.name, "long-stream")

        # Three lease lifetimes: without renewal the lease would be gone.
        await asyncio.sleep(0.9)
        assert await limiter.num_active_streams(tenant.name) == 1

        await lease.release()
        await lease.release()  # idempotent
        assert await limiter.num_active_streams(tenant.name) == 0
        assert not await limiter.renew(tenant.name, "long-stream")

    run_with_limiter(valkey_url, body, lease_ttl_seconds=0.3)


def test_rejection_message_names_limit() -> None:
    tenant = unique_tenant(requests_per_minute=20, max_concurrent_streams=5)

    rate = rejection_message(tenant, Decision(False, Limit.REQUESTS_PER_MINUTE, 20, 12.34))
    streams = rejection_message(tenant, Decision(False, Limit.MAX_CONCURRENT_STREAMS, 5))

    assert "requests_per_minute=20" in rate
    assert "retry in 12.3 s" in rate
    assert "max_concurrent_streams=5" in streams
