"""The Admin API in process: admin-only access, tenant changes that apply at once, certificates.

The config points the scheduler at a closed port, so a request that passes
admission ends with UNAVAILABLE from the scheduler hop. A request that
admission rejects ends with its own code.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from services.admission.tenant_limits import limits_key
from services.common import certs, tls
from services.common.valkey import redis_client
from tenantserve.v1 import admin_pb2, admin_pb2_grpc, common_pb2, inference_pb2
from tenantserve.v1.inference_pb2_grpc import InferenceStub

from .support import chat_request, collect_stream, make_cert_dir, make_config, running_admission, tenant_stub

ADMIN = "ops"


def unique_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def admin_cert_dir(tmp_path: Path, tenant_ids: list[str]) -> Path:
    cert_dir = make_cert_dir(tmp_path, tenant_ids)
    certs.add_admin(cert_dir, ADMIN)
    return cert_dir


def admin_stub(cert_dir: Path, port: int) -> tuple[grpc.aio.Channel, admin_pb2_grpc.AdminStub]:
    channel = tls.secure_channel(f"127.0.0.1:{port}", tls.admin_channel_credentials(cert_dir, ADMIN))
    return channel, admin_pb2_grpc.AdminStub(channel)


def update_request(name: str, paths: list[str], **values: Any) -> admin_pb2.UpdateTenantRequest:
    return admin_pb2.UpdateTenantRequest(
        tenant=admin_pb2.Tenant(name=name, **values), update_mask=field_mask_pb2.FieldMask(paths=paths)
    )


async def generate_code(stub: Any) -> grpc.StatusCode:
    """Send one Generate request and return the status code that ended it."""
    _, error = await collect_stream(stub.Generate(chat_request()))
    assert error is not None, "the scheduler port is closed, so every stream must end with an error"
    return error.code()


@pytest.mark.parametrize("caller", ["tenant", "service"])
def test_admin_rejects_non_admin_certificates(tmp_path: Path, valkey_url: str, caller: str) -> None:
    tenant = unique_name()
    cert_dir = admin_cert_dir(tmp_path, [tenant])
    config = make_config(cert_dir, valkey_url, [{"name": tenant}])
    if caller == "tenant":
        credentials = tls.tenant_channel_credentials(cert_dir, tenant)
    else:
        credentials = tls.service_channel_credentials(cert_dir, "scheduler")

    async def main() -> list[grpc.aio.AioRpcError]:
        errors = []
        async with running_admission(config) as server:
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                stub = admin_pb2_grpc.AdminStub(channel)
                calls = [
                    stub.ListTenants(admin_pb2.ListTenantsRequest()),
                    stub.DisableTenant(admin_pb2.DisableTenantRequest(name=tenant)),
                    stub.IssueCertificate(admin_pb2.IssueCertificateRequest(tenant_id=tenant)),
                ]
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call
                    errors.append(caught.value)
        return errors

    errors = asyncio.run(main())

    for error in errors:
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin certificate" in error.details()


def test_admin_certificate_rejected_by_inference(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir = admin_cert_dir(tmp_path, [tenant])
    config = make_config(cert_dir, valkey_url, [{"name": tenant}])

    async def main() -> tuple[grpc.aio.AioRpcError, grpc.StatusCode]:
        async with running_admission(config) as server:
            credentials = tls.admin_channel_credentials(cert_dir, ADMIN)
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                inference = InferenceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await inference.ListModels(inference_pb2.ListModelsRequest())
                return caught.value, await generate_code(inference)

    list_error, generate = asyncio.run(main())

    assert list_error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert generate == grpc.StatusCode.PERMISSION_DENIED


def test_admin_create_list_update_disable(tmp_path: Path, valkey_url: str) -> None:
    seeded, created = unique_name(), unique_name()
    cert_dir = admin_cert_dir(tmp_path, [seeded])
    config = make_config(cert_dir, valkey_url, [{"name": seeded, "requests_per_minute": 7}])
    new_tenant = admin_pb2.Tenant(
        name=created,
        weight=2.0,
        requests_per_minute=10,
        max_concurrent_streams=2,
        daily_token_budget=5000,
        allowed_models=["smollm2-135m-instruct"],
        allowed_service_classes=[common_pb2.SERVICE_CLASS_BATCH],
        service_class_overrides=[
            admin_pb2.ServiceClassOverride(service_class=common_pb2.SERVICE_CLASS_BATCH, limits={"max_tokens": 64})
        ],
    )

    async def main() -> dict[str, Any]:
        results: dict[str, Any] = {}
        async with running_admission(config) as server:
            channel, stub = admin_stub(cert_dir, server.port)
            async with channel:
                results["created"] = await stub.CreateTenant(admin_pb2.CreateTenantRequest(tenant=new_tenant))
                listed = await stub.ListTenants(admin_pb2.ListTenantsRequest())
                results["listed"] = {tenant.name: tenant for tenant in listed.tenants}
                results["updated"] = await stub.UpdateTenant(
                    update_request(created, ["requests_per_minute", "tokens_per_minute"], requests_per_minute=3, tokens_per_minute=900)
                )
                results["disabled"] = await stub.DisableTenant(admin_pb2.DisableTenantRequest(name=created))
                results["enabled"] = await stub.EnableTenant(admin_pb2.EnableTenantRequest(name=created))
        client = redis_client(valkey_url)
        results["stored"] = await client.hgetall(limits_key(created))
        await client.aclose()
        return results

    results = asyncio.run(main())

    created_tenant = results["created"]
    assert created_tenant.requests_per_minute == 10
    assert created_tenant.weight == 2.0
    assert list(created_tenant.allowed_service_classes) == [common_pb2.SERVICE_CLASS_BATCH]
    assert dict(created_tenant.service_class_overrides[0].limits) == {"max_tokens": 64}
    assert results["listed"][seeded].requests_per_minute == 7
    assert results["listed"][created].daily_token_budget == 5000
    updated = results["updated"]
    assert updated.requests_per_minute == 3
    assert updated.tokens_per_minute == 900
    assert updated.max_concurrent_streams == 2
    assert updated.version > created_tenant.version
    assert results["disabled"].disabled
    assert not results["enabled"].disabled
    assert results["stored"][b"requests_per_minute"] == b"3"
    assert results["stored"][b"disabled"] == b"0"


def test_admin_reports_invalid_requests(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir = admin_cert_dir(tmp_path, [tenant])
    config = make_config(cert_dir, valkey_url, [{"name": tenant}])

    async def main() -> dict[str, grpc.aio.AioRpcError]:
        errors = {}
        async with running_admission(config) as server:
            channel, stub = admin_stub(cert_dir, server.port)
            async with channel:
                calls = {
                    "create existing": stub.CreateTenant(
                        admin_pb2.CreateTenantRequest(
                            tenant=admin_pb2.Tenant(name=tenant, weight=1, requests_per_minute=1, max_concurrent_streams=1)
                        )
                    ),
                    "create invalid name": stub.CreateTenant(
                        admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(name="Bad Name"))
                    ),
                    "create zero rate": stub.CreateTenant(
                        admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(name=unique_name(), weight=1, max_concurrent_streams=1))
                    ),
                    "empty mask": stub.UpdateTenant(update_request(tenant, [])),
                    "read-only mask": stub.UpdateTenant(update_request(tenant, ["version"], version=9)),
                    "update unknown": stub.UpdateTenant(update_request(unique_name(), ["max_tokens"], max_tokens=5)),
                    "disable unknown": stub.DisableTenant(admin_pb2.DisableTenantRequest(name=unique_name())),
                    "issue unknown": stub.IssueCertificate(admin_pb2.IssueCertificateRequest(tenant_id=unique_name())),
                    "issue too long": stub.IssueCertificate(
                        admin_pb2.IssueCertificateRequest(tenant_id=tenant, valid_days=100_000)
                    ),
                    "bad fingerprint": stub.RevokeCertificate(admin_pb2.RevokeCertificateRequest(fingerprint_sha256="abc")),
                }
                for label, call in calls.items():
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call
                    errors[label] = caught.value
        return errors

    errors = asyncio.run(main())

    expected = {
        "create existing": grpc.StatusCode.ALREADY_EXISTS,
        "create invalid name": grpc.StatusCode.INVALID_ARGUMENT,
        "create zero rate": grpc.StatusCode.INVALID_ARGUMENT,
        "empty mask": grpc.StatusCode.INVALID_ARGUMENT,
        "read-only mask": grpc.StatusCode.INVALID_ARGUMENT,
        "update unknown": grpc.StatusCode.NOT_FOUND,
        "disable unknown": grpc.StatusCode.NOT_FOUND,
        "issue unknown": grpc.StatusCode.NOT_FOUND,
        "issue too long": grpc.StatusCode.INVALID_ARGUMENT,
        "bad fingerprint": grpc.StatusCode.INVALID_ARGUMENT,
    }
    for label, code in expected.items():
        assert errors[label].code() == code, f"{label}: {errors[label].details()}"
    assert "requests_per_minute" in errors["create zero rate"].details()
    assert errors["empty mask"].details().startswith("update_mask")


def test_limit_change_applies_to_next_request(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir = admin_cert_dir(tmp_path, [tenant])
    config = make_config(cert_dir, valkey_url, [{"name": tenant, "requests_per_minute": 1}])

    async def main() -> list[grpc.StatusCode]:
        codes = []
        async with running_admission(config) as server:
            admin_channel, admin = admin_stub(cert_dir, server.port)
            tenant_channel, inference = tenant_stub(cert_dir, tenant, server.port)
            async with admin_channel, tenant_channel:
                codes.append(await generate_code(inference))
                # chat_request() asks for max_tokens 8.
                await admin.UpdateTenant(update_request(tenant, ["max_tokens"], max_tokens=4))
                codes.append(await generate_code(inference))
                await admin.UpdateTenant(update_request(tenant, ["max_tokens"], max_tokens=8))
                codes.append(await generate_code(inference))
                await admin.UpdateTenant(update_request(tenant, ["disabled"], disabled=True))
                codes.append(await generate_code(inference))
                await admin.EnableTenant(admin_pb2.EnableTenantRequest(name=tenant))
                codes.append(await generate_code(inference))
                await admin.UpdateTenant(update_request(tenant, ["allowed_models"], allowed_models=["other-model"]))
                codes.append(await generate_code(inference))
        return codes

    codes = asyncio.run(main())

    assert codes == [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.PERMISSION_DENIED,
    ]


def test_issued_certificate_calls_inference(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir = admin_cert_dir(tmp_path, [])
    config = make_config(cert_dir, valkey_url, [{"name": tenant}])

    async def main() -> tuple[admin_pb2.IssueCertificateResponse, inference_pb2.GetUsageResponse]:
        async with running_admission(config) as server:
            channel, stub = admin_stub(cert_dir, server.port)
            async with channel:
                issued = await stub.IssueCertificate(admin_pb2.IssueCertificateRequest(tenant_id=tenant, valid_days=2))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=certs.ca_cert_path(cert_dir).read_bytes(),
                private_key=issued.private_key_pem.encode(),
                certificate_chain=issued.certificate_pem.encode(),
            )
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as tenant_channel:
                usage = await InferenceStub(tenant_channel).GetUsage(inference_pb2.GetUsageRequest())
        return issued, usage

    issued, usage = asyncio.run(main())

    assert usage.tenant_id == tenant
    assert issued.fingerprint_sha256 == certs.certificate_fingerprint(issued.certificate_pem.encode())
    assert not (cert_dir / "tenants" / f"{tenant}.key").exists()
