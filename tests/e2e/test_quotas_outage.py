"""The Redis failure policy of two admission replicas while their Redis server is down and after it returns."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import REGISTRY

from services.common.valkey import redis_client
from tenantserve.v1 import common_pb2, inference_pb2

from .quota_support import RestartableValkey, prompt_request, run_generate, running_replicas, tenant_stub, write_quota_config

OPEN_TENANT = "outage-open"
BUDGET_TENANT = "outage-budget"
LOCAL_CAP = 3
STATE_CHANGES = "tenantserve_admission_quota_store_state_changes_total"


def state_changes(state: str) -> float:
    return REGISTRY.get_sample_value(STATE_CHANGES, {"state": state}) or 0.0


async def stored_usage(redis_url: str, tenant_id: str) -> dict[str, int]:
    client = redis_client(redis_url)
    try:
        fields = await client.hgetall(f"{{{tenant_id}}}:usage")
        budget = await client.hgetall(f"{{{tenant_id}}}:budget")
        return {
            **{key.decode(): int(value) for key, value in fields.items()},
            "day_tokens": int(budget.get(b"day_tokens", 0)),
            "num_reservations": await client.hlen(f"{{{tenant_id}}}:reservations"),
        }
    finally:
        await client.aclose()


async def wait_for_requests(redis_url: str, tenant_id: str, expected: int, timeout: float = 60.0) -> dict[str, int]:
    """Poll the tenant's settled request count until it reaches ``expected``; the settle retries back off up to 32 s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        usage = await stored_usage(redis_url, tenant_id)
        if usage.get("requests", 0) >= expected or asyncio.get_running_loop().time() > deadline:
            return usage
        await asyncio.sleep(0.2)


def test_outage_applies_policy_and_counts_once(stack: Any, tmp_path: Path) -> None:
    valkey = RestartableValkey(tmp_path / "valkey")
    valkey.start()
    config = write_quota_config(
        stack,
        tmp_path / "config.yaml",
        [{"name": OPEN_TENANT}, {"name": BUDGET_TENANT, "daily_token_budget": 100_000}],
        redis_url=valkey.url,
        redis_failure_concurrency="open",
        redis_failure_local_requests_per_minute=LOCAL_CAP,
    )

    async def main() -> dict[str, Any]:
        outcome: dict[str, Any] = {}
        async with running_replicas(config) as replicas:
            channels = [tenant_stub(config, OPEN_TENANT, replica.port) for replica in replicas]
            budget_channel, budget_stub = tenant_stub(config, BUDGET_TENANT, replicas[0].port)
            stubs = [stub for _, stub in channels]
            outcome["before"] = [await run_generate(stub, prompt_request()) for stub in (*stubs, budget_stub)]
            unavailable_before, available_before = state_changes("unavailable"), state_changes("available")

            valkey.stop()
            outcome["during"] = [
                await asyncio.gather(*(run_generate(stub, prompt_request()) for _ in range(LOCAL_CAP + 2))) for stub in stubs
            ]
            outcome["budget_during"] = await run_generate(budget_stub, prompt_request())
            outcome["went_down"] = state_changes("unavailable") - unavailable_before

            valkey.start()
            outcome["settled"] = await wait_for_requests(valkey.url, OPEN_TENANT, 2 + 2 * LOCAL_CAP)
            outcome["after"] = [await run_generate(stub, prompt_request()) for stub in (*stubs, budget_stub)]
            outcome["came_back"] = state_changes("available") - available_before
            outcome["usage"] = await stubs[0].GetUsage(inference_pb2.GetUsageRequest())
            for channel, _ in (*channels, (budget_channel, None)):
                await channel.close()
        outcome["final"] = await stored_usage(valkey.url, OPEN_TENANT)
        outcome["budget_final"] = await stored_usage(valkey.url, BUDGET_TENANT)
        return outcome

    try:
        outcome = asyncio.run(main())
    finally:
        valkey.stop()

    assert all(isinstance(result, common_pb2.GenerateResult) for result in outcome["before"])
    for results in outcome["during"]:
        codes = [result.code() if isinstance(result, grpc.aio.AioRpcError) else None for result in results]
        assert codes.count(None) == LOCAL_CAP
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2
    budget_error = outcome["budget_during"]
    assert budget_error.code() == grpc.StatusCode.UNAVAILABLE
    assert "budget limits fail closed" in budget_error.details()
    # Each replica logs and counts the outage once, however many requests failed.
    assert outcome["went_down"] == 2
    assert outcome["came_back"] == 2
    assert all(isinstance(result, common_pb2.GenerateResult) for result in outcome["after"])

    # 2 requests before, 3 per replica during and 2 after: each counted once.
    final = outcome["final"]
    assert outcome["settled"]["requests"] == 2 + 2 * LOCAL_CAP
    assert final["requests"] == 2 + 2 * LOCAL_CAP + 2
    assert final["day_tokens"] == final["prompt_tokens"] + final["completion_tokens"]
    assert final["num_reservations"] == 0
    assert outcome["budget_final"]["requests"] == 2
    assert outcome["usage"].num_active_streams == 0
