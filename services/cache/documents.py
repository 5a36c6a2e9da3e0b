"""Per-tenant document stores in Redis and exact top-k cosine search over them.

Each tenant's documents live in the hash ``{tenant}:docs`` (id -> record:
a 4-byte little-endian header length, a JSON header with the text and the
metadata, then the float32 vector). ``{tenant}:docs:version`` is
incremented by every upsert and delete in the same script. A search first
reads the version (one round trip) and reloads the tenant's matrix only
when it changed, so every replica of the cache service, and a restarted
one, searches the documents as they are stored in Redis.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio

from . import metrics

logger = logging.getLogger(__name__)

HEADER_LENGTH = struct.Struct("<I")

# KEYS[1] = docs hash, KEYS[2] = version. ARGV[1] = max documents, then
# (id, record) pairs. Returns {version, num_documents}, or {-1,
# num_documents} when the store would exceed the maximum (nothing written).
UPSERT_SCRIPT = """
local max_documents = tonumber(ARGV[1])
local num_new = 0
for i = 2, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    num_new = num_new + 1
  end
end
local num_documents = redis.call('HLEN', KEYS[1])
if num_documents + num_new > max_documents then
  return {-1, num_documents}
end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return {redis.call('INCR', KEYS[2]), num_documents + num_new}
"""

# KEYS[1] = docs hash, KEYS[2] = version. ARGV = ids. Returns {version,
# num_documents}, or {-1, index} of the first unknown id (1-based; nothing
# deleted).
DELETE_SCRIPT = """
for i = 1, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    return {-1, i}
  end
end
for i = 1, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
end
return {redis.call('INCR', KEYS[2]), redis.call('HLEN', KEYS[1])}
"""


def docs_key(tenant_id: str) -> str:
    return f"{{{tenant_id}}}:docs"


def version_key(tenant_id: str) -> str:
    return f"{{{tenant_id}}}:docs:version"


@dataclass(frozen=True)
class StoredDocument:
    id: str
    text: str
    metadata: dict[str, str]
    # float32 unit vector [dimension].
    vector: np.ndarray


@dataclass(frozen=True)
class SearchResult:
    document: StoredDocument
    score: float


class StoreFull(Exception):
    """An upsert would exceed the tenant's max_documents."""

    def __init__(self, num_documents: int) -> None:
        super().__init__(num_documents)
        self.num_documents = num_documents


class UnknownDocument(Exception):
    """A delete named an id that is not in the store."""

    def __init__(self, index: int, document_id: str) -> None:
        super().__init__(document_id)
        self.index = index
        self.document_id = document_id


def encode_record(document: StoredDocument) -> bytes:
    header = json.dumps({"text": document.text, "metadata": document.metadata}).encode("utf-8")
    return HEADER_LENGTH.pack(len(header)) + header + document.vector.astype(np.float32).tobytes()


def decode_record(document_id: str, record: bytes) -> StoredDocument:
    (header_length,) = HEADER_LENGTH.unpack_from(record)
    header = json.loads(record[HEADER_LENGTH.size : HEADER_LENGTH.size + header_length])
    vector = np.frombuffer(record, dtype=np.float32, offset=HEADER_LENGTH.size + header_length)
    return StoredDocument(id=document_id, text=header["text"], metadata=header["metadata"], vector=vector)


@dataclass
class TenantMatrix:
    """One tenant's documents as loaded at ``version``."""

    version: int
    documents: list[StoredDocument] = field(default_factory=list)
    # [num_documents, dimension] float32, rows in the order of ``documents``.
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))


class DocumentStore:
    """Write tenants' documents to Redis and search them."""

    def __init__(self, client: redis.asyncio.Redis, dimension: int) -> None:
        self._client = client
        self._dimension = dimension
        self._upsert = client.register_script(UPSERT_SCRIPT)
        self._delete = client.register_script(DELETE_SCRIPT)
        # NOTE: every searched tenant's matrix stays in memory, up to
        # max_documents rows per tenant; there is no eviction across tenants.
        self._matrices: dict[str, TenantMatrix] = {}

    async def upsert(self, tenant_id: str, documents: list[StoredDocument], max_documents: int) -> int:
        """Write ``documents`` atomically and return the tenant's document count.

        Raises StoreFull, writing nothing, when the store would exceed
        ``max_documents``; redis.exceptions.RedisError when Redis fails.
        """
        args: list[str | bytes | int] = [max_documents]
        for document in documents:
            args.extend((document.id, encode_record(document)))
        version, num_documents = await self._upsert(keys=[docs_key(tenant_id), version_key(tenant_id)], args=args)
        if version == -1:
            raise StoreFull(int(num_documents))
        return int(num_documents)

    async def delete(self, tenant_id: str, document_ids: list[str]) -> int:
        """Delete every id or none; return the documents left.

        Raises UnknownDocument naming the first id not in the store.
        """
        version, value = await self._delete(keys=[docs_key(tenant_id), version_key(tenant_id)], args=document_ids)
        if version == -1:
            index = int(value) - 1
            raise UnknownDocument(index, document_ids[index])
        return int(value)

    async def search(self, tenant_id: str, query: np.ndarray, k: int, filters: dict[str, str]) -> list[SearchResult]:
        """Return the ``k`` documents most similar to the unit vector ``query``, best first."""
        tenant_matrix = await self._current_matrix(tenant_id)
        documents = tenant_matrix.documents
        if not documents:
            return []
        scores = tenant_matrix.matrix @ query.astype(np.float32)  # [num_documents]
        if filters:
            matches = np.fromiter(
                (all(d.metadata.get(key) == value for key, value in filters.items()) for d in documents),
                dtype=bool,
                count=len(documents),
            )
            scores = np.where(matches, scores, -np.inf)
        num_candidates = int(np.count_nonzero(np.isfinite(scores)))
        k = min(k, num_candidates)
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [SearchResult(document=documents[i], score=float(scores[i])) for i in top]

    async def _current_matrix(self, tenant_id: str) -> TenantMatrix:
        # NOTE: any write reloads the tenant's whole matrix on the next search
        # (one HGETALL of every record), so alternating writes and searches
        # cost O(documents) each.
        version = int(await self._client.get(version_key(tenant_id)) or 0)
        cached = self._matrices.get(tenant_id)
        if cached is not None and cached.version == version:
            return cached
        loaded = await self._load(tenant_id)
        self._matrices[tenant_id] = loaded
        return loaded

    async def _load(self, tenant_id: str) -> TenantMatrix:
        # One transaction, so the records and the version belong together.
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.get(version_key(tenant_id))
            pipe.hgetall(docs_key(tenant_id))
            version, records = await pipe.execute()
        documents = [decode_record(key.decode("utf-8"), value) for key, value in sorted(records.items())]
        matrix = np.stack([d.vector for d in documents]) if documents else np.zeros((0, self._dimension), np.float32)
        metrics.SEARCH_INDEX_LOADS.labels(tenant_id).inc()
        logger.info("loaded %d documents at version %s", len(documents), int(version or 0), extra={"tenant_id": tenant_id})
        return TenantMatrix(version=int(version or 0), documents=documents, matrix=matrix)
