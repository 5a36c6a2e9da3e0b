"""The Worker gRPC service in-process, over real mutual TLS, with the real model."""

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common import certs, tls
from services.common.config import Config
from services.scheduler.server import start_scheduler
from services.worker_gpu.server import WorkerServer, start_worker
from tenantserve.v1 import common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc

from .support import FRANCE_QUESTION, STORY_REQUEST, chat_ids, loaded_model, make_config, wait_until

MODEL = "smollm2-135m-instruct"


def make_worker_config(tmp_path: Path, **worker_overrides) -> Config:
    cert_dir = tmp_path / "certs"
    certs.init_certs(cert_dir, ("localhost", "127.0.0.1"))
    certs.add_tenant(cert_dir, "alpha")
    config = make_config(**worker_overrides)
    return dataclasses.replace(config, tls=dataclasses.replace(config.tls, cert_dir=cert_dir))


@contextlib.asynccontextmanager
async def running_worker(config: Config, register: bool = False) -> AsyncIterator[WorkerServer]:
    server = await start_worker(config, listen="127.0.0.1:0", loaded=loaded_model(), register_with_scheduler=register)
    try:
        yield server
    finally:
        await server.stop(grace=None)


def worker_stub(config: Config, port: int, tenant: str | None = None) -> tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerStub]:
    """A stub that calls as the scheduler service, or as ``tenant`` when given."""
    cert_dir = config.tls.cert_dir
    if tenant is None:
        credentials = tls.service_channel_credentials(cert_dir, "scheduler")
    else:
        credentials = tls.tenant_channel_credentials(cert_dir, tenant)
    channel = tls.secure_channel(f"127.0.0.1:{port}", credentials)
    return channel, worker_pb2_grpc.WorkerStub(channel)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def num_steps_with_several_sequences() -> float:
    total = metric("tenantserve_worker_gpu_step_sequences_count")
    return total - metric("tenantserve_worker_gpu_step_sequences_bucket", le="2.0")


def generate_request(prompt: list[int], max_tokens: int = 12, **fields) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(
        tenant_id="alpha",
        request_id=fields.pop("request_id", "req-1"),
        model=fields.pop("model", MODEL),
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **fields),
        service_class=common_pb2.SERVICE_CLASS_INTERACTIVE,
    )


def test_generate_streams_deltas_then_result(tmp_path):
    config = make_worker_config(tmp_path)
    prompt = chat_ids(FRANCE_QUESTION)

    async def scenario():
        async with running_worker(config) as server:
            channel, stub = worker_stub(config, server.port)
            async with channel:
                return [response async for response in stub.Generate(generate_request(prompt), timeout=120)]

    responses = asyncio.run(scenario())

    *deltas, last = responses
    assert deltas
    assert all(response.HasField("delta") for response in deltas)
    assert last.HasField("result")
    assert "Paris" in "".join(response.delta.text for response in deltas)
    assert last.result.finish_reason == common_pb2.FINISH_REASON_STOP
    assert last.result.request_id == "req-1"
    assert last.result.usage.prompt_tokens == len(prompt)
    assert last.result.usage.completion_tokens == sum(len(response.delta.token_ids) for response in deltas)


def test_stop_string_is_not_streamed_over_grpc(tmp_path):
    config = make_worker_config(tmp_path)

    async def scenario():
        async with running_worker(config) as server:
            channel, stub = worker_stub(config, server.port)
            async with channel:
                request = generate_request(chat_ids(FRANCE_QUESTION), stop=["Paris"])
                return [response async for response in stub.Generate(request, timeout=120)]

    *deltas, last = asyncio.run(scenario())

    assert "".join(response.delta.text for response in deltas) == "The capital of France is "
    assert last.result.finish_reason == common_pb2.FINISH_REASON_STOP_STRING


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"model": "other-model"}, grpc.StatusCode.NOT_FOUND),
        ({"request_id": ""}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"temperature": 3.0}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_invalid_generate_requests_fail(tmp_path, fields, code):
    config = make_worker_config(tmp_path)

    async def scenario():
        async with running_worker(config) as server:
            channel, stub = worker_stub(config, server.port)
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for _ in stub.Generate(generate_request([1, 2, 3], **fields), timeout=60):
                        pass
                return raised.value.code()

    assert asyncio.run(scenario()) == code


def test_prompt_longer_than_context_fails(tmp_path):
    config = make_worker_config(tmp_path)

    async def scenario():
        async with running_worker(config) as server:
            channel, stub = worker_stub(config, server.port)
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for _ in stub.Generate(generate_request([100] * 5000), timeout=60):
                        pass
                return raised.value

    error = asyncio.run(scenario())

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_token_ids" in error.details()


def test_tenant_certificate_is_rejected(tmp_path):
    config = make_worker_config(tmp_path)

    async def scenario():
        async with running_worker(config) as server:
            channel, stub = worker_stub(config, server.port, tenant="alpha")
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.GetReport(worker_pb2.GetReportRequest(), timeout=30)
                return raised.value.code()

    assert asyncio.run(scenario()) == grpc.StatusCode.PERMISSION_DENIED


def test_only_scheduler_may_generate(tmp_path):
    config = make_worker_config(tmp_path)

    async def scenario():
        async with running_worker(config) as server:
            credentials = tls.service_channel_credentials(config.tls.cert_dir, "admission")
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                request = worker_pb2.WorkerGenerateRequest(
                    tenant_id="alpha",
                    request_id="from-admission",
                    model=config.worker_gpu.model,
                    prompt_token_ids=[1, 2, 3],
                    sampling=common_pb2.SamplingParams(max_tokens=2),
                )
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for _ in stub.Generate(request, timeout=30):
                        pass
                return raised.value

    error = asyncio.run(scenario())

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only the scheduler may call Generate" in error.details()


def test_concurrent_calls_share_steps_in_metrics(tmp_path):
    config = make_worker_config(tmp_path)
    questions = [FRANCE_QUESTION, "Name three colors.", "What is 2 + 2?"]
    shared_steps_before = num_steps_with_several_sequences()
    ttft_count_before = metric("tenantserve_worker_gpu_time_to_first_token_seconds_count", tenant_id="alpha")

    async def scenario():
        async with running_worker(config) as server:
            channel, stub = worker_stub(config, server.port)
            async with channel:

                async def generate(index: int, question: str) -> list[common_pb2.GenerateResponse]:
                    request = generate_request(chat_ids(question), max_tokens=8, request_id=f"req-{index}")
                    return [response async for response in stub.Generate(request, timeout=120)]

                return await asyncio.gather(*(generate(i, q) for i, q in enumerate(questions)))

    results = asyncio.run(scenario())

    for responses in results:
        assert responses[-1].HasField("result")
    assert num_steps_with_several_sequences() > shared_steps_before
    ttft_count = metric("tenantserve_worker_gpu_time_to_first_token_seconds_count", tenant_id="alpha")
    assert ttft_count == ttft_count_before + len(questions)


def test_cancelled_call_frees_its_batch_slot(tmp_path):
    config = make_worker_config(tmp_path)
    aborted_before = metric("tenantserve_worker_gpu_aborted_requests_total", tenant_id="alpha")

    async def scenario():
        async with running_worker(config) as server:
            channel, stub = worker_stub(config, server.port)
            async with channel:
                call = stub.Generate(generate_request(chat_ids(STORY_REQUEST), max_tokens=500), timeout=120)
                await call.read()
                busy = await stub.GetReport(worker_pb2.GetReportRequest(), timeout=30)
                call.cancel()
                await wait_until(lambda: server.engine.stats().num_running == 0)
                idle = await stub.GetReport(worker_pb2.GetReportRequest(), timeout=30)
                return busy, idle

    busy, idle = asyncio.run(scenario())

    assert busy.num_running == 1
    assert busy.num_free_kv_blocks < busy.num_total_kv_blocks
    assert idle.num_running == 0
    assert idle.num_free_kv_blocks == idle.num_total_kv_blocks
    assert metric("tenantserve_worker_gpu_aborted_requests_total", tenant_id="alpha") == aborted_before + 1


def test_report_describes_worker(tmp_path):
    config = make_worker_config(tmp_path, max_batch_size=6, kv_block_size=16, num_kv_blocks=128)

    async def scenario():
        async with running_worker(config) as server:
            channel, stub = worker_stub(config, server.port)
            async with channel:
                return server, await stub.GetReport(worker_pb2.GetReportRequest(), timeout=30)

    server, report = asyncio.run(scenario())

    assert report.worker_id
    assert report.address == f"127.0.0.1:{server.port}"
    assert list(report.models) == [MODEL]
    assert report.accelerator == scheduler_pb2.ACCELERATOR_KIND_CPU
    assert report.max_batch_size == 6
    assert report.kv_block_size == 16
    assert report.num_total_kv_blocks == 128
    assert report.num_free_kv_blocks == 128
    assert report.num_running == 0
    assert report.num_waiting == 0


def test_worker_registers_and_reregisters_with_scheduler(tmp_path):
    config = make_worker_config(tmp_path)

    async def scenario():
        scheduler = await start_scheduler(config, listen="127.0.0.1:0")
        port = scheduler.port
        worker_config = dataclasses.replace(
            config, scheduler=dataclasses.replace(config.scheduler, address=f"127.0.0.1:{port}")
        )
        async with running_worker(worker_config, register=True) as worker:
            await asyncio.wait_for(worker.registration.registered.wait(), timeout=30)
            registered = [(handle.worker_id, handle.address) for handle in scheduler.registry.workers()]

            await scheduler.stop(grace=None)
            await wait_until(lambda: not worker.registration.registered.is_set())
            scheduler = await start_scheduler(worker_config, listen=f"127.0.0.1:{port}")
            try:
                await asyncio.wait_for(worker.registration.registered.wait(), timeout=30)
                reregistered = [handle.worker_id for handle in scheduler.registry.workers()]
            finally:
                await scheduler.stop(grace=None)
            return worker, registered, reregistered

    worker, registered, reregistered = asyncio.run(scenario())

    assert registered == [(worker.worker_id, worker.address)]
    assert reregistered == [worker.worker_id]
