"""Run one scheduled request: wait for a worker, call it and relay its stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from services.common.errors import ServiceError, Unavailable
from services.scheduler import metrics
from services.scheduler.dispatcher import Dispatcher
from services.scheduler.request import PendingRequest
from services.scheduler.worker_registry import WorkerHandle
from tenantserve.v1 import common_pb2, scheduler_pb2, worker_pb2

logger = logging.getLogger(__name__)


class WorkerLost(Exception):
    """The worker of a call left the registry or became unreachable."""


async def relay_request(
    request: PendingRequest,
    dispatcher: Dispatcher,
    time_remaining: Callable[[], float | None],
) -> AsyncIterator[common_pb2.GenerateResponse]:
    """Queue ``request``, place it on a worker and yield that worker's responses.

    ``time_remaining`` returns the seconds left before the caller's deadline
    (None for no deadline) and becomes the timeout of each worker call.
    Raises ServiceError: RESOURCE_EXHAUSTED when the queue is full,
    UNAVAILABLE when no worker serves the model or the worker is lost, and
    the worker's own status code and message otherwise.
    """
    dispatcher.submit(request)
    num_responses = 0
    while True:
        worker = await _wait_for_placement(request, dispatcher)
        try:
            async with contextlib.aclosing(_call_worker(worker, request, time_remaining())) as responses:
                async for response in responses:
                    if num_responses == 0:
                        ttft_seconds = time.monotonic() - request.arrival_time
                        metrics.TIME_TO_FIRST_TOKEN_SECONDS.labels(request.tenant_id).observe(ttft_seconds)
                    num_responses += 1
                    yield response
            return
        except WorkerLost as exc:
            # A worker that fails a call with UNAVAILABLE is dropped, so it
            # gets no further requests until it registers again.
            dispatcher.registry.drop(worker, str(exc))
            if num_responses > 0:
                # The caller has already received part of the completion,
                # and another worker cannot continue the same sequence, so
                # the request fails instead of failing over.
                raise Unavailable(f"{exc} after streaming part of the completion; retry the request") from exc
            lost_reason = str(exc)
        finally:
            dispatcher.release(worker)

        # Nothing reached the caller yet, so the request can start over on
        # another worker.
        logger.warning(
            "%s before the first response; requeueing the request",
            lost_reason,
            extra={"request_id": request.request_id, "tenant_id": request.tenant_id},
        )
        metrics.WORKER_FAILOVERS.labels(request.tenant_id).inc()
        dispatcher.requeue(request, lost_reason)


async def _wait_for_placement(request: PendingRequest, dispatcher: Dispatcher) -> WorkerHandle:
    assert request.placement is not None, f"request {request.request_id} is not queued"
    try:
        return await request.placement
    except asyncio.CancelledError:
        dispatcher.withdraw(request)
        raise


async def _call_worker(
    worker: WorkerHandle, request: PendingRequest, timeout: float | None
) -> AsyncIterator[common_pb2.GenerateResponse]:
    if not worker.live:
        raise WorkerLost(f"worker {worker.worker_id} left")
    call = worker.stub.Generate(to_worker_request(request.message), timeout=timeout)
    worker.calls_before_first_response.add(call)
    worker.calls.add(call)
    try:
        while True:
            response = await _read(call, worker)
            if response is grpc.aio.EOF:
                return
            worker.calls_before_first_response.discard(call)
            yield response
    finally:
        worker.calls_before_first_response.discard(call)
        worker.calls.discard(call)
        # Cancelling the call makes the worker free the request's batch slot.
        if not call.done():
            call.cancel()


async def _read(call: grpc.aio.UnaryStreamCall, worker: WorkerHandle) -> common_pb2.GenerateResponse:
    try:
        return await call.read()
    except asyncio.CancelledError:
        # The registry cancels calls when their worker leaves. That cancels
        # the call but not this task.
        task = asyncio.current_task()
        if not worker.live and task is not None and task.cancelling() == 0:
            raise WorkerLost(f"worker {worker.worker_id} left ({worker.drop_reason})") from None
        raise
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            raise WorkerLost(f"worker {worker.worker_id} is unavailable ({exc.details()})") from exc
        raise ServiceError(exc.code(), exc.details() or f"worker {worker.worker_id} failed") from exc


def to_worker_request(message: scheduler_pb2.ScheduleRequest) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(
        tenant_id=message.tenant_id,
        request_id=message.request_id,
        model=message.model,
        prompt_token_ids=message.prompt_token_ids,
        sampling=message.sampling,
        service_class=message.service_class,
    )
