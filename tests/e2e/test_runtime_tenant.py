"""A tenant created at runtime in Redis, absent from the config file, is served."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import redis.asyncio

from services.admission import tenant_limits
from services.common import certs
from tenantserve.v1 import inference_pb2

from .support import chat_request, generate, generate_error, inference_stub

RUNTIME_TENANT = "created-at-runtime"


def create_runtime_tenant(redis_url: str, **limits: Any) -> None:
    async def create() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            await tenant_limits.create_tenant(client, tenant_limits.TenantLimits(name=RUNTIME_TENANT, **limits))
        finally:
            await client.aclose()

    asyncio.run(create())


@pytest.fixture(scope="module")
def runtime_tenant(stack: Any) -> str:
    create_runtime_tenant(stack.redis_url, requests_per_minute=100, max_concurrent_streams=2)
    certs.add_tenant(stack.config.tls.cert_dir, RUNTIME_TENANT)
    return RUNTIME_TENANT


def test_runtime_tenant_generates(stack: Any, runtime_tenant: str) -> None:
    assert stack.config.tenant(runtime_tenant) is None
    channel, stub = inference_stub(stack, runtime_tenant)
    with channel:
        completion = generate(stub, chat_request(max_tokens=4))

    assert completion.result.usage.completion_tokens > 0


def test_runtime_tenant_usage_is_its_own(stack: Any, runtime_tenant: str) -> None:
    channel, stub = inference_stub(stack, runtime_tenant)
    with channel:
        generate(stub, chat_request(max_tokens=2))
        usage = stub.GetUsage(inference_pb2.GetUsageRequest())

    assert usage.tenant_id == runtime_tenant
    assert usage.num_requests >= 1


def test_unknown_tenant_still_denied(stack: Any) -> None:
    certs.add_tenant(stack.config.tls.cert_dir, "never-created")
    channel, stub = inference_stub(stack, "never-created")
    with channel:
        num_deltas, error = generate_error(stub, chat_request(max_tokens=2))

    assert num_deltas == 0
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
