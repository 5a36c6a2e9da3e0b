"""Admission relays the embedding calls to the cache service under the tenant's quotas."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import yaml

from services.admission.server import start_admission
from services.common import certs, tls
from services.common.config import DEFAULT_CONFIG_PATH, parse_config
from tenantserve.v1 import inference_pb2, inference_pb2_grpc
from tests.admission.support import closed_port, default_tokenizer
from tests.cache.support import make_cert_dir, rpc_error, running_cache, shared_encoder

Scenario = Callable[[inference_pb2_grpc.InferenceStub], Awaitable[None]]
TENANTS: list[dict[str, Any]] = [
    {"name": "relay-a"},
    {"name": "relay-small", "tokens_per_minute": 20},
    {"name": "relay-chat-only", "allowed_models": ["smollm2-135m-instruct"]},
]


def run_with_admission(tmp_path: Path, valkey_url: str, tenant_id: str, scenario: Scenario) -> None:
    """Start the cache service and admission in this process and run ``scenario`` as ``tenant_id``."""
    cert_dir = make_cert_dir(tmp_path)
    certs.add_tenant(cert_dir, tenant_id)
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw.update(redis_url=valkey_url, tenants=TENANTS)
    raw["tls"]["cert_dir"] = str(cert_dir)
    raw["services"]["cache"]["device"] = "cpu"
    raw["services"]["scheduler"]["listen"] = f"127.0.0.1:{closed_port()}"

    async def main() -> None:
        async with running_cache(parse_config(raw, environ={})) as cache:
            raw["services"]["cache"]["listen"] = f"127.0.0.1:{cache.port}"
            config = parse_config(raw, environ={})
            admission = await start_admission(config, listen="127.0.0.1:0", tokenizer=default_tokenizer())
            channel = tls.secure_channel(f"127.0.0.1:{admission.port}", tls.tenant_channel_credentials(cert_dir, tenant_id))
            try:
                await scenario(inference_pb2_grpc.InferenceStub(channel))
            finally:
                await channel.close()
                await admission.stop(None)

    asyncio.run(main())


def test_embed_tokens_count_as_usage(tmp_path: Path, valkey_url: str) -> None:
    async def scenario(stub: inference_pb2_grpc.InferenceStub) -> None:
        before = await stub.GetUsage(inference_pb2.GetUsageRequest())

        reply = await stub.Embed(inference_pb2.EmbedRequest(texts=["count these tokens", "and these"]))
        after = await stub.GetUsage(inference_pb2.GetUsageRequest())

        assert reply.num_tokens == sum(shared_encoder().count_tokens(["count these tokens", "and these"]))
        assert after.prompt_tokens - before.prompt_tokens == reply.num_tokens
        assert after.completion_tokens == before.completion_tokens
        assert after.num_requests - before.num_requests == 1

    run_with_admission(tmp_path, valkey_url, "relay-a", scenario)


def test_rejected_call_is_refunded(tmp_path: Path, valkey_url: str) -> None:
    async def scenario(stub: inference_pb2_grpc.InferenceStub) -> None:
        before = await stub.GetUsage(inference_pb2.GetUsageRequest())

        error = await rpc_error(stub.DeleteDocuments(inference_pb2.DeleteDocumentsRequest(ids=["no-such-document"])))
        after = await stub.GetUsage(inference_pb2.GetUsageRequest())

        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details().startswith("ids[0]: document 'no-such-document' not found")
        assert after.num_requests == before.num_requests
        assert after.prompt_tokens == before.prompt_tokens

    run_with_admission(tmp_path, valkey_url, "relay-a", scenario)


def test_embed_over_token_limit_is_rejected(tmp_path: Path, valkey_url: str) -> None:
    async def scenario(stub: inference_pb2_grpc.InferenceStub) -> None:
        too_large = await rpc_error(stub.Embed(inference_pb2.EmbedRequest(texts=["word " * 30])))
        first = await stub.Embed(inference_pb2.EmbedRequest(texts=["word " * 12]))
        second = await rpc_error(stub.Embed(inference_pb2.EmbedRequest(texts=["word " * 12])))

        # A call that alone exceeds the limit can never pass; one that only
        # finds the window full can pass later.
        assert too_large.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tokens_per_minute=20" in too_large.details()
        assert first.num_tokens == 14
        assert second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tokens_per_minute" in second.details()

    run_with_admission(tmp_path, valkey_url, "relay-small", scenario)


def test_embedding_model_not_allowed(tmp_path: Path, valkey_url: str) -> None:
    async def scenario(stub: inference_pb2_grpc.InferenceStub) -> None:
        error = await rpc_error(stub.Search(inference_pb2.SearchRequest(query="anything", k=1)))

        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not use this model" in error.details()

    run_with_admission(tmp_path, valkey_url, "relay-chat-only", scenario)
