"""QuotaGate: rejection details, lost limits and the local fallback of the Redis failure policy."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from services.admission.limits import AdmissionRequest, Decision, Limit, Outcome, TenantLimiter
from services.admission.quota import QuotaGate, rejection_error
from services.admission.quota_outage import LocalFallback
from services.admission.tenant_limits import limits_key, seed_tenants
from services.common.config import AdmissionConfig, TenantConfig
from services.common.errors import ResourceExhausted, Unavailable
from services.common.valkey import redis_client

from .support import MODEL, make_cert_dir, make_config


def test_exhausted_quota_has_retry_and_quota_details() -> None:
    error = rejection_error("alpha", Decision(Outcome.RESOURCE_EXHAUSTED, Limit.TOKENS_PER_MINUTE, 1000, 990, 12.5))
    retry_info, quota_failure = error.details

    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert isinstance(retry_info, error_details_pb2.RetryInfo)
    assert retry_info.retry_delay.seconds == 12
    assert retry_info.retry_delay.nanos == 500_000_000
    assert isinstance(quota_failure, error_details_pb2.QuotaFailure)
    assert quota_failure.violations[0].quota_id == "tokens_per_minute"
    assert quota_failure.violations[0].quota_value == 1000
    assert quota_failure.violations[0].subject == "tenant:alpha"


def test_full_streams_retry_hint_is_one_second() -> None:
    error = rejection_error("alpha", Decision(Outcome.RESOURCE_EXHAUSTED, Limit.MAX_CONCURRENT_STREAMS, 2, 2))

    assert error.details[0].retry_delay.seconds == 1


@pytest.mark.parametrize(
    ("limit", "field"),
    [(Limit.MAX_PROMPT_TOKENS, "prompt"), (Limit.MAX_TOKENS, "sampling.max_tokens"), (Limit.DAILY_TOKEN_BUDGET, "sampling.max_tokens")],
)
def test_request_over_size_limit_has_bad_request(limit: Limit, field: str) -> None:
    error = rejection_error("alpha", Decision(Outcome.INVALID_ARGUMENT, limit, 100, 150))
    (bad_request,) = error.details

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request.field_violations[0].field == field
    assert bad_request.field_violations[0].description == f"150 exceeds the tenant's limit {limit.value}=100"


def test_model_not_allowed_has_error_info() -> None:
    error = rejection_error("alpha", Decision(Outcome.PERMISSION_DENIED, Limit.ALLOWED_MODELS))
    (error_info,) = error.details

    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error_info.reason == "ALLOWED_MODELS"
    assert error_info.metadata["tenant_id"] == "alpha"


def test_lost_limits_stored_again(tmp_path: Path, valkey_url: str) -> None:
    tenant_id = f"t-{uuid.uuid4().hex[:12]}"
    config = make_config(make_cert_dir(tmp_path, []), valkey_url, [{"name": tenant_id, "requests_per_minute": 7}])
    tenant = config.tenant(tenant_id)
    assert tenant is not None

    async def main() -> tuple[bool, bytes | None]:
        client = redis_client(valkey_url)
        try:
            await seed_tenants(client, [tenant])
            await client.delete(limits_key(tenant_id))
            gate = QuotaGate(config, TenantLimiter(client))
            request = AdmissionRequest(tenant_id, "r1", MODEL, "interactive", num_prompt_tokens=3, max_tokens=4)
            reservation = await gate.admit(tenant, request)
            await gate.settle(reservation, num_completion_tokens=4, started=True)
            return reservation.reserved, await client.hget(limits_key(tenant_id), "requests_per_minute")
        finally:
            await client.aclose()

    reserved, stored_limit = asyncio.run(main())

    assert reserved
    assert stored_limit == b"7"


def test_local_fallback_rejects_when_closed() -> None:
    fallback = LocalFallback(AdmissionConfig(listen="127.0.0.1:0"))
    tenant = TenantConfig(name="alpha", daily_token_budget=100)

    with pytest.raises(Unavailable, match="concurrency and budget limits fail closed"):
        fallback.admit(tenant)


def test_local_fallback_caps_rate_when_open() -> None:
    config = dataclasses.replace(
        AdmissionConfig(listen="127.0.0.1:0"), redis_failure_concurrency="open", redis_failure_local_requests_per_minute=2
    )
    fallback = LocalFallback(config)
    tenant = TenantConfig(name="alpha")

    fallback.admit(tenant)
    fallback.admit(tenant)
    with pytest.raises(ResourceExhausted, match="local limit of 2 requests per minute"):
        fallback.admit(tenant)


def test_local_fallback_counts_streams() -> None:
    config = dataclasses.replace(AdmissionConfig(listen="127.0.0.1:0"), redis_failure_concurrency="open")
    fallback = LocalFallback(config)
    tenant = TenantConfig(name="alpha", max_concurrent_streams=1)

    fallback.admit(tenant)
    with pytest.raises(ResourceExhausted, match="max_concurrent_streams=1"):
        fallback.admit(tenant)
    fallback.release("alpha")
    fallback.admit(tenant)
