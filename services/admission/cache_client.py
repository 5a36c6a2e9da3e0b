"""Admission's side of the cache service: the client, and the completion cache key and recorder.

Only requests with temperature 0 are cached, and only when they do not set
``skip_completion_cache``. The key is a SHA-256 over the serialized
request, so it covers the model, the messages or prompt and the sampling
parameters. Fields that cannot change a greedy completion are cleared
first: client_request_id, service_class, the opt-out flag and the seed.
The cache service keeps the entries of each tenant apart.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import grpc

from services.common.errors import ServiceError
from tenantserve.v1 import cache_pb2, cache_pb2_grpc, common_pb2, inference_pb2

logger = logging.getLogger(__name__)

# Seconds a completion lookup may add to a Generate call before the request
# goes on uncached; also the limit of a background store.
COMPLETION_CACHE_TIMEOUT_SECONDS = 0.5
# Seconds without completion cache calls after one failed, so that an
# unreachable cache service costs neither latency nor a log line per request.
COMPLETION_CACHE_RETRY_SECONDS = 5.0
# Seconds for an embedding, search or document call.
CACHE_CALL_TIMEOUT_SECONDS = 120.0
CACHEABLE_FINISH_REASONS = frozenset(
    {common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP_STRING}
)


def completion_key(request: inference_pb2.GenerateRequest) -> str | None:
    """Return the completion cache key of ``request``, or None when it must not use the cache."""
    if request.skip_completion_cache or request.sampling.temperature != 0.0:
        return None
    canonical = inference_pb2.GenerateRequest()
    canonical.CopyFrom(request)
    canonical.ClearField("client_request_id")
    canonical.ClearField("service_class")
    canonical.ClearField("skip_completion_cache")
    canonical.sampling.ClearField("seed")
    return hashlib.sha256(canonical.SerializeToString(deterministic=True)).hexdigest()


class CacheClient:
    """Call the cache service for one tenant at a time; the tenant comes from admission's authentication."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = cache_pb2_grpc.CacheStub(channel)
        # time.monotonic() before which completion cache calls are skipped.
        self._completion_cache_retry_time = 0.0
        # Strong references to store tasks, which asyncio keeps only weakly.
        self._store_tasks: set[asyncio.Task[None]] = set()

    async def embed(self, tenant_id: str, request: inference_pb2.EmbedRequest) -> inference_pb2.EmbedResponse:
        return await self._relay(self._stub.Embed, cache_pb2.CacheEmbedRequest(tenant_id=tenant_id, request=request))

    async def upsert_documents(
        self, tenant_id: str, request: inference_pb2.UpsertDocumentsRequest
    ) -> inference_pb2.UpsertDocumentsResponse:
        return await self._relay(
            self._stub.UpsertDocuments, cache_pb2.CacheUpsertDocumentsRequest(tenant_id=tenant_id, request=request)
        )

    async def search(self, tenant_id: str, request: inference_pb2.SearchRequest) -> inference_pb2.SearchResponse:
        return await self._relay(self._stub.Search, cache_pb2.CacheSearchRequest(tenant_id=tenant_id, request=request))

    async def delete_documents(
        self, tenant_id: str, request: inference_pb2.DeleteDocumentsRequest
    ) -> inference_pb2.DeleteDocumentsResponse:
        return await self._relay(
            self._stub.DeleteDocuments, cache_pb2.CacheDeleteDocumentsRequest(tenant_id=tenant_id, request=request)
        )

    async def lookup_completion(self, tenant_id: str, key: str) -> cache_pb2.CachedCompletion | None:
        """Return the tenant's cached completion, or None when absent or when the cache service fails."""
        if time.monotonic() < self._completion_cache_retry_time:
            return None
        try:
            response = await self._stub.LookupCompletion(
                cache_pb2.LookupCompletionRequest(tenant_id=tenant_id, key=key), timeout=COMPLETION_CACHE_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            self._completion_cache_failed("lookup", tenant_id, error)
            return None
        return response.completion if response.found else None

    async def store_completion(self, tenant_id: str, key: str, completion: cache_pb2.CachedCompletion) -> None:
        """Store a completion; a failure is logged and otherwise ignored."""
        if time.monotonic() < self._completion_cache_retry_time:
            return
        try:
            await self._stub.StoreCompletion(
                cache_pb2.StoreCompletionRequest(tenant_id=tenant_id, key=key, completion=completion),
                timeout=COMPLETION_CACHE_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as error:
            self._completion_cache_failed("store", tenant_id, error)

    def store_completion_soon(self, tenant_id: str, key: str, completion: cache_pb2.CachedCompletion) -> None:
        """Start storing a completion in the background, so that the caller's stream is not held up."""
        task = asyncio.create_task(self.store_completion(tenant_id, key, completion))
        self._store_tasks.add(task)
        task.add_done_callback(self._store_tasks.discard)

    def _completion_cache_failed(self, operation: str, tenant_id: str, error: grpc.aio.AioRpcError) -> None:
        self._completion_cache_retry_time = time.monotonic() + COMPLETION_CACHE_RETRY_SECONDS
        logger.warning(
            "completion cache %s failed: %s: %s; requests go uncached for %.0f s",
            operation,
            error.code().name,
            error.details(),
            COMPLETION_CACHE_RETRY_SECONDS,
            extra={"tenant_id": tenant_id},
        )

    @staticmethod
    async def _relay(method: Any, request: Any) -> Any:
        """Call the cache service and pass its status code and message on to the tenant unchanged."""
        try:
            return await method(request, timeout=CACHE_CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                raise ServiceError(error.code(), f"the cache service is unavailable: {error.details()}; retry the request") from error
            raise ServiceError(error.code(), error.details() or error.code().name) from error


class CompletionRecorder:
    """A servicer context that records the streamed completion and stores it once the result is written.

    The store runs in the background after the write, so that it never
    delays the stream or overlaps its end. A request sent at once after
    the result may therefore still miss the entry. Everything but
    ``write`` goes to the wrapped context.
    """

    def __init__(self, context: grpc.aio.ServicerContext, cache: CacheClient, tenant_id: str, key: str) -> None:
        self._context = context
        self._cache = cache
        self._tenant_id = tenant_id
        self._key = key
        self._pieces: list[str] = []
        self._token_ids: list[int] = []

    async def write(self, response: common_pb2.GenerateResponse) -> None:
        await self._context.write(response)
        if response.HasField("delta"):
            self._pieces.append(response.delta.text)
            self._token_ids.extend(response.delta.token_ids)
        elif response.result.finish_reason in CACHEABLE_FINISH_REASONS:
            completion = cache_pb2.CachedCompletion(
                text="".join(self._pieces),
                token_ids=self._token_ids,
                finish_reason=response.result.finish_reason,
                completion_tokens=response.result.usage.completion_tokens,
            )
            self._cache.store_completion_soon(self._tenant_id, self._key, completion)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
