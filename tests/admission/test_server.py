"""The admission gRPC server in process: identity, validation and limits before the scheduler.

The config points the scheduler at a closed port, so every request that
passes admission ends with UNAVAILABLE from the scheduler hop. The
end-to-end tests cover the path through a real scheduler and worker.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from cryptography import x509
import yaml

from services.admission.limits import AdmissionRequest, TenantLimiter, rate_key, streams_key
from services.admission.server import start_admission
from services.admission.servicer import InferenceServicer
from services.admission.tenant_limits import seed_tenants
from services.admission.usage import usage_key
from services.common.config import DEFAULT_CONFIG_PATH, ConfigError
from services.common import tls
from services.common.valkey import ValkeyServer, redis_client
from tenantserve.v1 import inference_pb2
from tenantserve.v1.inference_pb2_grpc import InferenceStub

from .support import (
    MODEL,
    chat_request,
    client_credentials_with_sans,
    collect_stream,
    default_tokenizer,
    make_cert_dir,
    make_config,
    running_admission,
    service_stub,
    tenant_stub,
)


def unique_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def admission_request(tenant_id: str, request_id: str) -> AdmissionRequest:
    return AdmissionRequest(tenant_id, request_id, MODEL, "interactive", num_prompt_tokens=10, max_tokens=8)


def test_list_models_for_tenant(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir = make_cert_dir(tmp_path, [tenant])
    config = make_config(cert_dir, valkey_url, [{"name": tenant}])

    async def main() -> inference_pb2.ListModelsResponse:
        async with running_admission(config) as server:
            channel, stub = tenant_stub(cert_dir, tenant, server.port)
            async with channel:
                return await stub.ListModels(inference_pb2.ListModelsRequest())

    response = asyncio.run(main())

    assert [model.name for model in response.models] == [MODEL]
    assert response.models[0].max_context_tokens == 2048
    assert response.models[0].max_completion_tokens == 1024


def test_get_usage_returns_own_counters(tmp_path: Path, valkey_url: str) -> None:
    tenant, other = unique_name(), unique_name()
    cert_dir = make_cert_dir(tmp_path, [tenant, other])
    config = make_config(cert_dir, valkey_url, [{"name": tenant}, {"name": other}])

    async def main() -> inference_pb2.GetUsageResponse:
        client = redis_client(valkey_url)
        await client.hset(usage_key(tenant), mapping={"requests": 3, "prompt_tokens": 70, "completion_tokens": 9})
        await client.hset(usage_key(other), mapping={"requests": 100})
        await client.aclose()
        async with running_admission(config) as server:
            channel, stub = tenant_stub(cert_dir, tenant, server.port)
            async with channel:
                return await stub.GetUsage(inference_pb2.GetUsageRequest())

    response = asyncio.run(main())

    assert response.tenant_id == tenant
    assert response.num_requests == 3
    assert response.prompt_tokens == 70
    assert response.completion_tokens == 9
    assert response.num_active_streams == 0


@pytest.mark.parametrize("rpc", ["Generate", "ListModels", "GetUsage"])
def test_service_certificate_rejected(tmp_path: Path, valkey_url: str, rpc: str) -> None:
    cert_dir = make_cert_dir(tmp_path, [])
    config = make_config(cert_dir, valkey_url, [{"name": "alpha"}])
    requests = {
        "Generate": chat_request(),
        "ListModels": inference_pb2.ListModelsRequest(),
        "GetUsage": inference_pb2.GetUsageRequest(),
    }

    async def main() -> grpc.aio.AioRpcError:
        async with running_admission(config) as server:
            channel, stub = service_stub(cert_dir, "scheduler", server.port)
            async with channel:
                call = getattr(stub, rpc)(requests[rpc])
                if rpc == "Generate":
                    responses, error = await collect_stream(call)
                    assert responses == []
                    assert error is not None
                    return error
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                return caught.value

    error = asyncio.run(main())

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "for tenants" in error.details()


def test_unconfigured_tenant_rejected(tmp_path: Path, valkey_url: str) -> None:
    cert_dir = make_cert_dir(tmp_path, ["stranger"])
    config = make_config(cert_dir, valkey_url, [{"name": "alpha"}])

    async def main() -> tuple[grpc.aio.AioRpcError | None, int]:
        async with running_admission(config) as server:
            channel, stub = tenant_stub(cert_dir, "stranger", server.port)
            async with channel:
                _, error = await collect_stream(stub.Generate(chat_request()))
        client = redis_client(valkey_url)
        num_keys = len(await client.keys("{stranger}:*"))
        await client.aclose()
        return error, num_keys

    error, num_keys = asyncio.run(main())

    assert error is not None
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "tenant 'stranger' is not configured"
    assert num_keys == 0


@pytest.mark.parametrize(
    "sans",
    [
        [x509.DNSName("alpha")],
        [x509.UniformResourceIdentifier("spiffe://other-domain/tenant/alpha")],
        [x509.UniformResourceIdentifier("spiffe://tenantserve/tenant/alpha"),
         x509.UniformResourceIdentifier("spiffe://tenantserve/tenant/beta")],
    ],
    ids=["dns name only", "foreign trust domain", "two tenant uris"],
)
def test_certificate_without_identity_unauthenticated(tmp_path: Path, valkey_url: str, sans: list[x509.GeneralName]) -> None:
    cert_dir = make_cert_dir(tmp_path, [])
    config = make_config(cert_dir, valkey_url, [{"name": "alpha"}, {"name": "beta"}])

    async def main() -> tuple[list[object], grpc.aio.AioRpcError | None]:
        async with running_admission(config) as server:
            credentials = client_credentials_with_sans(cert_dir, sans)
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                return await collect_stream(InferenceStub(channel).Generate(chat_request()))

    responses, error = asyncio.run(main())

    assert responses == []
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_redis_outage_returns_unavailable(tmp_path: Path) -> None:
    tenant = unique_name()
    cert_dir = make_cert_dir(tmp_path, [tenant])
    valkey = ValkeyServer(tmp_path / "valkey", appendonly=False)
    valkey.start()
    config = make_config(cert_dir, valkey.url, [{"name": tenant}])

    async def main() -> tuple[grpc.aio.AioRpcError | None, grpc.aio.AioRpcError]:
        try:
            async with running_admission(config) as server:
                valkey.stop()
                channel, stub = tenant_stub(cert_dir, tenant, server.port)
                async with channel:
                    _, generate_error = await collect_stream(stub.Generate(chat_request()))
                    with pytest.raises(grpc.aio.AioRpcError) as usage_error:
                        await stub.GetUsage(inference_pb2.GetUsageRequest())
                    return generate_error, usage_error.value
        finally:
            valkey.stop()

    generate_error, usage_error = asyncio.run(main())

    assert generate_error is not None
    assert generate_error.code() == grpc.StatusCode.UNAVAILABLE
    assert generate_error.details().startswith("the quota store is unavailable")
    assert usage_error.code() == grpc.StatusCode.UNAVAILABLE


def test_invalid_request_ends_before_delta(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir = make_cert_dir(tmp_path, [tenant])
    config = make_config(cert_dir, valkey_url, [{"name": tenant}])

    async def main() -> tuple[list[object], grpc.aio.AioRpcError | None, int]:
        async with running_admission(config) as server:
            channel, stub = tenant_stub(cert_dir, tenant, server.port)
            async with channel:
                responses, error = await collect_stream(stub.Generate(chat_request(max_tokens=0)))
        client = redis_client(valkey_url)
        num_rate_entries = await client.zcard(rate_key(tenant))
        await client.aclose()
        return responses, error, num_rate_entries

    responses, error, num_rate_entries = asyncio.run(main())

    assert responses == []
    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "sampling.max_tokens: must be between 1 and 1024, got 0"
    assert num_rate_entries == 0


def test_prompt_over_context_rejected(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir = make_cert_dir(tmp_path, [tenant])
    config = make_config(cert_dir, valkey_url, [{"name": tenant}])
    # " hello" is one token, so the chat is well over 2048 tokens.
    request = chat_request(content="hello" + " hello" * 2100, max_tokens=1)

    async def main() -> grpc.aio.AioRpcError | None:
        async with running_admission(config) as server:
            channel, stub = tenant_stub(cert_dir, tenant, server.port)
            async with channel:
                _, error = await collect_stream(stub.Generate(request))
                return error

    error = asyncio.run(main())

    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("messages: ")
    assert "exceed the context of 2048 tokens" in error.details()


def test_rate_limit_rejection_names_limit(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir = make_cert_dir(tmp_path, [tenant])
    config = make_config(cert_dir, valkey_url, [{"name": tenant, "requests_per_minute": 2}])
    tenant_config = config.tenant(tenant)
    assert tenant_config is not None

    async def main() -> grpc.aio.AioRpcError | None:
        client = redis_client(valkey_url)
        await seed_tenants(client, [tenant_config])
        limiter = TenantLimiter(client)
        for request_id in ("earlier-1", "earlier-2"):
            assert (await limiter.admit(admission_request(tenant, request_id))).admitted
        await client.aclose()
        async with running_admission(config) as server:
            channel, stub = tenant_stub(cert_dir, tenant, server.port)
            async with channel:
                _, error = await collect_stream(stub.Generate(chat_request()))
                return error

    error = asyncio.run(main())

    assert error is not None
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"tenant '{tenant}' reached its limit requests_per_minute=2" in error.details()


def test_unreachable_scheduler_refunds_request(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir = make_cert_dir(tmp_path, [tenant])
    config = make_config(cert_dir, valkey_url, [{"name": tenant, "requests_per_minute": 1}])

    async def main() -> tuple[list[grpc.aio.AioRpcError | None], int, int, dict[bytes, bytes]]:
        errors = []
        async with running_admission(config) as server:
            channel, stub = tenant_stub(cert_dir, tenant, server.port)
            async with channel:
                # With requests_per_minute=1, the second request would be
                # rejected by the limit if the first had not been refunded.
                for _ in range(2):
                    _, error = await collect_stream(stub.Generate(chat_request()))
                    errors.append(error)
        client = redis_client(valkey_url)
        state = (await client.zcard(rate_key(tenant)), await client.zcard(streams_key(tenant)), await client.hgetall(usage_key(tenant)))
        await client.aclose()
        return errors, *state

    errors, num_rate_entries, num_leases, usage = asyncio.run(main())

    assert [error.code() if error else None for error in errors] == [grpc.StatusCode.UNAVAILABLE] * 2
    assert num_rate_entries == 0
    assert num_leases == 0
    assert usage == {}


def test_cancel_during_decision_undoes_admission(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir = make_cert_dir(tmp_path, [tenant])
    config = make_config(cert_dir, valkey_url, [{"name": tenant}])
    tenant_config = config.tenant(tenant)
    assert tenant_config is not None

    async def main() -> tuple[int, int]:
        client = redis_client(valkey_url)
        await seed_tenants(client, [tenant_config])
        limiter = TenantLimiter(client)
        servicer = InferenceServicer(config, default_tokenizer(), limiter, scheduler=None)
        admission = asyncio.create_task(servicer._admit(tenant_config, admission_request(tenant, "cancelled-early")))
        await asyncio.sleep(0)  # the decision is now in flight
        admission.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admission
        # Wait for the shielded decision and the release it triggers.
        while len(asyncio.all_tasks()) > 1:
            await asyncio.sleep(0.01)
        state = await client.zcard(rate_key(tenant)), await client.zcard(streams_key(tenant))
        await client.aclose()
        return state

    num_rate_entries, num_leases = asyncio.run(main())

    assert num_rate_entries == 0
    assert num_leases == 0


def test_start_without_redis_url_fails(tmp_path: Path) -> None:
    cert_dir = make_cert_dir(tmp_path, [])
    config = make_config(cert_dir, "", [{"name": "alpha"}])

    with pytest.raises(ConfigError, match="redis_url is empty"):
        asyncio.run(start_admission(config, listen="127.0.0.1:0"))


def test_process_exits_without_redis_url(tmp_path: Path) -> None:
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw.update(state_dir=str(tmp_path), redis_url="")
    raw["services"]["admission"].update(listen="127.0.0.1:0", metrics_port=0)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    environment = {"PATH": "/usr/bin:/bin", "TENANTSERVE_REDIS_URL": ""}

    completed = subprocess.run(
        [sys.executable, "-m", "services.admission", "--config", str(config_path)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )

    assert completed.returncode == 2
    assert "redis_url is empty" in completed.stderr
    assert "TENANTSERVE_REDIS_URL" in completed.stderr
