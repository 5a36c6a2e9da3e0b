"""Worker gRPC servicer: converts protobuf messages and calls the engine."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from services.common.engine import (
    EngineStoppedError,
    FinishReason,
    InferenceEngine,
    InvalidRequestError,
    RequestFailedError,
    RequestOutput,
    RequestStream,
    SamplingParams,
    WaitingQueueFullError,
)
from services.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    map_errors,
)
from services.common.identity import peer_from_context
from services.worker_gpu import metrics
from tenantserve.v1 import common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)

SCHEDULER_SERVICE_NAME = "scheduler"

FINISH_REASONS = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_STRING: common_pb2.FINISH_REASON_STOP_STRING,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}
FINISH_REASON_NAMES = {proto: reason.value for reason, proto in FINISH_REASONS.items()}


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self, engine: InferenceEngine, model_name: str, build_report: Callable[[], scheduler_pb2.WorkerReport]
    ) -> None:
        self._engine = engine
        self._model_name = model_name
        self._build_report = build_report

    @map_errors
    async def Generate(
        self, request: worker_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """Stream the completion of ``request``: deltas, then one GenerateResult.

        Status codes: NOT_FOUND for a model this worker does not serve.
        INVALID_ARGUMENT for a missing id, invalid sampling parameters or a
        prompt that does not fit the context. RESOURCE_EXHAUSTED when the
        waiting queue is full, UNAVAILABLE while the worker shuts down, and
        INTERNAL when a model step fails, PERMISSION_DENIED for a caller
        other than the scheduler. Cancelling the call aborts the request
        within one step.
        """
        extra = {"request_id": request.request_id, "tenant_id": request.tenant_id}
        _check_caller(context)
        stream = self._add_request(request)
        logger.debug("generate started with %d prompt tokens", len(request.prompt_token_ids), extra=extra)
        # Stays "cancelled" when the caller goes away before the result.
        outcome = "cancelled"
        try:
            async for response in _responses(request, stream, time.perf_counter()):
                if response.HasField("result"):
                    outcome = FINISH_REASON_NAMES[response.result.finish_reason]
                    usage = response.result.usage
                    logger.debug("generate finished: %s, %d completion tokens", outcome, usage.completion_tokens, extra=extra)
                yield response
        except EngineStoppedError as exc:
            outcome = grpc.StatusCode.UNAVAILABLE.name
            raise Unavailable("the worker stopped before the request finished; retry on another worker") from exc
        except RequestFailedError as exc:
            outcome = grpc.StatusCode.INTERNAL.name
            logger.error("generate failed: %s", exc, extra=extra)
            raise ServiceError(grpc.StatusCode.INTERNAL, f"generation failed: {exc}") from exc
        finally:
            stream.close()
            metrics.REQUESTS.labels(request.tenant_id, outcome).inc()
            if outcome == "cancelled":
                logger.debug("generate cancelled by the caller", extra=extra)

    @map_errors
    async def GetReport(
        self, request: worker_pb2.GetReportRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.WorkerReport:
        """Return the worker's identity and current capacity."""
        return self._build_report()

    def _add_request(self, request: worker_pb2.WorkerGenerateRequest) -> RequestStream:
        try:
            self._check_ids(request)
            return self._engine.add_request(
                request.request_id, request.tenant_id, list(request.prompt_token_ids), _sampling_params(request.sampling)
            )
        except InvalidRequestError as exc:
            error: ServiceError = InvalidArgument(exc.field, exc.message)
        except WaitingQueueFullError as exc:
            error = ResourceExhausted(f"the worker's waiting queue is full ({exc}); retry later")
        except EngineStoppedError:
            error = Unavailable("the worker is shutting down; retry on another worker")
        except ServiceError as exc:
            error = exc
        metrics.REQUESTS.labels(request.tenant_id, error.code.name).inc()
        logger.info(
            "generate rejected: %s", error.message, extra={"request_id": request.request_id, "tenant_id": request.tenant_id}
        )
        raise error

    def _check_ids(self, request: worker_pb2.WorkerGenerateRequest) -> None:
        if request.model != self._model_name:
            raise NotFound(f"model {request.model!r} is not served by this worker; it serves {self._model_name!r}")
        if not request.request_id:
            raise InvalidArgument("request_id", "is missing")
        if not request.tenant_id:
            raise InvalidArgument("tenant_id", "is missing")


def _check_caller(context: grpc.aio.ServicerContext) -> None:
    # The server already rejects every certificate but services'; among
    # those, only the scheduler places requests, so no other service can
    # spend a tenant's share of the batch around the scheduler's queue.
    peer = peer_from_context(context)
    if peer is None or peer.name != SCHEDULER_SERVICE_NAME:
        name = f"{peer.kind.value} {peer.name!r}" if peer else "an unidentified caller"
        raise PermissionDenied(f"only the scheduler may call Generate; {name} may not")


async def _responses(
    request: worker_pb2.WorkerGenerateRequest, stream: RequestStream, started: float
) -> AsyncIterator[common_pb2.GenerateResponse]:
    """Convert engine outputs to responses and record the latency metrics."""
    is_first_delta = True
    async for output in stream:
        if output.token_ids or output.text:
            if is_first_delta:
                metrics.TIME_TO_FIRST_TOKEN_SECONDS.labels(request.tenant_id).observe(time.perf_counter() - started)
                is_first_delta = False
            yield common_pb2.GenerateResponse(delta=_text_delta(output))
        if output.finished:
            metrics.REQUEST_LATENCY_SECONDS.labels(request.tenant_id).observe(time.perf_counter() - started)
            yield common_pb2.GenerateResponse(result=_result(request, output))


def _sampling_params(sampling: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        # The contract reads top_p = 0 as 1 (no truncation).
        top_p=sampling.top_p or 1.0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
    )


def _text_delta(output: RequestOutput) -> common_pb2.TextDelta:
    return common_pb2.TextDelta(text=output.text, token_ids=list(output.token_ids))


def _result(request: worker_pb2.WorkerGenerateRequest, output: RequestOutput) -> common_pb2.GenerateResult:
    return common_pb2.GenerateResult(
        finish_reason=FINISH_REASONS[output.finish_reason],
        usage=common_pb2.Usage(
            prompt_tokens=output.num_prompt_tokens, completion_tokens=output.num_completion_tokens
        ),
        request_id=request.request_id,
    )
