"""Per-tenant usage counters in Redis, in the hash ``{tenant}:usage``.

Fields: ``requests`` (generation requests that reached the scheduler),
``prompt_tokens`` and ``completion_tokens``. The counters never expire.
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
    """Add each finished request to its tenant's counters and read them back."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client

    async def record(self, tenant_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one request with its token counts, as one transaction.

        Raises redis.exceptions.RedisError when the server cannot be reached.
        """
        key = usage_key(tenant_id)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, REQUESTS_FIELD, 1)
            pipe.hincrby(key, PROMPT_TOKENS_FIELD, prompt_tokens)
            pipe.hincrby(key, COMPLETION_TOKENS_FIELD, completion_tokens)
            await pipe.execute()

    async def get(self, tenant_id: str) -> TenantUsage:
        """Return the tenant's counters; zeros for a tenant with no requests yet."""
        values = await self._client.hmget(
            usage_key(tenant_id), [REQUESTS_FIELD, PROMPT_TOKENS_FIELD, COMPLETION_TOKENS_FIELD]
        )
        num_requests, prompt_tokens, completion_tokens = (int(value or 0) for value in values)
        return TenantUsage(num_requests=num_requests, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
