"""The Scheduler gRPC service: converts messages and calls the dispatcher and registry."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from services.common.config import Config
from services.common.errors import InvalidArgument, NotFound, PermissionDenied, ServiceError, map_errors
from services.common.identity import Peer, PeerKind, peer_from_context
from services.scheduler import metrics
from services.scheduler.dispatcher import Dispatcher
from services.scheduler.relay import relay_request
from services.scheduler.request import PendingRequest
from services.scheduler.worker_registry import WorkerHandle, WorkerRegistry
from tenantserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

logger = logging.getLogger(__name__)

# The only service allowed to schedule requests.
SCHEDULE_CALLER = "admission"
# Worker services have certificate names starting with this prefix.
WORKER_SERVICE_PREFIX = "worker-"


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, config: Config, dispatcher: Dispatcher, registry: WorkerRegistry) -> None:
        self._config = config
        self._dispatcher = dispatcher
        self._registry = registry
        self._failure_log = FailureLog()

    @map_errors
    async def Schedule(
        self, request: scheduler_pb2.ScheduleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """Queue the request, place it on a worker and relay the worker's stream.

        Status codes:
        - PERMISSION_DENIED for a caller other than admission.
        - INVALID_ARGUMENT for a missing tenant_id or request_id.
        - NOT_FOUND for a model missing from the config.
        - RESOURCE_EXHAUSTED when the queue is full.
        - UNAVAILABLE when no worker serves the model or the worker is lost.
        - The worker's status code and message when the worker fails the call.
        """
        _require_caller(context, lambda peer: peer.name == SCHEDULE_CALLER, f"only {SCHEDULE_CALLER} may schedule")
        log_extra = {"request_id": request.request_id, "tenant_id": request.tenant_id}
        logger.debug("request received for model %s", request.model, extra=log_extra)

        outcome = grpc.StatusCode.OK
        try:
            self._validate(request)
            async for response in relay_request(PendingRequest(request), self._dispatcher, context.time_remaining):
                yield response
        except ServiceError as exc:
            outcome = exc.code
            self._failure_log.log(exc, log_extra)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = _cancellation_outcome(context)
            logger.debug("request ended early: %s", outcome.name, extra=log_extra)
            raise
        finally:
            metrics.REQUESTS.labels(request.tenant_id, outcome.name).inc()
        logger.debug("request finished", extra=log_extra)

    @map_errors
    async def RegisterWorker(
        self, request_iterator: AsyncIterator[scheduler_pb2.WorkerReport], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.RegisterWorkerResponse]:
        """Register the calling worker and keep it registered while reports arrive.

        Status codes:
        - PERMISSION_DENIED for a caller that is not a worker service.
        - INVALID_ARGUMENT for a report without worker_id, address, models or
          a positive max_batch_size, or one that changes worker_id or address.
        - ABORTED when the scheduler dropped the worker while the stream was
          open (a missed heartbeat, an unavailable Generate call or a newer
          registration with the same worker_id), so it must register again.
        """
        peer = _require_caller(
            context, lambda peer: peer.name.startswith(WORKER_SERVICE_PREFIX), "only worker services may register"
        )
        reply = scheduler_pb2.RegisterWorkerResponse(
            heartbeat_timeout_seconds=self._registry.heartbeat_timeout_seconds
        )
        handle: WorkerHandle | None = None
        try:
            async for report in request_iterator:
                if handle is None:
                    handle = self._registry.register(report, peer.name)
                else:
                    self._registry.refresh(handle, report)
                yield reply
        finally:
            if handle is not None:
                self._registry.drop(handle, "registration stream ended")

    def _validate(self, request: scheduler_pb2.ScheduleRequest) -> None:
        if not request.tenant_id:
            raise InvalidArgument("tenant_id", "must not be empty")
        if not request.request_id:
            raise InvalidArgument("request_id", "must not be empty")
        if self._config.model(request.model) is None:
            known = ", ".join(model.name for model in self._config.models)
            raise NotFound(f"model {request.model!r} is not configured; configured models: {known}")


def _require_caller(context: grpc.aio.ServicerContext, allowed: Callable[[Peer], bool], denial: str) -> Peer:
    peer = peer_from_context(context)
    if peer is None or peer.kind is not PeerKind.SERVICE or not allowed(peer):
        caller = "an unidentified caller" if peer is None else f"{peer.kind.value} {peer.name!r}"
        raise PermissionDenied(f"{denial}; the call came from {caller}")
    return peer


def _cancellation_outcome(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class FailureLog:
    """Logs failed requests, at most one line per status code per interval for the expected ones.

    Queue-full and no-worker rejections come in bursts under load. The
    tenantserve_scheduler_requests counter has every one, and each log line
    reports how many were left out since the previous line.
    """

    QUIET_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)

    def __init__(self, interval_seconds: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_seconds = interval_seconds
        self._clock = clock
        self._last_logged: dict[grpc.StatusCode, float] = {}
        self._num_suppressed: dict[grpc.StatusCode, int] = {}

    def log(self, error: ServiceError, log_extra: dict[str, str]) -> None:
        if error.code not in self.QUIET_CODES:
            logger.error("request failed: %s: %s", error.code.name, error.message, extra=log_extra)
            return
        now = self._clock()
        last = self._last_logged.get(error.code)
        if last is not None and now - last < self._interval_seconds:
            self._num_suppressed[error.code] = self._num_suppressed.get(error.code, 0) + 1
            return
        num_suppressed = self._num_suppressed.pop(error.code, 0)
        self._last_logged[error.code] = now
        suffix = f" ({num_suppressed} more with this code since the previous line)" if num_suppressed else ""
        logger.warning("request failed: %s: %s%s", error.code.name, error.message, suffix, extra=log_extra)
