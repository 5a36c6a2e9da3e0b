"""The public Inference API: authenticate, validate, limit, then relay to the scheduler."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid

import grpc
import redis.exceptions

from services.common.config import Config, TenantConfig
from services.common.errors import ResourceExhausted, ServiceError, Unavailable, map_errors
from tenantserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from . import metrics
from .auth import authenticate_tenant
from .generation import AdmittedRequest, GenerationRelay
from .limits import Decision, StreamLease, TenantLimiter, rejection_message
from .tokenization import PromptTokenizer
from .usage import UsageRecorder
from .validation import check_context_length, effective_service_class, validate_request

logger = logging.getLogger(__name__)

QUOTA_STORE_UNAVAILABLE = "the quota store is unavailable; retry the request"


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """Serve tenants; the tenant is always the one named by the client certificate."""

    def __init__(
        self,
        config: Config,
        tokenizer: PromptTokenizer,
        limiter: TenantLimiter,
        usage: UsageRecorder,
        scheduler: scheduler_pb2_grpc.SchedulerStub,
    ) -> None:
        self._config = config
        self._tokenizer = tokenizer
        self._limiter = limiter
        self._usage = usage
        self._scheduler = scheduler
        # Strong references to fire-and-forget tasks, which asyncio keeps only weakly.
        self._background_tasks: set[asyncio.Task[None]] = set()

    @map_errors
    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        """Stream the completion of ``request`` as deltas followed by one result.

        Status codes: UNAUTHENTICATED without a tenantserve certificate,
        PERMISSION_DENIED for a service certificate or an unconfigured
        tenant, NOT_FOUND for an unknown model, INVALID_ARGUMENT for an
        invalid field. RESOURCE_EXHAUSTED when a tenant limit or the
        scheduler's queue is full, UNAVAILABLE when Redis or the scheduler
        cannot be reached, and the scheduler's code for its other failures.
        Every rejection ends the stream before any delta.
        """
        arrival_time = time.perf_counter()
        tenant_label = metrics.UNKNOWN_TENANT
        outcome = "ok"
        try:
            tenant = authenticate_tenant(context, self._config)
            tenant_label = tenant.name
            await self._generate(request, context, tenant, arrival_time)
        except ServiceError as exc:
            outcome = exc.code.name.lower()
            raise
        except asyncio.CancelledError:
            outcome = _cancellation_outcome(context)
            raise
        finally:
            metrics.REQUESTS.labels(tenant_label, outcome).inc()

    async def _generate(
        self,
        request: inference_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
        tenant: TenantConfig,
        arrival_time: float,
    ) -> None:
        model = validate_request(request, self._config)
        prompt_token_ids = await self._tokenizer.tokenize(request, model)
        check_context_length(len(prompt_token_ids), request.sampling.max_tokens, model)

        request_id = uuid.uuid4().hex
        log_extra = {"request_id": request_id, "tenant_id": tenant.name}
        lease = await self._admit(tenant, request_id)
        logger.info(
            "admitted request: model %s, %d prompt tokens, max_tokens %d, client_request_id %r",
            model.name,
            len(prompt_token_ids),
            request.sampling.max_tokens,
            request.client_request_id,
            extra=log_extra,
        )

        schedule_request = scheduler_pb2.ScheduleRequest(
            tenant_id=tenant.name,
            request_id=request_id,
            model=model.name,
            prompt_token_ids=prompt_token_ids,
            sampling=request.sampling,
            service_class=effective_service_class(request.service_class),
        )
        admitted = AdmittedRequest(schedule_request, request.client_request_id, lease, arrival_time)
        metrics.ACTIVE_STREAMS.labels(tenant.name).inc()
        try:
            result = await GenerationRelay(self._scheduler, self._usage, admitted).run(context)
        except asyncio.CancelledError:
            logger.info("request ended early: %s", _cancellation_outcome(context), extra=log_extra)
            raise
        except ServiceError as exc:
            logger.error("request failed: %s: %s", exc.code.name, exc.message, extra=log_extra)
            raise
        finally:
            metrics.ACTIVE_STREAMS.labels(tenant.name).dec()
            metrics.REQUEST_LATENCY.labels(tenant.name).observe(time.perf_counter() - arrival_time)
        logger.info(
            "finished request: %s, %d completion tokens",
            common_pb2.FinishReason.Name(result.finish_reason),
            result.usage.completion_tokens,
            extra=log_extra,
        )

    async def _admit(self, tenant: TenantConfig, request_id: str) -> StreamLease:
        decision_task = asyncio.create_task(self._limiter.admit(tenant, request_id))
        try:
            decision = await asyncio.shield(decision_task)
        except asyncio.CancelledError:
            # The script may admit the request after its caller is gone, so
            # undo the admission once the decision arrives.
            decision_task.add_done_callback(lambda task: self._undo_admission(task, tenant.name, request_id))
            raise
        except redis.exceptions.RedisError as exc:
            logger.error("admission decision failed: %s", exc, extra={"request_id": request_id, "tenant_id": tenant.name})
            raise Unavailable(QUOTA_STORE_UNAVAILABLE) from exc
        if not decision.admitted:
            raise ResourceExhausted(rejection_message(tenant, decision))
        return StreamLease(self._limiter, tenant.name, request_id)

    def _undo_admission(self, decision_task: asyncio.Task[Decision], tenant_id: str, request_id: str) -> None:
        if decision_task.cancelled() or decision_task.exception() is not None or not decision_task.result().admitted:
            return
        release_task = asyncio.create_task(self._limiter.release(tenant_id, request_id, refund_rate=True))
        self._background_tasks.add(release_task)
        release_task.add_done_callback(self._background_tasks.discard)
        release_task.add_done_callback(functools.partial(_log_failed_release, tenant_id, request_id))

    @map_errors
    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        """Return every configured model. Status codes: UNAUTHENTICATED, PERMISSION_DENIED."""
        authenticate_tenant(context, self._config)
        return inference_pb2.ListModelsResponse(
            models=[
                inference_pb2.ModelInfo(
                    name=model.name,
                    max_context_tokens=model.max_context_tokens,
                    max_completion_tokens=model.max_completion_tokens,
                )
                for model in self._config.models
            ]
        )

    @map_errors
    async def GetUsage(
        self, request: inference_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GetUsageResponse:
        """Return the calling tenant's own counters and open streams.

        Status codes: UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE when
        Redis cannot be reached.
        """
        tenant = authenticate_tenant(context, self._config)
        try:
            usage = await self._usage.get(tenant.name)
            num_active_streams = await self._limiter.num_active_streams(tenant.name)
        except redis.exceptions.RedisError as exc:
            logger.error("reading usage failed: %s", exc, extra={"tenant_id": tenant.name})
            raise Unavailable(QUOTA_STORE_UNAVAILABLE) from exc
        return inference_pb2.GetUsageResponse(
            tenant_id=tenant.name,
            num_requests=usage.num_requests,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            num_active_streams=num_active_streams,
        )


def _cancellation_outcome(context: grpc.aio.ServicerContext) -> str:
    """Tell a passed deadline from a caller's cancellation; both cancel the handler."""
    remaining = context.time_remaining()
    return "deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled"


def _log_failed_release(tenant_id: str, request_id: str, release_task: asyncio.Task[None]) -> None:
    if not release_task.cancelled() and release_task.exception() is not None:
        logger.error(
            "releasing the lease of a cancelled request failed: %s; it expires by itself",
            release_task.exception(),
            extra={"request_id": request_id, "tenant_id": tenant_id},
        )
