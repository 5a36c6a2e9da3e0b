"""The embedding, retrieval and completion-cache parts of the Inference API.

InferenceServicer inherits these methods. The tenant is always the one
that admission authenticates from the client certificate; the cache
service keeps each tenant's data in its own Redis namespace.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from services.common.config import Config, TenantConfig
from services.common.errors import Unavailable, map_errors
from tenantserve.v1 import common_pb2, inference_pb2

from .auth import authenticate_tenant
from .cache_client import CacheClient, CompletionRecorder, completion_key
from .quota import QuotaGate, Reservation

logger = logging.getLogger(__name__)

CACHE_NOT_CONFIGURED = "the cache service is not configured for this admission service"


class EmbeddingRelayMixin:
    """Relay Embed, UpsertDocuments, Search and DeleteDocuments to the cache service."""

    _config: Config
    _cache: CacheClient | None
    quota: QuotaGate

    # TODO: embedding tokens (the num_tokens of each response) are not yet
    # counted against the tenant's token limits, and these calls are not
    # rate limited.

    @map_errors
    async def Embed(self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext) -> inference_pb2.EmbedResponse:
        """Return a vector per text. Status codes: see the Inference service in inference.proto."""
        tenant = authenticate_tenant(context, self._config)
        return await self._cache_client().embed(tenant.name, request)

    @map_errors
    async def UpsertDocuments(
        self, request: inference_pb2.UpsertDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.UpsertDocumentsResponse:
        """Insert or replace the caller's documents. Status codes: see inference.proto."""
        tenant = authenticate_tenant(context, self._config)
        return await self._cache_client().upsert_documents(tenant.name, request)

    @map_errors
    async def Search(self, request: inference_pb2.SearchRequest, context: grpc.aio.ServicerContext) -> inference_pb2.SearchResponse:
        """Return the caller's most similar documents. Status codes: see inference.proto."""
        tenant = authenticate_tenant(context, self._config)
        return await self._cache_client().search(tenant.name, request)

    @map_errors
    async def DeleteDocuments(
        self, request: inference_pb2.DeleteDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.DeleteDocumentsResponse:
        """Delete the caller's documents, all or none. Status codes: see inference.proto."""
        tenant = authenticate_tenant(context, self._config)
        return await self._cache_client().delete_documents(tenant.name, request)

    async def _answer_from_completion_cache(
        self,
        tenant: TenantConfig,
        request: inference_pb2.GenerateRequest,
        reservation: Reservation,
        context: grpc.aio.ServicerContext,
    ) -> bool:
        """Stream the tenant's cached completion of the admitted ``request`` when there is one; return whether it did.

        The request was admitted like any other, so a cached answer counts
        against the tenant's limits and usage with the completion tokens of
        the original generation.
        """
        key = completion_key(request)
        if key is None or self._cache is None:
            return False
        cached = await self._cache.lookup_completion(tenant.name, key)
        if cached is None:
            return False
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
            "answered from the completion cache: %d completion tokens",
            cached.completion_tokens,
            extra={"request_id": reservation.request_id, "tenant_id": tenant.name},
        )
        return True

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
