"""`tenantserve usage`: print a tenant's usage and remaining quota per limit."""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from services.cli.client import tenant_channel
from services.common import certs
from services.common.config import Config
from tenantserve.v1 import inference_pb2, inference_pb2_grpc

CALL_TIMEOUT_SECONDS = 10.0


def add_parser(commands: argparse._SubParsersAction) -> None:
    usage = commands.add_parser("usage", help="print a tenant's usage and remaining quota per limit")
    usage.add_argument("--tenant", required=True, help="tenant whose certificate to use")


def run(args: argparse.Namespace, config: Config) -> int:
    cert_path, _ = certs.tenant_cert_paths(config.tls.cert_dir, args.tenant)
    if not cert_path.exists():
        print(
            f"tenantserve: no certificate for tenant {args.tenant} in {config.tls.cert_dir}; "
            f"create one with `tenantserve certs add-tenant {args.tenant}`",
            file=sys.stderr,
        )
        return 1
    try:
        response = asyncio.run(fetch_usage(config, args.tenant))
    except grpc.aio.AioRpcError as exc:
        print(f"tenantserve: GetUsage failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(format_usage(response))
    return 0


async def fetch_usage(config: Config, tenant_id: str) -> inference_pb2.GetUsageResponse:
    async with tenant_channel(config.admission.target, config.tls.cert_dir, tenant_id) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return await stub.GetUsage(inference_pb2.GetUsageRequest(), timeout=CALL_TIMEOUT_SECONDS)


def format_usage(response: inference_pb2.GetUsageResponse) -> str:
    """Render the response as a table; a limit of 0 prints as "none"."""
    lines = [
        f"tenant {response.tenant_id} (limits version {response.limits_version})",
        f"{'limit':<24}{'value':>12}{'used':>12}{'remaining':>12}  resets at (UTC)",
    ]
    for usage in response.limits:
        value = str(usage.limit) if usage.limit else "none"
        remaining = str(usage.remaining) if usage.limit else "-"
        reset = usage.reset_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if usage.HasField("reset_time") else "-"
        lines.append(f"{usage.name:<24}{value:>12}{usage.used:>12}{remaining:>12}  {reset}")
    lines.append(
        f"settled: {response.num_requests} requests, {response.prompt_tokens} prompt tokens, "
        f"{response.completion_tokens} completion tokens; reclaimed: {response.num_reclaimed_requests} requests, "
        f"{response.reclaimed_tokens} tokens"
    )
    return "\n".join(lines)
