"""Embeddings with a per-tenant cache in front of the batched model.

Cache entries are ``{tenant}:emb:<model>:<sha256 of the text>`` -> float32
vector bytes, kept by an LruStore with the tenant's byte budget. The same
text from two tenants makes two entries, and a lookup reads only the
caller's namespace.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from services.common.config import TenantConfig

from . import metrics
from .batcher import DynamicBatcher
from .lru_store import LruStore

logger = logging.getLogger(__name__)


def embedding_namespace(tenant_id: str, model_name: str) -> str:
    return f"{{{tenant_id}}}:emb:{model_name}"


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class EmbeddingResult:
    # [num_texts, dimension] float32 unit vectors, in request order.
    vectors: np.ndarray
    # Whether each vector came from the cache.
    cached: list[bool]


class EmbeddingCache:
    """Look texts up in the tenant's cache, encode the misses together, store them."""

    def __init__(self, store: LruStore, batcher: DynamicBatcher, model_name: str, dimension: int, ttl_seconds: int) -> None:
        self._store = store
        self._batcher = batcher
        self.model_name = model_name
        self.dimension = dimension
        self._ttl_seconds = ttl_seconds

    async def embed(self, tenant: TenantConfig, texts: list[str]) -> EmbeddingResult:
        """Return the vectors of ``texts``. Raises redis.exceptions.RedisError when Redis fails."""
        namespace = embedding_namespace(tenant.name, self.model_name)
        digests = [text_digest(text) for text in texts]
        unique_digests = list(dict.fromkeys(digests))
        found = dict(zip(unique_digests, await self._store.lookup(namespace, unique_digests, self._ttl_seconds)))

        vectors_by_digest = {d: np.frombuffer(v, dtype=np.float32) for d, v in found.items() if v is not None}
        missing = {d: text for d, text in zip(digests, texts) if d not in vectors_by_digest}
        metrics.EMBEDDING_CACHE_HITS.labels(tenant.name).inc(len(texts) - sum(d in missing for d in digests))
        metrics.EMBEDDING_CACHE_MISSES.labels(tenant.name).inc(sum(d in missing for d in digests))

        if missing:
            encoded = await self._batcher.embed(list(missing.values()))
            new_entries = {d: vector.astype(np.float32).tobytes() for d, vector in zip(missing, encoded)}
            vectors_by_digest.update(zip(missing, encoded))
            num_evicted = await self._store.store(namespace, new_entries, self._ttl_seconds, tenant.max_embedding_cache_bytes)
            if num_evicted:
                metrics.EMBEDDING_CACHE_EVICTIONS.labels(tenant.name).inc(num_evicted)
                logger.debug("evicted %d embeddings over the byte budget", num_evicted, extra={"tenant_id": tenant.name})

        vectors = np.stack([vectors_by_digest[d] for d in digests]).astype(np.float32)
        return EmbeddingResult(vectors=vectors, cached=[d not in missing for d in digests])
