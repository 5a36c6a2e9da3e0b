"""Per-tenant usage counters in Redis, in the hash ``{tenant}:usage``.

The settle script (quota_scripts.py) writes them: ``requests`` (settled
requests that reached the model), ``prompt_tokens`` and
``completion_tokens``, and ``reclaimed_requests`` and ``reclaimed_tokens``
for reservations whose lease expired unsettled. The counters never expire.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio

REQUESTS_FIELD = b"requests"
PROMPT_TOKENS_FIELD = b"prompt_tokens"
COMPLETION_TOKENS_FIELD = b"completion_tokens"


@dataclass(frozen=True)
class TenantUsage:
    num_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def usage_key(tenant_id: str) -> str:
    return f"{{{tenant_id}}}:usage"


class UsageRecorder:
    """Read a tenant's settled usage counters."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client

    async def get(self, tenant_id: str) -> TenantUsage:
        """Return the tenant's counters; zeros for a tenant with no requests yet."""
        values = await self._client.hmget(
            usage_key(tenant_id), [REQUESTS_FIELD, PROMPT_TOKENS_FIELD, COMPLETION_TOKENS_FIELD]
        )
        num_requests, prompt_tokens, completion_tokens = (int(value or 0) for value in values)
        return TenantUsage(num_requests=num_requests, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
