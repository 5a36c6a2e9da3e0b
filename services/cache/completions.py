"""Per-tenant cache of deterministic completions, keyed by a hash of the request.

Entries are ``{tenant}:completion:<key>`` -> a serialized CachedCompletion,
kept by an LruStore with the tenant's max_completion_cache_bytes. The key
is computed by admission (see services.admission.cache_client); this
module only checks that it is a hex SHA-256.
"""

from __future__ import annotations

import re

from services.common.config import TenantConfig
from tenantserve.v1 import cache_pb2

from . import metrics
from .lru_store import LruStore

KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def completion_namespace(tenant_id: str) -> str:
    return f"{{{tenant_id}}}:completion"


class CompletionCache:
    def __init__(self, store: LruStore, ttl_seconds: int) -> None:
        self._store = store
        self._ttl_seconds = ttl_seconds

    async def lookup(self, tenant: TenantConfig, key: str) -> cache_pb2.CachedCompletion | None:
        """Return the tenant's completion under ``key``, or None."""
        (value,) = await self._store.lookup(completion_namespace(tenant.name), [key], self._ttl_seconds)
        if value is None:
            metrics.COMPLETION_CACHE_MISSES.labels(tenant.name).inc()
            return None
        metrics.COMPLETION_CACHE_HITS.labels(tenant.name).inc()
        return cache_pb2.CachedCompletion.FromString(value)

    async def store(self, tenant: TenantConfig, key: str, completion: cache_pb2.CachedCompletion) -> None:
        """Store ``completion`` unless the tenant's completion cache is disabled (a budget of 0)."""
        if tenant.max_completion_cache_bytes <= 0:
            return
        await self._store.store(
            completion_namespace(tenant.name),
            {key: completion.SerializeToString()},
            self._ttl_seconds,
            tenant.max_completion_cache_bytes,
        )
