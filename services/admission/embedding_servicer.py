"""The embedding, retrieval and completion-cache parts of the Inference API.

InferenceServicer inherits these methods. The tenant is always the one
that admission authenticates from the client certificate. The cache
service keeps each tenant's data in its own Redis namespace.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from tokenizers import Tokenizer

from services.cache.model_files import load_tokenizer
from services.common.config import Config, TenantConfig
from services.common.errors import Unavailable, map_errors
from tenantserve.v1 import common_pb2, inference_pb2

from .auth import TenantDirectory
from .cache_client import CacheClient, CompletionRecorder, completion_key
from .limits import AdmissionRequest
from .quota import QuotaGate, Reservation
from .validation import SERVICE_CLASS_NAMES

logger = logging.getLogger(__name__)

CACHE_NOT_CONFIGURED = "the cache service is not configured for this admission service"

ResponseT = TypeVar("ResponseT")


@functools.cache
def embedding_tokenizer(location: str) -> Tokenizer:
    """Load the embedding model's tokenizer once per process; raises FileNotFoundError when its files are missing."""
    return load_tokenizer(location)


class EmbeddingRelayMixin:
    """Relay Embed, UpsertDocuments, Search and DeleteDocuments to the cache service.

    Each call is admitted like a generation request with the embedding
    model's name, its text tokens as prompt tokens and no completion
    tokens, so it counts against the tenant's request rate, concurrency,
    token limits and allowed_models. A call that the cache service rejects
    is refunded in full.
    """

    _config: Config
    _cache: CacheClient | None
    _tenants: TenantDirectory
    quota: QuotaGate

    @map_errors
    async def Embed(self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext) -> inference_pb2.EmbedResponse:
        """Return a vector per text. Status codes: see the Inference service in inference.proto."""
        tenant = await self._tenants.authenticate(context)
        cache = self._cache_client()
        num_tokens = self._count_tokens(request.texts)
        return await self._relay_admitted(tenant, num_tokens, lambda: cache.embed(tenant.name, request))

    @map_errors
    async def UpsertDocuments(
        self, request: inference_pb2.UpsertDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.UpsertDocumentsResponse:
        """Insert or replace the caller's documents. Status codes: see inference.proto."""
        tenant = await self._tenants.authenticate(context)
        cache = self._cache_client()
        num_tokens = self._count_tokens([document.text for document in request.documents])
        return await self._relay_admitted(tenant, num_tokens, lambda: cache.upsert_documents(tenant.name, request))

    @map_errors
    async def Search(self, request: inference_pb2.SearchRequest, context: grpc.aio.ServicerContext) -> inference_pb2.SearchResponse:
        """Return the caller's most similar documents. Status codes: see inference.proto."""
        tenant = await self._tenants.authenticate(context)
        cache = self._cache_client()
        num_tokens = self._count_tokens([request.query])
        return await self._relay_admitted(tenant, num_tokens, lambda: cache.search(tenant.name, request))

    @map_errors
    async def DeleteDocuments(
        self, request: inference_pb2.DeleteDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.DeleteDocumentsResponse:
        """Delete the caller's documents, all or none. Status codes: see inference.proto."""
        tenant = await self._tenants.authenticate(context)
        cache = self._cache_client()
        return await self._relay_admitted(tenant, 0, lambda: cache.delete_documents(tenant.name, request))

    async def _relay_admitted(self, tenant: TenantConfig, num_tokens: int, call: Callable[[], Awaitable[ResponseT]]) -> ResponseT:
        admission_request = AdmissionRequest(
            tenant_id=tenant.name,
            request_id=uuid.uuid4().hex,
            model=self._config.cache.embedding_model_name,
            service_class=SERVICE_CLASS_NAMES[common_pb2.SERVICE_CLASS_INTERACTIVE],
            num_prompt_tokens=num_tokens,
            max_tokens=0,
        )
        reservation = await self.quota.admit(tenant, admission_request)
        try:
            response = await call()
        except BaseException:
            await asyncio.shield(self.quota.settle(reservation, num_completion_tokens=0, started=False))
            raise
        await asyncio.shield(self.quota.settle(reservation, num_completion_tokens=0, started=True))
        return response

    def _count_tokens(self, texts: Sequence[str]) -> int:
        """Return the embedding model's tokens of ``texts``, [CLS] and [SEP] included, as the cache service counts them."""
        tokenizer = embedding_tokenizer(self._config.cache.embedding_model)
        return sum(len(encoding.ids) for encoding in tokenizer.encode_batch(list(texts)))

    async def _answer_from_completion_cache(
        self,
        tenant: TenantConfig,
        request: inference_pb2.GenerateRequest,
        reservation: Reservation,
        context: grpc.aio.ServicerContext,
    ) -> common_pb2.GenerateResult | None:
        """Stream the tenant's cached completion of the admitted ``request`` when there is one, and return its result.

        Returns None, having written nothing, when the request must not use
        the cache or the cache has no entry for it.

        The request was admitted like any other, so a cached completion
        counts against the tenant's limits and usage with the completion
        tokens of the original generation.
        """
        key = completion_key(request)
        if key is None or self._cache is None:
            return None
        cached = await self._cache.lookup_completion(tenant.name, key)
        if cached is None:
            return None
        try:
            await context.write(common_pb2.GenerateResponse(delta=common_pb2.TextDelta(text=cached.text, token_ids=cached.token_ids)))
        finally:
            await asyncio.shield(self.quota.settle(reservation, num_completion_tokens=cached.completion_tokens, started=True))
        result = common_pb2.GenerateResult(
            finish_reason=cached.finish_reason,
            usage=common_pb2.Usage(prompt_tokens=reservation.num_prompt_tokens, completion_tokens=cached.completion_tokens),
            request_id=reservation.request_id,
            client_request_id=request.client_request_id,
            cached=True,
        )
        await context.write(common_pb2.GenerateResponse(result=result))
        logger.info(
            "served from the completion cache: %d completion tokens",
            cached.completion_tokens,
            extra={"request_id": reservation.request_id, "tenant_id": tenant.name},
        )
        return result

    def _completion_recorder(
        self, tenant: TenantConfig, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> grpc.aio.ServicerContext:
        """Return a context that stores the finished completion in the cache, or ``context`` when it is not cacheable."""
        key = completion_key(request)
        if key is None or self._cache is None:
            return context
        return CompletionRecorder(context, self._cache, tenant.name, key)  # type: ignore[return-value]

    def _cache_client(self) -> CacheClient:
        if self._cache is None:
            raise Unavailable(CACHE_NOT_CONFIGURED)
        return self._cache
