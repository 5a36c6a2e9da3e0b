"""`tenantserve demo`: several tenants chat at once through the whole stack."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.client import ChatResult, chat_request, stream_generate, tenant_channel
from services.cli.stack import Stack
from services.common import certs
from services.common.config import Config, load_config

DEMO_CHATS: tuple[tuple[str, str], ...] = (
    ("alpha", "What is the capital of France?"),
    ("beta", "Give me three tips for writing clear code."),
    ("gamma", "Explain in two sentences what a GPU is."),
    ("alpha", "Name three planets of the solar system."),
    ("beta", "What is 12 times 12?"),
    ("gamma", "Write a haiku about the sea."),
)
MAX_TOKENS = 96


@dataclasses.dataclass
class DemoResult:
    tenant_id: str
    prompt: str
    result: ChatResult | None
    error: str = ""


def run(config_path: Path | None) -> int:
    """Use a running stack, or start one for the demo and stop it after."""
    config = load_config(config_path)
    if asyncio.run(_admission_serving(config)):
        print(f"using the stack already running at {config.admission.target}")
        return _chat_and_report(config)
    print("starting the stack (the first start loads the model; this takes a while)...", flush=True)
    with Stack(config_path) as stack:
        return _chat_and_report(stack.config)


def _chat_and_report(config: Config) -> int:
    for tenant in {tenant for tenant, _ in DEMO_CHATS}:
        if not (config.tls.cert_dir / "tenants" / f"{tenant}.crt").exists():
            certs.add_tenant(config.tls.cert_dir, tenant)
    results = asyncio.run(_send_all(config))
    _print_answers(results)
    _print_table(results)
    return 0 if all(r.result for r in results) else 1


async def _admission_serving(config: Config) -> bool:
    cert_dir = config.tls.cert_dir
    if not (cert_dir / "ca.crt").exists():
        return False
    certs.init_certs(cert_dir, config.tls.hosts)
    async with tenant_channel(config.admission.target, cert_dir, _any_demo_tenant(cert_dir)) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _any_demo_tenant(cert_dir: Path) -> str:
    tenant = DEMO_CHATS[0][0]
    if not (cert_dir / "tenants" / f"{tenant}.crt").exists():
        certs.add_tenant(cert_dir, tenant)
    return tenant


async def _send_all(config: Config) -> list[DemoResult]:
    model = config.models[0].name
    return list(await asyncio.gather(*(_send_one(config, model, tenant, prompt) for tenant, prompt in DEMO_CHATS)))


async def _send_one(config: Config, model: str, tenant_id: str, prompt: str) -> DemoResult:
    request = chat_request(model, prompt, max_tokens=MAX_TOKENS)
    try:
        async with tenant_channel(config.admission.target, config.tls.cert_dir, tenant_id) as channel:
            return DemoResult(tenant_id, prompt, await stream_generate(channel, request, timeout=300))
    except grpc.aio.AioRpcError as exc:
        return DemoResult(tenant_id, prompt, None, f"{exc.code().name}: {exc.details()}")


def _print_answers(results: list[DemoResult]) -> None:
    for item in results:
        print(f"\n[{item.tenant_id}] {item.prompt}")
        print(item.result.text.strip() if item.result else f"failed: {item.error}")


def _print_table(results: list[DemoResult]) -> None:
    print(f"\n{'tenant':<8} {'requests':>8} {'first token p50 (ms)':>21} {'tokens/s per stream':>20} {'tokens':>7}")
    for tenant_id in sorted({item.tenant_id for item in results}):
        done = [item.result for item in results if item.tenant_id == tenant_id and item.result]
        if not done:
            print(f"{tenant_id:<8} {0:>8} {'-':>21} {'-':>20} {0:>7}")
            continue
        ttft = sorted(r.time_to_first_token * 1000 for r in done)[len(done) // 2]
        rate = sum(r.tokens_per_second for r in done) / len(done)
        tokens = sum(r.num_completion_tokens for r in done)
        print(f"{tenant_id:<8} {len(done):>8} {ttft:>21.0f} {rate:>20.1f} {tokens:>7}")
