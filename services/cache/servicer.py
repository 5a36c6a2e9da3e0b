"""The internal Cache gRPC service: convert messages, check them, call the stores."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import grpc
import redis.exceptions

from services.common.config import TENANT_NAME_PATTERN, Config, TenantConfig
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable, map_errors
from tenantserve.v1 import cache_pb2, cache_pb2_grpc, inference_pb2

from . import validation
from .completions import KEY_PATTERN, CompletionCache
from .documents import DocumentStore, StoredDocument, StoreFull, UnknownDocument
from .embedding_cache import EmbeddingCache
from .validation import CountTokensFn

logger = logging.getLogger(__name__)

REDIS_UNAVAILABLE = "the cache store (Redis) is unavailable; retry the request"


class CacheServicer(cache_pb2_grpc.CacheServicer):
    """Serve admission; every call names the tenant that admission authenticated."""

    def __init__(
        self,
        config: Config,
        embeddings: EmbeddingCache,
        documents: DocumentStore,
        completions: CompletionCache,
        count_tokens: CountTokensFn,
        max_tokens: int,
    ) -> None:
        self._config = config
        self._embeddings = embeddings
        self._documents = documents
        self._completions = completions
        self._count_tokens = count_tokens
        self._max_tokens = max_tokens

    @map_errors
    async def Embed(self, request: cache_pb2.CacheEmbedRequest, context: grpc.aio.ServicerContext) -> inference_pb2.EmbedResponse:
        """Embed texts from the tenant's cache or the model. Codes: INVALID_ARGUMENT, UNAVAILABLE."""
        tenant = self._tenant(request.tenant_id)
        texts = list(request.request.texts)
        num_tokens = self._check_texts("texts", texts)
        with _redis_errors(tenant.name):
            result = await self._embeddings.embed(tenant, texts)
        return inference_pb2.EmbedResponse(
            model=self._embeddings.model_name,
            dimension=self._embeddings.dimension,
            embeddings=[inference_pb2.Embedding(values=v.tolist(), cached=c) for v, c in zip(result.vectors, result.cached)],
            num_tokens=num_tokens,
            max_tokens=self._max_tokens,
        )

    @map_errors
    async def UpsertDocuments(
        self, request: cache_pb2.CacheUpsertDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.UpsertDocumentsResponse:
        """Embed and store documents. Codes: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE."""
        tenant = self._tenant(request.tenant_id)
        documents = list(request.request.documents)
        num_tokens = self._check_texts("documents[].text", [d.text for d in documents])
        validation.check_documents(documents)
        with _redis_errors(tenant.name):
            result = await self._embeddings.embed(tenant, [d.text for d in documents])
            stored = [
                StoredDocument(id=d.id, text=d.text, metadata=dict(d.metadata), vector=vector)
                for d, vector in zip(documents, result.vectors)
            ]
            try:
                num_documents = await self._documents.upsert(tenant.name, stored, tenant.max_documents)
            except StoreFull as exc:
                raise ResourceExhausted(
                    f"documents: tenant {tenant.name!r} has {exc.num_documents} documents and its limit "
                    f"max_documents={tenant.max_documents} leaves no room for this call; delete documents first"
                ) from exc
        return inference_pb2.UpsertDocumentsResponse(num_upserted=len(stored), num_documents=num_documents, num_tokens=num_tokens)

    @map_errors
    async def Search(self, request: cache_pb2.CacheSearchRequest, context: grpc.aio.ServicerContext) -> inference_pb2.SearchResponse:
        """Return the tenant's top-k documents for the query. Codes: INVALID_ARGUMENT, UNAVAILABLE."""
        tenant = self._tenant(request.tenant_id)
        search = request.request
        num_tokens = validation.check_text("query", search.query, self._max_tokens, self._count_tokens)
        validation.check_k(search.k, self._config.cache.max_search_k)
        validation.check_metadata("filters", search.filters)
        with _redis_errors(tenant.name):
            query = await self._embeddings.embed(tenant, [search.query])
            results = await self._documents.search(tenant.name, query.vectors[0], search.k, dict(search.filters))
        hits = [
            inference_pb2.SearchHit(id=r.document.id, score=r.score, text=r.document.text, metadata=r.document.metadata)
            for r in results
        ]
        return inference_pb2.SearchResponse(hits=hits, num_tokens=num_tokens)

    @map_errors
    async def DeleteDocuments(
        self, request: cache_pb2.CacheDeleteDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.DeleteDocumentsResponse:
        """Delete documents, all or none. Codes: INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE."""
        tenant = self._tenant(request.tenant_id)
        ids = list(request.request.ids)
        validation.check_delete_ids(ids, self._config.cache.max_texts_per_call)
        with _redis_errors(tenant.name):
            try:
                num_documents = await self._documents.delete(tenant.name, ids)
            except UnknownDocument as exc:
                raise NotFound(f"ids[{exc.index}]: document {exc.document_id!r} not found; nothing was deleted") from exc
        return inference_pb2.DeleteDocumentsResponse(num_deleted=len(ids), num_documents=num_documents)

    @map_errors
    async def LookupCompletion(
        self, request: cache_pb2.LookupCompletionRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupCompletionResponse:
        """Return the tenant's cached completion for a key. Codes: INVALID_ARGUMENT, UNAVAILABLE."""
        tenant = self._tenant(request.tenant_id)
        _check_completion_key(request.key)
        with _redis_errors(tenant.name):
            completion = await self._completions.lookup(tenant, request.key)
        if completion is None:
            return cache_pb2.LookupCompletionResponse(found=False)
        return cache_pb2.LookupCompletionResponse(found=True, completion=completion)

    @map_errors
    async def StoreCompletion(
        self, request: cache_pb2.StoreCompletionRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreCompletionResponse:
        """Store a tenant's completion. Codes: INVALID_ARGUMENT, UNAVAILABLE."""
        tenant = self._tenant(request.tenant_id)
        _check_completion_key(request.key)
        with _redis_errors(tenant.name):
            await self._completions.store(tenant, request.key, request.completion)
        return cache_pb2.StoreCompletionResponse()

    def _tenant(self, tenant_id: str) -> TenantConfig:
        """Return the tenant's cache limits; admission has already authenticated it.

        NOTE: the limits come from this process's config file. A tenant
        created at runtime through the Admin API gets the default cache
        limits until it is added to the file and the service restarts.
        """
        if not TENANT_NAME_PATTERN.match(tenant_id):
            raise InvalidArgument("tenant_id", f"{tenant_id!r} is not a valid tenant name")
        return self._config.tenant(tenant_id) or TenantConfig(name=tenant_id)

    def _check_texts(self, field: str, texts: list[str]) -> int:
        return validation.check_texts(field, texts, self._config.cache.max_texts_per_call, self._max_tokens, self._count_tokens)


def _check_completion_key(key: str) -> None:
    if not KEY_PATTERN.match(key):
        raise InvalidArgument("key", "must be 64 lowercase hex digits (a SHA-256)")


@contextlib.contextmanager
def _redis_errors(tenant_id: str) -> Iterator[None]:
    try:
        yield
    except redis.exceptions.RedisError as exc:
        logger.error("cache store call failed: %s", exc, extra={"tenant_id": tenant_id})
        raise Unavailable(REDIS_UNAVAILABLE) from exc
