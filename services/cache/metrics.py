"""Prometheus metrics of the cache service.

The tenant label takes only configured tenant names: the servicer rejects
any other tenant id before it counts anything.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FORWARD_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

EMBEDDING_BATCH_SIZE = Histogram(
    "tenantserve_cache_embedding_batch_size",
    "Texts encoded per forward pass of the embedding model, across tenants.",
    buckets=BATCH_SIZE_BUCKETS,
)
EMBEDDING_FORWARD_SECONDS = Histogram(
    "tenantserve_cache_embedding_forward_seconds",
    "Seconds per forward pass of the embedding model.",
    buckets=FORWARD_SECONDS_BUCKETS,
)
EMBEDDING_CACHE_HITS = Counter(
    "tenantserve_cache_embedding_hits",
    "Texts whose embedding came from the tenant's cache.",
    ["tenant_id"],
)
EMBEDDING_CACHE_MISSES = Counter(
    "tenantserve_cache_embedding_misses",
    "Texts that the model had to encode.",
    ["tenant_id"],
)
EMBEDDING_CACHE_EVICTIONS = Counter(
    "tenantserve_cache_embedding_evictions",
    "Cached embeddings evicted because the tenant's byte budget was exceeded.",
    ["tenant_id"],
)
COMPLETION_CACHE_HITS = Counter(
    "tenantserve_cache_completion_hits",
    "Completion lookups answered from the tenant's cache.",
    ["tenant_id"],
)
COMPLETION_CACHE_MISSES = Counter(
    "tenantserve_cache_completion_misses",
    "Completion lookups that found nothing.",
    ["tenant_id"],
)
SEARCH_INDEX_LOADS = Counter(
    "tenantserve_cache_search_index_loads",
    "Loads of a tenant's document matrix from Redis, after a change or a restart.",
    ["tenant_id"],
)
