"""Tenant quotas through the whole stack, with two admission replicas sharing one Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.admission.server import start_admission
from services.admission.tenant_limits import update_tenant
from services.admission.usage import usage_key
from services.cli import main as cli_main
from services.common.valkey import redis_client
from tenantserve.v1 import common_pb2, inference_pb2
from tests.admission.support import default_tokenizer

from .quota_support import (
    admission_process,
    prompt_request,
    rich_details,
    run_generate,
    running_replicas,
    tenant_stub,
    wait_for_port,
    write_quota_config,
)

NUM_BURST_REQUESTS = 500
BURST_LIMIT = 100


def split_results(results: list[Any]) -> tuple[list[common_pb2.GenerateResult], list[grpc.aio.AioRpcError]]:
    completions = [result for result in results if isinstance(result, common_pb2.GenerateResult)]
    errors = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
    return completions, errors


async def redis_usage(redis_url: str, tenant_id: str) -> dict[str, int]:
    client = redis_client(redis_url)
    try:
        return {key.decode(): int(value) for key, value in (await client.hgetall(usage_key(tenant_id))).items()}
    finally:
        await client.aclose()


def test_burst_across_replicas_admits_limit(stack: Any, tmp_path: Path) -> None:
    tenant = "quota-burst"
    config = write_quota_config(
        stack, tmp_path / "config.yaml", [{"name": tenant, "requests_per_minute": BURST_LIMIT, "max_concurrent_streams": 1000}]
    )

    async def main() -> list[Any]:
        async with running_replicas(config) as replicas:
            channels = [tenant_stub(config, tenant, replica.port) for replica in replicas]
            try:
                return await asyncio.gather(
                    *(run_generate(channels[i % 2][1], prompt_request()) for i in range(NUM_BURST_REQUESTS))
                )
            finally:
                for channel, _ in channels:
                    await channel.close()

    completions, errors = split_results(asyncio.run(main()))

    assert len(completions) == BURST_LIMIT
    assert len(errors) == NUM_BURST_REQUESTS - BURST_LIMIT
    assert {error.code() for error in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    details = rich_details(errors[0])
    violation = details["QuotaFailure"].violations[0]
    assert violation.quota_id == "requests_per_minute"
    assert violation.quota_value == BURST_LIMIT
    assert violation.subject == f"tenant:{tenant}"
    retry_delay = details["RetryInfo"].retry_delay.ToTimedelta().total_seconds()
    assert 0 < retry_delay <= 60
    assert asyncio.run(redis_usage(stack.redis_url, tenant))["requests"] == BURST_LIMIT


def test_budget_for_one_request_admits_one(stack: Any, tmp_path: Path) -> None:
    tenant = "quota-budget"
    # "Hi" is one prompt token; 1 + 8 tokens is exactly one request of max_tokens 8.
    config = write_quota_config(
        stack, tmp_path / "config.yaml", [{"name": tenant, "daily_token_budget": 9, "max_tokens": 8}]
    )

    async def main() -> list[Any]:
        async with running_replicas(config) as replicas:
            channels = [tenant_stub(config, tenant, replica.port) for replica in replicas]
            try:
                return await asyncio.gather(
                    *(run_generate(channels[i % 2][1], prompt_request(max_tokens=8)) for i in range(8))
                )
            finally:
                for channel, _ in channels:
                    await channel.close()

    completions, errors = split_results(asyncio.run(main()))

    assert len(completions) == 1
    assert completions[0].usage.prompt_tokens == 1
    assert len(errors) == 7
    assert {error.code() for error in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert {rich_details(error)["QuotaFailure"].violations[0].quota_id for error in errors} == {"daily_token_budget"}


def test_mixed_outcomes_settle_exactly(stack: Any, tmp_path: Path) -> None:
    tenant = "quota-mixed"
    config = write_quota_config(
        stack,
        tmp_path / "config.yaml",
        [{"name": tenant, "tokens_per_minute": 100_000, "daily_token_budget": 100_000, "max_concurrent_streams": 32}],
    )
    async def cancel_after_first_delta(stub: Any, seed: int) -> int:
        call = stub.Generate(prompt_request("Tell me a long story.", max_tokens=200, temperature=2.0, seed=seed), timeout=180)
        received = 0
        async for response in call:
            received += len(response.delta.token_ids)
            if received >= 3:
                break
        call.cancel()
        return received

    async def main() -> tuple[list[Any], list[int], list[Any], inference_pb2.GetUsageResponse]:
        async with running_replicas(config) as replicas:
            channels = [tenant_stub(config, tenant, replica.port) for replica in replicas]
            stubs = [stub for _, stub in channels]
            try:
                finished = asyncio.gather(*(run_generate(stubs[i % 2], prompt_request("Count to ten.", max_tokens=6)) for i in range(6)))
                cancelled = asyncio.gather(*(cancel_after_first_delta(stubs[i % 2], seed=i) for i in range(4)))
                expired = asyncio.gather(
                    *(_generate_with_deadline(stubs[i % 2], prompt_request("Write an essay.", max_tokens=500, temperature=2.0, seed=i))
                      for i in range(3))
                )
                results = await asyncio.gather(finished, cancelled, expired)
                # Settlement of cancelled streams finishes after the caller has gone.
                for _ in range(100):
                    usage = await stubs[0].GetUsage(inference_pb2.GetUsageRequest())
                    if usage.num_active_streams == 0:
                        break
                    await asyncio.sleep(0.1)
                return results[0], results[1], results[2], usage
            finally:
                for channel, _ in channels:
                    await channel.close()

    finished, received, expired, usage = asyncio.run(main())
    stored = asyncio.run(redis_usage(stack.redis_url, tenant))
    limits = {limit.name: limit for limit in usage.limits}

    assert all(isinstance(result, common_pb2.GenerateResult) for result in finished)
    assert {error.code() for error in expired} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert usage.num_active_streams == 0
    assert stored["requests"] == 6 + 4 + 3
    finished_completion = sum(result.usage.completion_tokens for result in finished)
    interrupted_completion = stored["completion_tokens"] - finished_completion
    # Cancelled and expired streams are charged what admission relayed: at
    # least what the caller received, at most their max_tokens.
    assert sum(received) <= interrupted_completion <= 4 * 200 + 3 * 500
    total = stored["prompt_tokens"] + stored["completion_tokens"]
    assert limits["tokens_per_minute"].used == total
    assert limits["daily_token_budget"].used == total
    assert limits["monthly_token_budget"].used == total
    assert limits["max_concurrent_streams"].used == 0


async def _generate_with_deadline(stub: Any, request: inference_pb2.GenerateRequest) -> grpc.aio.AioRpcError:
    try:
        async for _ in stub.Generate(request, timeout=1.5):
            pass
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the request finished before its deadline")


def test_unreachable_scheduler_refunds_reservation(stack: Any, tmp_path: Path) -> None:
    tenant = "quota-refund"
    config = write_quota_config(stack, tmp_path / "config.yaml", [{"name": tenant, "daily_token_budget": 1000}])
    # Nothing listens on port 1, so every admitted request fails before it starts.
    broken = dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, listen="127.0.0.1:1", address=""))

    async def main() -> tuple[list[Any], inference_pb2.GetUsageResponse]:
        async with running_replicas(broken, count=1) as replicas:
            channel, stub = tenant_stub(config, tenant, replicas[0].port)
            async with channel:
                results = [await run_generate(stub, prompt_request(max_tokens=8)) for _ in range(3)]
                return results, await stub.GetUsage(inference_pb2.GetUsageRequest())

    results, usage = asyncio.run(main())
    limits = {limit.name: limit for limit in usage.limits}

    assert {result.code() for result in results} == {grpc.StatusCode.UNAVAILABLE}
    assert limits["daily_token_budget"].used == 0
    assert limits["requests_per_minute"].used == 0
    assert usage.num_requests == 0


def test_killed_replica_leases_reclaimed(stack: Any, tmp_path: Path) -> None:
    tenant = "quota-killed"
    config_path = tmp_path / "config.yaml"
    config = write_quota_config(
        stack, config_path, [{"name": tenant, "max_concurrent_streams": 2}], lease_ttl_seconds=2.0
    )
    listen = config.admission.listen
    # At temperature 2 the model almost never samples its end token: these seeds stream for many seconds.
    long_requests = [
        prompt_request("Tell me a very long story about dragons.", max_tokens=1000, temperature=2.0, seed=seed)
        for seed in (7, 1)
    ]

    async def main() -> tuple[list[Any], Any, Any, inference_pb2.GetUsageResponse]:
        with admission_process(config_path, listen, tmp_path / "admission.log") as process:
            await asyncio.to_thread(wait_for_port, listen, config.tls.cert_dir, tenant)
            async with running_replicas(config, count=1) as replicas:
                doomed_channel, doomed = tenant_stub(config, tenant, int(listen.rsplit(":", 1)[1]))
                channel, survivor = tenant_stub(config, tenant, replicas[0].port)
                calls = [doomed.Generate(request, timeout=180) for request in long_requests]
                first = [await call.read() for call in calls]
                process.kill()
                process.wait()
                blocked = await run_generate(survivor, prompt_request())
                # The leases expire at most 2 s (lease_ttl_seconds) after the kill.
                await asyncio.sleep(2.5)
                admitted = await run_generate(survivor, prompt_request(long_requests[0].prompt, max_tokens=1))
                usage = await survivor.GetUsage(inference_pb2.GetUsageRequest())
                await doomed_channel.close()
                await channel.close()
                return first, blocked, admitted, usage

    first, blocked, admitted, usage = asyncio.run(main())

    assert all(response.HasField("delta") for response in first)
    assert blocked.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_details(blocked)["QuotaFailure"].violations[0].quota_id == "max_concurrent_streams"
    assert isinstance(admitted, common_pb2.GenerateResult)
    assert usage.num_reclaimed_requests == 2
    # Each reclaimed reservation is charged in full: its prompt plus max_tokens.
    assert usage.reclaimed_tokens == 2 * (admitted.usage.prompt_tokens + 1000)


def test_limit_raised_mid_window_applies_at_once(stack: Any, tmp_path: Path) -> None:
    tenant = "quota-raised"
    config = write_quota_config(stack, tmp_path / "config.yaml", [{"name": tenant, "requests_per_minute": 3}])

    async def main() -> tuple[list[Any], list[Any]]:
        async with running_replicas(config) as replicas:
            channels = [tenant_stub(config, tenant, replica.port) for replica in replicas]
            stubs = [stub for _, stub in channels]
            before = await asyncio.gather(*(run_generate(stubs[i % 2], prompt_request()) for i in range(5)))
            client = redis_client(stack.redis_url)
            await update_tenant(client, tenant, requests_per_minute=5)
            await client.aclose()
            after = await asyncio.gather(*(run_generate(stubs[i % 2], prompt_request()) for i in range(4)))
            for channel in channels:
                await channel[0].close()
            return before, after

    before, after = asyncio.run(main())
    completions_before, errors_before = split_results(before)
    completions_after, errors_after = split_results(after)

    assert len(completions_before) == 3
    assert len(errors_before) == 2
    assert len(completions_after) == 2
    assert len(errors_after) == 2
    assert {rich_details(error)["QuotaFailure"].violations[0].quota_value for error in errors_after} == {5}


@pytest.mark.parametrize(
    ("limits", "request_fields", "code", "detail"),
    [
        ({"allowed_models": ["another-model"]}, {}, grpc.StatusCode.PERMISSION_DENIED, "ALLOWED_MODELS"),
        (
            {"allowed_service_classes": ["interactive"]},
            {"service_class": common_pb2.SERVICE_CLASS_BACKGROUND},
            grpc.StatusCode.PERMISSION_DENIED,
            "ALLOWED_SERVICE_CLASSES",
        ),
        ({"max_tokens": 4}, {"max_tokens": 5}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
        ({"max_prompt_tokens": 1}, {"prompt": "Hello there"}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({}, {"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
    ],
    ids=["model not allowed", "class not allowed", "max_tokens over limit", "prompt over limit", "invalid max_tokens"],
)
def test_rejection_details_decoded(
    stack: Any, tmp_path: Path, limits: dict[str, Any], request_fields: dict[str, Any], code: grpc.StatusCode, detail: str
) -> None:
    tenant = f"quota-details-{uuid.uuid4().hex[:8]}"
    config = write_quota_config(stack, tmp_path / "config.yaml", [{"name": tenant, **limits}])

    async def main() -> Any:
        async with running_replicas(config, count=1) as replicas:
            channel, stub = tenant_stub(config, tenant, replicas[0].port)
            async with channel:
                return await run_generate(stub, prompt_request(**request_fields))

    error = asyncio.run(main())

    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == code
    details = rich_details(error)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        assert details["ErrorInfo"].reason == detail
        assert details["ErrorInfo"].metadata["tenant_id"] == tenant
    else:
        violation = details["BadRequest"].field_violations[0]
        assert violation.field == detail
        assert error.details() == f"{violation.field}: {violation.description}"


def test_usage_command_prints_limits(stack: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tenant = "quota-usage-cli"
    config_path = tmp_path / "config.yaml"
    config = write_quota_config(
        stack, config_path, [{"name": tenant, "requests_per_minute": 50, "daily_token_budget": 5000}]
    )

    async def main() -> int:
        # Listens on the config's address, which the command reads.
        server = await start_admission(config, tokenizer=default_tokenizer())
        try:
            channel, stub = tenant_stub(config, tenant, server.port)
            async with channel:
                await run_generate(stub, prompt_request(max_tokens=2))
            return await asyncio.to_thread(cli_main.main, ["--config", str(config_path), "usage", "--tenant", tenant])
        finally:
            await server.stop(None)

    exit_code = asyncio.run(main())
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:7]}

    assert exit_code == 0
    assert lines[0] == f"tenant {tenant} (limits version 1)"
    assert rows["requests_per_minute"][1:4] == ["50", "1", "49"]
    assert rows["max_concurrent_streams"][1:4] == ["8", "0", "8"]
    assert rows["tokens_per_minute"][1] == "none"
    assert rows["daily_token_budget"][1] == "5000"
    assert lines[7].startswith("settled: 1 requests, 1 prompt tokens")
