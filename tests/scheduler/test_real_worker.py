"""The scheduler with the real PyTorch worker and the real model, over mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from services.common.config import Config
from services.worker_gpu.factory import LoadedModel, load_model
from services.worker_gpu.server import WorkerServer, start_worker
from tenantserve.v1 import common_pb2
from tests.common.support import make_cert_dir
from tests.scheduler.support import (
    CALL_TIMEOUT_SECONDS,
    TENANT_ID,
    SchedulerUnderTest,
    make_config,
    make_schedule_request,
    running_scheduler,
    wait_until,
)

# A small KV cache and batch keep the worker's memory low on a test machine.
WORKER_FIELDS = {"device": "cpu", "max_batch_size": 4, "num_kv_blocks": 64, "max_waiting": 8}
MAX_TORCH_THREADS = 2


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cert_dir(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def loaded_model(tmp_path_factory: pytest.TempPathFactory, cert_dir: Path) -> LoadedModel:
    torch.set_num_threads(min(torch.get_num_threads(), MAX_TORCH_THREADS))
    return load_model(make_config(tmp_path_factory.mktemp("model"), cert_dir, WORKER_FIELDS))


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def worker_config(scheduler: SchedulerUnderTest, tmp_path: Path, cert_dir: Path) -> Config:
    config = make_config(tmp_path, cert_dir, WORKER_FIELDS)
    scheduler_section = dataclasses.replace(config.scheduler, address=f"127.0.0.1:{scheduler.server.port}")
    return dataclasses.replace(config, scheduler=scheduler_section)


@contextlib.asynccontextmanager
async def registered_worker(
    scheduler: SchedulerUnderTest, tmp_path: Path, cert_dir: Path, loaded_model: LoadedModel
) -> AsyncIterator[WorkerServer]:
    """Start the real worker, which registers with ``scheduler`` on its own, and stop it afterwards."""
    worker = await start_worker(worker_config(scheduler, tmp_path, cert_dir), loaded=loaded_model)
    try:
        await wait_until(lambda: len(scheduler.server.registry) == 1, "the worker registers")
        yield worker
    finally:
        await worker.stop(None)


def worker_running_requests() -> float | None:
    return REGISTRY.get_sample_value("tenantserve_worker_gpu_running_requests")


def test_real_worker_completes_request(tmp_path: Path, cert_dir: Path, loaded_model: LoadedModel) -> None:
    async def scenario() -> None:
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            async with registered_worker(scheduler, tmp_path, cert_dir, loaded_model):
                prompt = loaded_model.tokenizer.encode_chat([("user", "Name a colour.")])
                request = make_schedule_request(
                    "real-1",
                    prompt_token_ids=prompt,
                    sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0),
                )

                responses = await scheduler.schedule(request)

                deltas = [response.delta for response in responses if response.HasField("delta")]
                result = responses[-1].result
                assert deltas
                assert responses[-1].HasField("result")
                assert result.request_id == "real-1"
                assert result.usage.prompt_tokens == len(prompt)
                assert 1 <= result.usage.completion_tokens <= 4
                assert sum(len(delta.token_ids) for delta in deltas) == result.usage.completion_tokens
                assert scheduler.num_in_flight(only_worker_id(scheduler)) == 0

    run(scenario)


def test_cancellation_frees_real_worker_slot(tmp_path: Path, cert_dir: Path, loaded_model: LoadedModel) -> None:
    async def scenario() -> None:
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            async with registered_worker(scheduler, tmp_path, cert_dir, loaded_model) as worker:
                # Prompt plus completion fit the 64 blocks of 16 tokens.
                max_tokens = 900
                request = make_schedule_request(
                    "real-cancel",
                    prompt_token_ids=loaded_model.tokenizer.encode_chat([("user", "Count to one thousand.")]),
                    sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=7),
                )
                num_aborted_before = REGISTRY.get_sample_value(
                    "tenantserve_worker_gpu_aborted_requests_total", {"tenant_id": TENANT_ID}
                ) or 0.0
                call = scheduler.stub().Schedule(request, timeout=CALL_TIMEOUT_SECONDS * 10)

                first = await call.read()
                assert first.HasField("delta")
                assert worker.engine.stats().num_running == 1
                assert worker_running_requests() == 1
                call.cancel()

                await wait_until(lambda: worker.engine.stats().num_running == 0, "the worker aborts the request")
                assert worker_running_requests() == 0
                assert REGISTRY.get_sample_value(
                    "tenantserve_worker_gpu_aborted_requests_total", {"tenant_id": TENANT_ID}
                ) == num_aborted_before + 1
                await wait_until(lambda: scheduler.num_in_flight(only_worker_id(scheduler)) == 0, "the slot frees")

    run(scenario)


def test_stopped_real_worker_is_dropped(tmp_path: Path, cert_dir: Path, loaded_model: LoadedModel) -> None:
    async def scenario() -> None:
        async with running_scheduler(tmp_path, cert_dir) as scheduler:
            async with registered_worker(scheduler, tmp_path, cert_dir, loaded_model):
                pass

            await wait_until(lambda: len(scheduler.server.registry) == 0, "the scheduler drops the stopped worker")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await scheduler.schedule(make_schedule_request("after-stop"))

            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    run(scenario)


def only_worker_id(scheduler: SchedulerUnderTest) -> str:
    (handle,) = scheduler.server.registry.workers()
    return handle.worker_id
