"""Factories for the scheduler tests: config, a test worker, a registration client and a Schedule client.

``StubWorker`` is a test double of the Worker API contract: it streams
numbered deltas and a result, can hold a request open at a chosen delta,
and counts running requests the way a real worker does. The real worker is
exercised in test_real_worker.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import yaml

from services.common.config import DEFAULT_CONFIG_PATH, Config, parse_config
from services.common.grpc_server import RunningServer, start_server
from services.common.tls import secure_channel, service_channel_credentials, tenant_channel_credentials
from services.scheduler.server import SchedulerServer, start_scheduler
from tenantserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

MODEL = "smollm2-135m-instruct"
TENANT_ID = "alpha"
# Upper bound on any wait in a test, so that a bug fails the test instead of hanging it.
WAIT_TIMEOUT_SECONDS = 30.0
# Deadline of Schedule calls that are expected to finish.
CALL_TIMEOUT_SECONDS = 30.0


def make_config(
    tmp_path: Path, cert_dir: Path, worker_fields: dict[str, Any] | None = None, **scheduler_fields: Any
) -> Config:
    """Return the default config with the test certificates, loopback ports 0 and the given fields."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["state_dir"] = str(tmp_path / "state")
    raw["tls"]["cert_dir"] = str(cert_dir)
    raw["services"]["scheduler"].update(listen="127.0.0.1:0", metrics_port=0, **scheduler_fields)
    raw["services"]["worker_gpu"].update(listen="127.0.0.1:0", metrics_port=0, **(worker_fields or {}))
    return parse_config(raw, environ={})


def make_report(worker_id: str, port: int, **fields: Any) -> scheduler_pb2.WorkerReport:
    values: dict[str, Any] = {
        "worker_id": worker_id,
        "address": f"127.0.0.1:{port}",
        "models": [MODEL],
        "accelerator": scheduler_pb2.ACCELERATOR_KIND_CPU,
        "max_batch_size": 4,
        "num_free_kv_blocks": 100,
        "num_total_kv_blocks": 100,
        "kv_block_size": 16,
    }
    values.update(fields)
    return scheduler_pb2.WorkerReport(**values)


def make_schedule_request(request_id: str, **fields: Any) -> scheduler_pb2.ScheduleRequest:
    values: dict[str, Any] = {
        "tenant_id": TENANT_ID,
        "request_id": request_id,
        "model": MODEL,
        "prompt_token_ids": [1, 2, 3],
        "sampling": common_pb2.SamplingParams(max_tokens=3),
        "service_class": common_pb2.SERVICE_CLASS_INTERACTIVE,
    }
    values.update(fields)
    return scheduler_pb2.ScheduleRequest(**values)


async def wait_until(predicate: Callable[[], bool], description: str) -> None:
    """Poll ``predicate`` until it is true; fail after WAIT_TIMEOUT_SECONDS with ``description``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_TIMEOUT_SECONDS
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {WAIT_TIMEOUT_SECONDS} s waiting until {description}")
        await asyncio.sleep(0.01)


class StubWorker(worker_pb2_grpc.WorkerServicer):
    """A Worker servicer that streams ``num_deltas`` deltas ("t0", "t1", ...) and a result.

    With ``hold_at`` set, each request waits before sending delta number
    ``hold_at`` until ``release`` is set (``hold_at=0`` waits before the
    first response). A request whose prompt starts with ``REJECTED_TOKEN``
    fails with INVALID_ARGUMENT.
    """

    REJECTED_TOKEN = 999_999
    REJECTED_MESSAGE = "prompt_token_ids: 3 tokens do not fit the context"

    def __init__(self, worker_id: str, *, num_deltas: int = 3, hold_at: int | None = None) -> None:
        self.worker_id = worker_id
        self.num_deltas = num_deltas
        self.hold_at = hold_at
        self.release = asyncio.Event()
        self.running: set[str] = set()
        self.received: list[worker_pb2.WorkerGenerateRequest] = []
        self.cancelled: list[str] = []
        self.time_remaining: list[float | None] = []
        self.port = 0

    async def Generate(  # type: ignore[override]
        self, request: worker_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        self.received.append(request)
        self.time_remaining.append(context.time_remaining())
        if request.prompt_token_ids[:1] == [self.REJECTED_TOKEN]:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.REJECTED_MESSAGE)
        self.running.add(request.request_id)
        try:
            for index in range(self.num_deltas):
                if index == self.hold_at:
                    await self.release.wait()
                yield common_pb2.GenerateResponse(delta=common_pb2.TextDelta(text=f"t{index}", token_ids=[index]))
            yield common_pb2.GenerateResponse(result=self._result(request))
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise
        finally:
            self.running.discard(request.request_id)

    async def GetReport(
        self, request: worker_pb2.GetReportRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.WorkerReport:
        return make_report(self.worker_id, self.port, num_running=len(self.running))

    def _result(self, request: worker_pb2.WorkerGenerateRequest) -> common_pb2.GenerateResult:
        return common_pb2.GenerateResult(
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=self.num_deltas),
            request_id=request.request_id,
        )


async def start_stub_worker(cert_dir: Path, servicer: StubWorker) -> RunningServer:
    def register(server: grpc.aio.Server) -> list[str]:
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        return ["tenantserve.v1.Worker"]

    running = await start_server("worker-gpu", "127.0.0.1:0", cert_dir, register)
    servicer.port = running.port
    return running


class WorkerRegistration:
    """The worker side of a RegisterWorker stream, driven report by report by the test."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self.call = scheduler_pb2_grpc.SchedulerStub(channel).RegisterWorker()

    @classmethod
    def open(cls, scheduler_port: int, credentials: grpc.ChannelCredentials) -> WorkerRegistration:
        return cls(secure_channel(f"127.0.0.1:{scheduler_port}", credentials))

    async def send(self, report: scheduler_pb2.WorkerReport) -> scheduler_pb2.RegisterWorkerResponse:
        await self.call.write(report)
        return await self.call.read()

    async def close(self) -> None:
        """End the stream from the worker side and wait for the scheduler's status."""
        await self.call.done_writing()
        await self.call.code()
        await self._channel.close()


@dataclasses.dataclass
class SchedulerUnderTest:
    """A scheduler on a free loopback port and clients that call it with the test certificates."""

    server: SchedulerServer
    cert_dir: Path
    channels: list[grpc.aio.Channel] = dataclasses.field(default_factory=list)

    def stub(self, credentials: grpc.ChannelCredentials | None = None) -> scheduler_pb2_grpc.SchedulerStub:
        """Return a Scheduler stub that presents ``credentials``, by default admission's certificate."""
        if credentials is None:
            credentials = service_channel_credentials(self.cert_dir, "admission")
        channel = secure_channel(f"127.0.0.1:{self.server.port}", credentials)
        self.channels.append(channel)
        return scheduler_pb2_grpc.SchedulerStub(channel)

    def tenant_credentials(self) -> grpc.ChannelCredentials:
        return tenant_channel_credentials(self.cert_dir, TENANT_ID)

    def service_credentials(self, service_name: str) -> grpc.ChannelCredentials:
        return service_channel_credentials(self.cert_dir, service_name)

    async def register(self, report: scheduler_pb2.WorkerReport) -> WorkerRegistration:
        """Register a worker with the worker-gpu certificate and wait until the scheduler lists it."""
        registration = WorkerRegistration.open(self.server.port, self.service_credentials("worker-gpu"))
        await registration.send(report)
        return registration

    async def schedule(self, request: scheduler_pb2.ScheduleRequest) -> list[common_pb2.GenerateResponse]:
        """Run one Schedule call to the end and return its responses."""
        call = self.stub().Schedule(request, timeout=CALL_TIMEOUT_SECONDS)
        return [response async for response in call]

    def queue_depth(self) -> int:
        return len(self.server.dispatcher.queue)

    def num_in_flight(self, worker_id: str) -> int:
        handle = self.server.registry.get(worker_id)
        return 0 if handle is None else handle.num_in_flight


@contextlib.asynccontextmanager
async def running_scheduler(tmp_path: Path, cert_dir: Path, **scheduler_fields: Any) -> AsyncIterator[SchedulerUnderTest]:
    server = await start_scheduler(make_config(tmp_path, cert_dir, **scheduler_fields))
    under_test = SchedulerUnderTest(server=server, cert_dir=cert_dir)
    try:
        yield under_test
    finally:
        for channel in under_test.channels:
            await channel.close()
        await server.stop(None)
