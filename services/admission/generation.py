"""Run one admitted generation: schedule it, relay its stream, settle its usage.

Settlement (usage recorded, lease released) happens exactly once per
admitted request, before the final result reaches the caller, or on the way
out when the stream ends otherwise: error, cancellation or deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import redis.exceptions

from services.common.errors import ServiceError, Unavailable
from tenantserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from . import metrics
from .limits import StreamLease
from .usage import UsageRecorder

logger = logging.getLogger(__name__)

# Scheduler status codes, before any response, which mean that the request
# never started; it is then removed from the tenant's rate window.
NOT_STARTED_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


@dataclass
class AdmittedRequest:
    """A validated, tokenized request that holds a concurrency lease."""

    schedule_request: scheduler_pb2.ScheduleRequest
    client_request_id: str
    lease: StreamLease
    # time.perf_counter() when the Generate call arrived.
    arrival_time: float

    @property
    def tenant_id(self) -> str:
        return self.schedule_request.tenant_id

    @property
    def request_id(self) -> str:
        return self.schedule_request.request_id

    @property
    def log_extra(self) -> dict[str, str]:
        return {"request_id": self.request_id, "tenant_id": self.tenant_id}


class GenerationRelay:
    """Relay one admitted request's stream from the scheduler to the caller."""

    def __init__(
        self,
        scheduler: scheduler_pb2_grpc.SchedulerStub,
        usage: UsageRecorder,
        admitted: AdmittedRequest,
    ) -> None:
        self._scheduler = scheduler
        self._usage = usage
        self._admitted = admitted
        self._num_completion_tokens = 0
        self._started = False
        self._settled = False

    async def run(self, context: grpc.aio.ServicerContext) -> common_pb2.GenerateResult:
        """Write the deltas and the result to ``context`` and return the result.

        Raises ServiceError with the scheduler's status code when the
        scheduler fails the call. Raises asyncio.CancelledError when the
        caller cancels or its deadline passes, after cancelling the
        scheduler call.
        """
        call = self._scheduler.Schedule(self._admitted.schedule_request, timeout=context.time_remaining())
        try:
            async for response in call:
                self._started = True
                if response.HasField("result"):
                    return await self._finish(context, response)
                await self._relay_delta(context, response)
            raise Unavailable("the scheduler ended the stream without a result; retry the request")
        except grpc.aio.AioRpcError as error:
            refund_rate = not self._started and error.code() in NOT_STARTED_CODES
            await self._settle_once(refund_rate=refund_rate)
            raise ServiceError(error.code(), error.details() or error.code().name) from error
        finally:
            call.cancel()
            await self._settle_once(refund_rate=False)

    async def _relay_delta(self, context: grpc.aio.ServicerContext, response: common_pb2.GenerateResponse) -> None:
        if self._num_completion_tokens == 0 and response.delta.token_ids:
            metrics.TIME_TO_FIRST_TOKEN.labels(self._admitted.tenant_id).observe(
                time.perf_counter() - self._admitted.arrival_time
            )
        self._num_completion_tokens += len(response.delta.token_ids)
        await context.write(response)

    async def _finish(
        self, context: grpc.aio.ServicerContext, response: common_pb2.GenerateResponse
    ) -> common_pb2.GenerateResult:
        result = response.result
        result.request_id = self._admitted.request_id
        result.client_request_id = self._admitted.client_request_id
        self._num_completion_tokens = result.usage.completion_tokens
        # Settle before the caller sees the result, so that its next request
        # and its GetUsage already see this one finished.
        await self._settle_once(refund_rate=False)
        await context.write(response)
        return result

    async def _settle_once(self, *, refund_rate: bool) -> None:
        if self._settled:
            return
        self._settled = True
        # Shielded so that a cancellation of this task cannot leave the lease held.
        await asyncio.shield(self._settle(refund_rate))

    async def _settle(self, refund_rate: bool) -> None:
        # NOTE: usage is written only here, at the end of the stream, so a
        # request whose admission process dies mid-stream is never counted.
        admitted = self._admitted
        try:
            await admitted.lease.release(refund_rate=refund_rate)
            if not refund_rate:
                await self._usage.record(
                    admitted.tenant_id, len(admitted.schedule_request.prompt_token_ids), self._num_completion_tokens
                )
        except redis.exceptions.RedisError as exc:
            # The lease expires by itself; the usage of this request is lost.
            logger.error("settling the request in Redis failed: %s", exc, extra=admitted.log_extra)

