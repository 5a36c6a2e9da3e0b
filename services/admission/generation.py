"""Run one admitted generation: schedule it, relay its stream, settle its usage.

Settlement (unused tokens returned, usage recorded, lease released) happens
once per admitted request, before the final result reaches the caller, or on
the way out when the stream ends otherwise: error, cancellation or deadline.
The settle script's idempotency marker makes a repeated settlement a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from services.common.errors import ServiceError, Unavailable
from tenantserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from . import metrics
from .quota import QuotaGate, Reservation

logger = logging.getLogger(__name__)

# Scheduler status codes, before any response, which mean that the request
# never started; its whole reservation, rate slot included, is then returned.
NOT_STARTED_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


@dataclass
class AdmittedRequest:
    """A validated, tokenized request that holds a quota reservation."""

    schedule_request: scheduler_pb2.ScheduleRequest
    client_request_id: str
    reservation: Reservation
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
        quota: QuotaGate,
        admitted: AdmittedRequest,
    ) -> None:
        self._scheduler = scheduler
        self._quota = quota
        self._admitted = admitted
        self._num_completion_tokens = 0
        self._started = False
        self._settled = False
        # The result, once the scheduler sent it and it is being written.
        self.result: common_pb2.GenerateResult | None = None

    @property
    def num_completion_tokens(self) -> int:
        """Completion tokens relayed so far, or the result's count once it arrived."""
        return self._num_completion_tokens

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
            started = self._started or error.code() not in NOT_STARTED_CODES
            await self._settle_once(started=started)
            raise ServiceError(error.code(), error.details() or error.code().name) from error
        finally:
            call.cancel()
            # A cancelled or failed stream may have used its prompt, so it counts as started.
            await self._settle_once(started=True)

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
        await self._settle_once(started=True)
        self.result = result
        await context.write(response)
        return result

    async def _settle_once(self, *, started: bool) -> None:
        if self._settled:
            return
        self._settled = True
        # Shielded so that a cancellation of this task cannot leave the reservation held.
        # NOTE: when this admission process dies mid-stream, nothing settles:
        # the lease expires and the full reservation is charged (quota_scripts.py).
        settlement = self._quota.settle(
            self._admitted.reservation, num_completion_tokens=self._num_completion_tokens, started=started
        )
        await asyncio.shield(settlement)

