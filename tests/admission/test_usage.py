"""Per-tenant usage counters written by settlement in a real Valkey server."""

from __future__ import annotations

import asyncio
import uuid

from services.admission.limits import AdmissionRequest, TenantLimiter
from services.admission.tenant_limits import TenantLimits, set_tenant
from services.admission.usage import TenantUsage, UsageRecorder, usage_key
from services.common.valkey import redis_client


def test_usage_accumulates_per_tenant(valkey_url: str) -> None:
    tenant_id = f"t-{uuid.uuid4().hex[:12]}"
    other_id = f"t-{uuid.uuid4().hex[:12]}"

    async def main() -> tuple[TenantUsage, TenantUsage, dict[bytes, bytes]]:
        client = redis_client(valkey_url)
        try:
            await set_tenant(client, TenantLimits(name=tenant_id))
            limiter = TenantLimiter(client)
            for request_id, prompt, completion in (("a", 30, 5), ("b", 12, 0)):
                request = AdmissionRequest(tenant_id, request_id, "m", "interactive", prompt, max_tokens=8)
                assert (await limiter.admit(request)).admitted
                await limiter.settle(tenant_id, request_id, num_completion_tokens=completion, started=True)
            usage = UsageRecorder(client)
            return await usage.get(tenant_id), await usage.get(other_id), await client.hgetall(usage_key(tenant_id))
        finally:
            await client.aclose()

    own, other, stored = asyncio.run(main())

    assert own == TenantUsage(num_requests=2, prompt_tokens=42, completion_tokens=5)
    assert other == TenantUsage()
    assert usage_key(tenant_id) == f"{{{tenant_id}}}:usage"
    assert stored == {b"requests": b"2", b"prompt_tokens": b"42", b"completion_tokens": b"5"}
