"""Certificate revocation: rejected on the next RPC, on open channels and on other replicas."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from pathlib import Path

import grpc
import pytest

from services.admission.revocation import REVOKED_KEY, normalize_fingerprint
from services.common import certs, tls
from services.common.valkey import redis_client
from tenantserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2

from .support import make_cert_dir, make_config, running_admission, tenant_stub

ADMIN = "ops"
FINGERPRINT = "ab" * 32


def unique_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def tenant_fingerprint(cert_dir: Path, tenant_id: str) -> str:
    cert_path, _ = certs.tenant_cert_paths(cert_dir, tenant_id)
    return certs.certificate_fingerprint(cert_path.read_bytes())


async def list_models_code(stub: object) -> grpc.StatusCode:
    try:
        await stub.ListModels(inference_pb2.ListModelsRequest())  # type: ignore[attr-defined]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (FINGERPRINT, FINGERPRINT),
        (FINGERPRINT.upper(), FINGERPRINT),
        (":".join(["AB"] * 32), FINGERPRINT),
        (f"  {FINGERPRINT}\n", FINGERPRINT),
    ],
)
def test_normalize_fingerprint_accepts_forms(text: str, expected: str) -> None:
    assert normalize_fingerprint(text) == expected


@pytest.mark.parametrize("text", ["", "ab" * 31, "ab" * 33, "zz" * 32, "ab" * 31 + "a-"])
def test_normalize_fingerprint_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="SHA-256 fingerprint"):
        normalize_fingerprint(text)


def test_revoked_certificate_rejected_on_open_channel(tmp_path: Path, valkey_url: str) -> None:
    tenant, other = unique_name(), unique_name()
    cert_dir = make_cert_dir(tmp_path, [tenant, other])
    certs.add_admin(cert_dir, ADMIN)
    config = make_config(cert_dir, valkey_url, [{"name": tenant}, {"name": other}])
    fingerprint = tenant_fingerprint(cert_dir, tenant)

    async def main() -> dict[str, object]:
        results: dict[str, object] = {}
        async with running_admission(config) as server:
            tenant_channel, tenant_inference = tenant_stub(cert_dir, tenant, server.port)
            other_channel, other_inference = tenant_stub(cert_dir, other, server.port)
            admin_channel = tls.secure_channel(f"127.0.0.1:{server.port}", tls.admin_channel_credentials(cert_dir, ADMIN))
            async with tenant_channel, other_channel, admin_channel:
                results["before"] = await list_models_code(tenant_inference)
                admin = admin_pb2_grpc.AdminStub(admin_channel)
                # The colon form that openssl prints is accepted.
                colon_form = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
                results["revoke"] = await admin.RevokeCertificate(
                    admin_pb2.RevokeCertificateRequest(fingerprint_sha256=colon_form)
                )
                results["again"] = await admin.RevokeCertificate(
                    admin_pb2.RevokeCertificateRequest(fingerprint_sha256=fingerprint)
                )
                try:
                    await tenant_inference.GetUsage(inference_pb2.GetUsageRequest())
                except grpc.aio.AioRpcError as error:
                    results["after"] = error
                results["other"] = await list_models_code(other_inference)
        client = redis_client(valkey_url)
        results["stored"] = await client.sismember(REVOKED_KEY, fingerprint)
        await client.aclose()
        return results

    results = asyncio.run(main())

    assert results["before"] == grpc.StatusCode.OK
    assert results["revoke"].fingerprint_sha256 == fingerprint
    assert not results["revoke"].already_revoked
    assert results["again"].already_revoked
    after = results["after"]
    assert isinstance(after, grpc.aio.AioRpcError)
    assert after.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in after.details()
    assert results["other"] == grpc.StatusCode.OK
    assert results["stored"]


def test_revocation_reaches_other_replica(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir = make_cert_dir(tmp_path, [tenant])
    base = make_config(cert_dir, valkey_url, [{"name": tenant}])
    # No local copy on this replica, so it sees the revocation on the very next RPC.
    config = dataclasses.replace(base, admission=dataclasses.replace(base.admission, revocation_cache_seconds=0.0))
    fingerprint = tenant_fingerprint(cert_dir, tenant)

    async def main() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        async with running_admission(config) as server:
            channel, inference = tenant_stub(cert_dir, tenant, server.port)
            async with channel:
                before = await list_models_code(inference)
                # Another replica's Revoke writes only to Redis.
                client = redis_client(valkey_url)
                await client.sadd(REVOKED_KEY, fingerprint)
                await client.aclose()
                after = await list_models_code(inference)
        return before, after

    before, after = asyncio.run(main())

    assert before == grpc.StatusCode.OK
    assert after == grpc.StatusCode.UNAUTHENTICATED


def test_revoked_admin_loses_admin_api(tmp_path: Path, valkey_url: str) -> None:
    cert_dir = make_cert_dir(tmp_path, [])
    certs.add_admin(cert_dir, ADMIN)
    config = make_config(cert_dir, valkey_url, [])
    admin_cert, _ = certs.admin_cert_paths(cert_dir, ADMIN)
    fingerprint = certs.certificate_fingerprint(admin_cert.read_bytes())

    async def main() -> grpc.aio.AioRpcError:
        async with running_admission(config) as server:
            credentials = tls.admin_channel_credentials(cert_dir, ADMIN)
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                admin = admin_pb2_grpc.AdminStub(channel)
                await admin.RevokeCertificate(admin_pb2.RevokeCertificateRequest(fingerprint_sha256=fingerprint))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await admin.ListTenants(admin_pb2.ListTenantsRequest())
                return caught.value

    error = asyncio.run(main())

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
