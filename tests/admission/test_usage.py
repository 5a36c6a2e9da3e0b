"""Per-tenant usage counters in a real Valkey server."""

from __future__ import annotations

import asyncio
import uuid

from services.admission.usage import TenantUsage, UsageRecorder, usage_key
from services.common.valkey import redis_client


def test_usage_accumulates_per_tenant(valkey_url: str) -> None:
    tenant_id = f"t-{uuid.uuid4().hex[:12]}"
    other_id = f"t-{uuid.uuid4().hex[:12]}"

    async def main() -> tuple[TenantUsage, TenantUsage, dict[bytes, bytes]]:
        client = redis_client(valkey_url)
        try:
            usage = UsageRecorder(client)
            await usage.record(tenant_id, prompt_tokens=30, completion_tokens=5)
            await usage.record(tenant_id, prompt_tokens=12, completion_tokens=0)
            return await usage.get(tenant_id), await usage.get(other_id), await client.hgetall(usage_key(tenant_id))
        finally:
            await client.aclose()

    own, other, stored = asyncio.run(main())

    assert own == TenantUsage(num_requests=2, prompt_tokens=42, completion_tokens=5)
    assert other == TenantUsage()
    assert usage_key(tenant_id) == f"{{{tenant_id}}}:usage"
    assert stored == {b"requests": b"2", b"prompt_tokens": b"42", b"completion_tokens": b"5"}
