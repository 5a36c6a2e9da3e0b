"""Per-tenant limits decided and settled by the Lua scripts in a real Valkey server."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio

from services.admission import quota_scripts
from services.admission.limits import (
    AdmissionRequest,
    Decision,
    Limit,
    Outcome,
    StreamLease,
    TenantLimiter,
    rate_key,
    rejection_message,
    streams_key,
    tenant_keys,
)
from services.admission.tenant_limits import TenantLimits, set_tenant, update_tenant
from services.common.valkey import redis_client

MODEL = "smollm2-135m-instruct"


def unique_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def make_request(tenant_id: str, request_id: str = "", prompt: int = 10, max_tokens: int = 20, **fields: Any) -> AdmissionRequest:
    values: dict[str, Any] = {"model": MODEL, "service_class": "interactive"}
    values.update(fields)
    return AdmissionRequest(tenant_id, request_id or uuid.uuid4().hex, num_prompt_tokens=prompt, max_tokens=max_tokens, **values)


def run_with_limiter(
    valkey_url: str,
    limits: dict[str, Any],
    body: Callable[[str, TenantLimiter, redis.asyncio.Redis], Awaitable[None]],
    lease_ttl_seconds: float = 30.0,
) -> None:
    """Store a new tenant with ``limits`` and run ``body(tenant_id, limiter, client)``."""

    async def main() -> None:
        client = redis_client(valkey_url)
        tenant_id = unique_name()
        try:
            await set_tenant(client, TenantLimits(name=tenant_id, **limits))
            await body(tenant_id, TenantLimiter(client, lease_ttl_seconds), client)
        finally:
            await client.aclose()

    asyncio.run(main())


async def dump_tenant(client: redis.asyncio.Redis, tenant_id: str) -> dict[str, Any]:
    """Return every key of the tenant with its content, except the limits."""
    state: dict[str, Any] = {}
    for key in tenant_keys(tenant_id)[1:]:
        kind = (await client.type(key)).decode()
        if kind == "zset":
            state[key] = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "hash":
            state[key] = await client.hgetall(key)
        elif kind == "string":
            state[key] = await client.get(key)
    return state


async def hash_ints(client: redis.asyncio.Redis, key: str) -> dict[str, int]:
    return {field.decode(): int(value) for field, value in (await client.hgetall(key)).items()}


def test_rate_limit_exact_under_concurrency(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        decisions = await asyncio.gather(*(limiter.admit(make_request(tenant_id)) for _ in range(50)))
        rejected = [d for d in decisions if not d.admitted]

        assert sum(d.admitted for d in decisions) == 20
        assert {d.limit for d in rejected} == {Limit.REQUESTS_PER_MINUTE}
        assert {d.outcome for d in rejected} == {Outcome.RESOURCE_EXHAUSTED}
        assert await client.zcard(rate_key(tenant_id)) == 20
        assert await client.zcard(streams_key(tenant_id)) == 20
        assert all(0 < d.retry_after_seconds <= 60 for d in rejected)

    run_with_limiter(valkey_url, {"requests_per_minute": 20, "max_concurrent_streams": 100}, body)


def test_concurrency_limit_exact_under_concurrency(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        decisions = await asyncio.gather(*(limiter.admit(make_request(tenant_id)) for _ in range(50)))

        assert sum(d.admitted for d in decisions) == 5
        assert {d.limit for d in decisions if not d.admitted} == {Limit.MAX_CONCURRENT_STREAMS}
        assert await limiter.num_active_streams(tenant_id) == 5
        # Rejected requests consume no part of the rate.
        assert await client.zcard(rate_key(tenant_id)) == 5

    run_with_limiter(valkey_url, {"max_concurrent_streams": 5}, body)


def test_budget_of_one_request_admits_one(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        decisions = await asyncio.gather(
            *(limiter.admit(make_request(tenant_id, prompt=24, max_tokens=1000)) for _ in range(8))
        )
        rejected = [d for d in decisions if not d.admitted]

        assert sum(d.admitted for d in decisions) == 1
        assert {d.limit for d in rejected} == {Limit.DAILY_TOKEN_BUDGET}
        assert {d.used for d in rejected} == {1024}
        assert all(0 < d.retry_after_seconds <= 86400 for d in rejected)

    run_with_limiter(valkey_url, {"daily_token_budget": 1024}, body)


def test_rejection_writes_nothing(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        for _ in range(2):
            assert (await limiter.admit(make_request(tenant_id))).admitted
        before = await dump_tenant(client, tenant_id)

        decisions = [
            await limiter.admit(make_request(tenant_id)),
            await limiter.admit(make_request(tenant_id, model="other-model")),
            await limiter.admit(make_request(tenant_id, max_tokens=5000)),
        ]
        after = await dump_tenant(client, tenant_id)

        assert [d.outcome for d in decisions] == [
            Outcome.RESOURCE_EXHAUSTED,
            Outcome.PERMISSION_DENIED,
            Outcome.INVALID_ARGUMENT,
        ]
        assert after == before

    run_with_limiter(valkey_url, {"requests_per_minute": 2, "allowed_models": (MODEL,), "max_tokens": 1024}, body)


def test_request_checks_name_limit(valkey_url: str) -> None:
    limits = {
        "allowed_models": (MODEL,),
        "allowed_service_classes": ("interactive", "batch"),
        "max_prompt_tokens": 100,
        "max_tokens": 50,
        "tokens_per_minute": 1000,
    }
    cases = [
        (make_request("", model="big-model"), Outcome.PERMISSION_DENIED, Limit.ALLOWED_MODELS),
        (make_request("", service_class="background"), Outcome.PERMISSION_DENIED, Limit.ALLOWED_SERVICE_CLASSES),
        (make_request("", prompt=101), Outcome.INVALID_ARGUMENT, Limit.MAX_PROMPT_TOKENS),
        (make_request("", max_tokens=51), Outcome.INVALID_ARGUMENT, Limit.MAX_TOKENS),
        (make_request("", service_class="batch", prompt=100, max_tokens=50), Outcome.ADMITTED, None),
    ]

    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        for request, outcome, limit in cases:
            decision = await limiter.admit(AdmissionRequest(**{**request.__dict__, "tenant_id": tenant_id}))
            assert (decision.outcome, decision.limit) == (outcome, limit)

    run_with_limiter(valkey_url, limits, body)


def test_disabled_and_unknown_tenant_rejected(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        await update_tenant(client, tenant_id, disabled=True)

        disabled = await limiter.admit(make_request(tenant_id))
        unknown = await limiter.admit(make_request(unique_name()))

        assert (disabled.outcome, disabled.limit) == (Outcome.PERMISSION_DENIED, Limit.DISABLED)
        assert unknown.outcome is Outcome.UNKNOWN_TENANT

    run_with_limiter(valkey_url, {}, body)


def test_service_class_override_applies(valkey_url: str) -> None:
    limits = {
        "requests_per_minute": 10,
        "max_concurrent_streams": 100,
        "service_class_overrides": {"background": {"requests_per_minute": 2}},
    }

    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        background = [await limiter.admit(make_request(tenant_id, service_class="background")) for _ in range(3)]
        interactive = [await limiter.admit(make_request(tenant_id)) for _ in range(9)]

        assert [d.admitted for d in background] == [True, True, False]
        assert background[2].limit_value == 2
        # The counter is shared: 2 background plus 8 interactive fill 10.
        assert sum(d.admitted for d in interactive) == 8

    run_with_limiter(valkey_url, limits, body)


def test_limit_raised_mid_window_applies_at_once(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        first = await asyncio.gather(*(limiter.admit(make_request(tenant_id)) for _ in range(6)))
        await update_tenant(client, tenant_id, requests_per_minute=7)
        second = await asyncio.gather(*(limiter.admit(make_request(tenant_id)) for _ in range(6)))

        assert sum(d.admitted for d in first) == 3
        assert sum(d.admitted for d in second) == 4
        assert {d.version for d in second} == {2}

    run_with_limiter(valkey_url, {"requests_per_minute": 3, "max_concurrent_streams": 100}, body)


def test_tokens_per_minute_reserved_then_refunded(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        first = make_request(tenant_id, prompt=10, max_tokens=40)
        assert (await limiter.admit(first)).admitted
        blocked = await limiter.admit(make_request(tenant_id, prompt=10, max_tokens=50))

        assert await limiter.settle(tenant_id, first.request_id, num_completion_tokens=5, started=True)
        after_refund = await limiter.admit(make_request(tenant_id, prompt=10, max_tokens=50))
        report = await limiter.report(tenant_id)

        assert (blocked.outcome, blocked.limit) == (Outcome.RESOURCE_EXHAUSTED, Limit.TOKENS_PER_MINUTE)
        assert blocked.used == 50
        assert 59 < blocked.retry_after_seconds <= 60
        assert after_refund.admitted
        assert report.limit(Limit.TOKENS_PER_MINUTE).used == 15 + 60
        assert report.limit(Limit.TOKENS_PER_MINUTE).remaining == 25

    run_with_limiter(valkey_url, {"tokens_per_minute": 100}, body)


def test_settle_is_idempotent(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        request = make_request(tenant_id, prompt=12, max_tokens=30)
        assert (await limiter.admit(request)).admitted

        results = await asyncio.gather(
            *(limiter.settle(tenant_id, request.request_id, num_completion_tokens=7, started=True) for _ in range(5))
        )
        usage = await hash_ints(client, f"{{{tenant_id}}}:usage")

        assert sorted(results) == [False, False, False, False, True]
        assert usage == {"requests": 1, "prompt_tokens": 12, "completion_tokens": 7}
        assert (await limiter.report(tenant_id)).limit(Limit.DAILY_TOKEN_BUDGET).used == 19

    run_with_limiter(valkey_url, {}, body)


def test_settle_not_started_refunds_everything(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        request = make_request(tenant_id)
        assert (await limiter.admit(request)).admitted

        await limiter.settle(tenant_id, request.request_id, num_completion_tokens=0, started=False)
        report = await limiter.report(tenant_id)

        assert [usage.used for usage in report.limits] == [0, 0, 0, 0, 0]
        assert report.num_requests == 0
        assert (await limiter.admit(make_request(tenant_id))).admitted

    run_with_limiter(valkey_url, {"requests_per_minute": 1}, body)


def test_mixed_outcomes_account_exactly(valkey_url: str) -> None:
    rng = random.Random(7)

    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        requests = [make_request(tenant_id, prompt=rng.randint(1, 50), max_tokens=rng.randint(1, 64)) for _ in range(60)]
        decisions = await asyncio.gather(*(limiter.admit(request) for request in requests))
        assert all(d.admitted for d in decisions)
        # finished, cancelled midway, failed before any token, never started
        outcomes = [rng.choice(["finished", "cancelled", "failed", "not_started"]) for _ in requests]
        completions = [
            r.max_tokens if o == "finished" else rng.randint(0, r.max_tokens) if o == "cancelled" else 0
            for r, o in zip(requests, outcomes)
        ]
        await asyncio.gather(
            *(
                limiter.settle(tenant_id, r.request_id, num_completion_tokens=c, started=o != "not_started")
                for r, o, c in zip(requests, outcomes, completions)
            )
        )
        started = [(r, c) for r, o, c in zip(requests, outcomes, completions) if o != "not_started"]
        expected_tokens = sum(r.num_prompt_tokens + c for r, c in started)
        usage = await hash_ints(client, f"{{{tenant_id}}}:usage")
        report = await limiter.report(tenant_id)

        assert usage["requests"] == len(started)
        assert usage["prompt_tokens"] == sum(r.num_prompt_tokens for r, _ in started)
        assert usage["completion_tokens"] == sum(c for _, c in started)
        assert report.limit(Limit.TOKENS_PER_MINUTE).used == expected_tokens
        assert report.limit(Limit.DAILY_TOKEN_BUDGET).used == expected_tokens
        assert report.limit(Limit.MONTHLY_TOKEN_BUDGET).used == expected_tokens
        assert report.limit(Limit.REQUESTS_PER_MINUTE).used == len(started)
        assert report.limit(Limit.MAX_CONCURRENT_STREAMS).used == 0
        assert await client.hlen(f"{{{tenant_id}}}:reservations") == 0

    run_with_limiter(valkey_url, {"max_concurrent_streams": 100}, body)


def test_expired_lease_reclaimed_with_reservation(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        # Admitted and never renewed or settled, as by a process that died.
        orphan = make_request(tenant_id, prompt=10, max_tokens=90)
        assert (await limiter.admit(orphan)).admitted
        blocked = await limiter.admit(make_request(tenant_id))

        await asyncio.sleep(0.4)
        after_expiry = await limiter.admit(make_request(tenant_id, prompt=1, max_tokens=1))
        report = await limiter.report(tenant_id)

        assert blocked.limit is Limit.MAX_CONCURRENT_STREAMS
        assert after_expiry.admitted
        assert report.num_reclaimed_requests == 1
        assert report.reclaimed_tokens == 100
        assert report.num_requests == 0
        # The reclaimed reservation stays charged in full.
        assert report.limit(Limit.DAILY_TOKEN_BUDGET).used == 102
        assert report.limit(Limit.TOKENS_PER_MINUTE).used == 102


def test_late_settlement_replaces_reclaim(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        # The lease expires, as when admission loses Redis for longer than the lease.
        request = make_request(tenant_id, prompt=10, max_tokens=90)
        assert (await limiter.admit(request)).admitted
        await asyncio.sleep(0.4)
        assert (await limiter.report(tenant_id)).num_reclaimed_requests == 1

        settled = [await limiter.settle(tenant_id, request.request_id, num_completion_tokens=3, started=True) for _ in range(2)]
        report = await limiter.report(tenant_id)

        assert settled == [True, False]
        assert report.num_reclaimed_requests == 0
        assert report.reclaimed_tokens == 0
        assert report.num_requests == 1
        assert report.completion_tokens == 3
        assert report.limit(Limit.DAILY_TOKEN_BUDGET).used == 13
        assert report.limit(Limit.TOKENS_PER_MINUTE).used == 13

    run_with_limiter(valkey_url, {}, body, lease_ttl_seconds=0.3)

    run_with_limiter(valkey_url, {"max_concurrent_streams": 1}, body, lease_ttl_seconds=0.3)


def test_stream_lease_renews_until_stopped(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        request = make_request(tenant_id)
        assert (await limiter.admit(request)).admitted
        lease = StreamLease(limiter, tenant_id, request.request_id)

        # Three lease lifetimes: without renewal the lease would be gone.
        await asyncio.sleep(0.9)
        assert await limiter.num_active_streams(tenant_id) == 1

        lease.stop()
        lease.stop()  # idempotent
        await limiter.settle(tenant_id, request.request_id, num_completion_tokens=1, started=True)
        assert await limiter.num_active_streams(tenant_id) == 0
        assert not await limiter.renew(tenant_id, request.request_id)

    run_with_limiter(valkey_url, {"max_concurrent_streams": 1}, body, lease_ttl_seconds=0.3)


def test_decision_and_settlement_one_evalsha_each(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        warm_up = make_request(tenant_id)
        await limiter.admit(warm_up)  # loads the scripts on a NOSCRIPT reply
        await limiter.settle(tenant_id, warm_up.request_id, num_completion_tokens=1, started=True)
        await client.config_resetstat()

        counted = make_request(tenant_id)
        await limiter.admit(counted)
        await limiter.settle(tenant_id, counted.request_id, num_completion_tokens=1, started=True)
        stats = await client.info("commandstats")

        assert stats["cmdstat_evalsha"]["calls"] == 2
        assert "cmdstat_eval" not in stats
        sha = hashlib.sha1(quota_scripts.DECIDE_SCRIPT.encode()).hexdigest()
        assert await client.script_exists(sha) == [True]

    run_with_limiter(valkey_url, {}, body)


def test_keys_share_tenant_hash_tag(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        request = make_request(tenant_id)
        await limiter.admit(request)
        await limiter.settle(tenant_id, request.request_id, num_completion_tokens=1, started=True)

        keys = {key.decode() for key in await client.keys(f"*{tenant_id}*")}
        assert keys <= set(tenant_keys(tenant_id))
        assert all(key.startswith(f"{{{tenant_id}}}:") for key in keys)
        assert 0 < await client.pttl(rate_key(tenant_id)) <= 60_000

    run_with_limiter(valkey_url, {}, body)


def test_report_reset_times(valkey_url: str) -> None:
    async def body(tenant_id: str, limiter: TenantLimiter, client: redis.asyncio.Redis) -> None:
        await limiter.admit(make_request(tenant_id))
        report = await limiter.report(tenant_id)
        seconds, _ = await client.time()
        now = dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
        next_day = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
        next_month = dt.datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=dt.timezone.utc)

        assert report.limit(Limit.DAILY_TOKEN_BUDGET).reset_time == next_day.timestamp()
        assert report.limit(Limit.MONTHLY_TOKEN_BUDGET).reset_time == next_month.timestamp()
        assert 59 < report.limit(Limit.REQUESTS_PER_MINUTE).reset_time - seconds <= 61
        assert report.limit(Limit.MAX_CONCURRENT_STREAMS).reset_time == 0

    run_with_limiter(valkey_url, {}, body)


def test_rejection_message_names_limit() -> None:
    rate = rejection_message("alpha", Decision(Outcome.RESOURCE_EXHAUSTED, Limit.REQUESTS_PER_MINUTE, 20, 20, 12.34))
    streams = rejection_message("alpha", Decision(Outcome.RESOURCE_EXHAUSTED, Limit.MAX_CONCURRENT_STREAMS, 5, 5))
    size = rejection_message("alpha", Decision(Outcome.INVALID_ARGUMENT, Limit.MAX_TOKENS, 50, 51))

    assert rate == "tenant 'alpha' reached its limit requests_per_minute=20 (20 used); retry in 12.3 s"
    assert "max_concurrent_streams=5" in streams
    assert size == "51 exceeds the tenant's limit max_tokens=50"
