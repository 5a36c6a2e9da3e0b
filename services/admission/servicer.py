"""The public Inference API: authenticate, validate, limit, then relay to the scheduler."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
import redis.exceptions

from services.common.config import Config, TenantConfig
from services.common.errors import ServiceError, Unavailable, map_errors
from tenantserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from . import metrics
from .audit import AuditLog, RequestAudit
from .auth import TenantDirectory
from .cache_client import CacheClient
from .embedding_servicer import EmbeddingRelayMixin
from .generation import AdmittedRequest, GenerationRelay
from .limits import AdmissionRequest, TenantLimiter
from .policy import PromptPolicy
from .quota import QuotaGate, Reservation
from .tokenization import PromptTokenizer
from .usage_report import usage_response
from .validation import SERVICE_CLASS_NAMES, check_context_length, effective_service_class, validate_request

logger = logging.getLogger(__name__)

QUOTA_STORE_UNAVAILABLE = "the quota store is unavailable; retry the request"


class InferenceServicer(EmbeddingRelayMixin, inference_pb2_grpc.InferenceServicer):
    """Serve tenants; the tenant is always the one named by the client certificate."""

    def __init__(
        self,
        config: Config,
        tokenizer: PromptTokenizer,
        limiter: TenantLimiter,
        scheduler: scheduler_pb2_grpc.SchedulerStub,
        cache: CacheClient | None = None,
        policy: PromptPolicy | None = None,
        audit_log: AuditLog | None = None,
    ) -> None:
        self._policy = policy or PromptPolicy({}, [])
        self._audit_log = audit_log or AuditLog(None, max_bytes=1, backup_count=1)
        self._config = config
        self._tokenizer = tokenizer
        self._limiter = limiter
        self._tenants = TenantDirectory(config, limiter.client)
        self.quota = QuotaGate(config, limiter)
        self._scheduler = scheduler
        self._cache = cache

    @map_errors
    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        """Stream the completion of ``request`` as deltas followed by one result.

        Status codes: UNAUTHENTICATED without a tenantserve certificate,
        PERMISSION_DENIED for a service certificate or an unconfigured
        tenant, NOT_FOUND for an unknown model, INVALID_ARGUMENT for an
        invalid field or a request over a tenant's size limit (with
        google.rpc.BadRequest), PERMISSION_DENIED for a disabled tenant or a
        model or service class it may not use (with google.rpc.ErrorInfo),
        RESOURCE_EXHAUSTED when a tenant quota is exhausted (with
        google.rpc.RetryInfo and QuotaFailure) or the scheduler's queue is
        full, UNAVAILABLE when the scheduler cannot be reached or Redis
        cannot and the failure policy is closed, and the scheduler's code for
        its other failures. Every rejection ends the stream before any delta.
        """
        arrival_time = time.perf_counter()
        tenant_label = metrics.UNKNOWN_TENANT
        outcome = "ok"
        service_class_name = SERVICE_CLASS_NAMES.get(effective_service_class(request.service_class), "invalid")
        audit = RequestAudit(self._audit_log, request.model, service_class_name, arrival_time)
        try:
            tenant = await self._tenants.authenticate(context)
            tenant_label = tenant.name
            audit.tenant_id = tenant.name
            await self._generate(request, context, tenant, arrival_time, audit)
        except ServiceError as exc:
            outcome = exc.code.name.lower()
            audit.reject(exc.code, exc.message)
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
        audit: RequestAudit,
    ) -> None:
        model = validate_request(request, self._config)
        self._tokenizer.check_size(request, model)
        # The policy may rewrite the request's texts (redaction), so it runs before tokenization.
        policy_labels = self._policy.apply(tenant.name, model.name, request)
        prompt_token_ids = await self._tokenizer.tokenize(request, model)
        audit.prompt_tokens = len(prompt_token_ids)
        check_context_length(
            len(prompt_token_ids), request.sampling.max_tokens, model, request.WhichOneof("input") or "prompt"
        )

        request_id = uuid.uuid4().hex
        log_extra = {"request_id": request_id, "tenant_id": tenant.name}
        service_class = effective_service_class(request.service_class)
        admission_request = AdmissionRequest(
            tenant_id=tenant.name,
            request_id=request_id,
            model=model.name,
            service_class=SERVICE_CLASS_NAMES[service_class],
            num_prompt_tokens=len(prompt_token_ids),
            max_tokens=request.sampling.max_tokens,
        )
        reservation = await self._admit(tenant, admission_request)
        audit.admit(request_id, tenant.name, len(prompt_token_ids), policy_labels)
        cached_result = await self._answer_from_completion_cache(tenant, request, reservation, context)
        if cached_result is not None:
            audit.settle("finished", None, cached_result.usage.completion_tokens)
            return
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
            service_class=service_class,
        )
        admitted = AdmittedRequest(schedule_request, request.client_request_id, reservation, arrival_time)
        metrics.ACTIVE_STREAMS.labels(tenant.name).inc()
        relay = GenerationRelay(self._scheduler, self.quota, admitted)
        try:
            recorder = self._completion_recorder(tenant, request, context)
            result = await relay.run(recorder)
        except asyncio.CancelledError:
            if relay.result is not None:
                # The caller went away while or after the result was written:
                # the generation itself finished.
                audit.settle("finished", None, relay.result.usage.completion_tokens)
                raise
            logger.info("request ended early: %s", _cancellation_outcome(context), extra=log_extra)
            audit.settle(_cancellation_outcome(context), None, relay.num_completion_tokens)
            raise
        except ServiceError as exc:
            logger.error("request failed: %s: %s", exc.code.name, exc.message, extra=log_extra)
            audit.settle("failed", exc.code.name, relay.num_completion_tokens)
            raise
        finally:
            metrics.ACTIVE_STREAMS.labels(tenant.name).dec()
            metrics.REQUEST_LATENCY.labels(tenant.name).observe(time.perf_counter() - arrival_time)
        audit.settle("finished", None, result.usage.completion_tokens)
        logger.info(
            "finished request: %s, %d completion tokens",
            common_pb2.FinishReason.Name(result.finish_reason),
            result.usage.completion_tokens,
            extra=log_extra,
        )

    async def _admit(self, tenant: TenantConfig, request: AdmissionRequest) -> Reservation:
        return await self.quota.admit(tenant, request)

    @map_errors
    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        """Return every configured model. Status codes: UNAUTHENTICATED, PERMISSION_DENIED."""
        await self._tenants.authenticate(context)
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
        """Return the calling tenant's own counters, and its usage and remaining quota per limit.

        Status codes: UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE when
        Redis cannot be reached.
        """
        tenant = await self._tenants.authenticate(context)
        try:
            report = await self._limiter.report(tenant.name)
        except redis.exceptions.RedisError as exc:
            logger.error("reading usage failed: %s", exc, extra={"tenant_id": tenant.name})
            raise Unavailable(QUOTA_STORE_UNAVAILABLE) from exc
        return usage_response(tenant.name, report)


def _cancellation_outcome(context: grpc.aio.ServicerContext) -> str:
    """Tell a passed deadline from a caller's cancellation; both cancel the handler."""
    remaining = context.time_remaining()
    return "deadline_exceeded" if remaining is not None and remaining <= 0 else "cancelled"
