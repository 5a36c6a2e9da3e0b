"""start_server over real mutual TLS: client certificates, peer kinds, health and reflection."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import certs, tls
from services.common.grpc_server import start_server
from services.common.identity import PeerKind
from tenantserve.v1 import scheduler_pb2, worker_pb2, worker_pb2_grpc
from tests.common.support import (
    ECHO_STREAM_METHOD,
    JOIN_METHOD,
    TEST_WORKER_ID,
    WHOAMI_METHOD,
    WORKER_SERVICE,
    make_cert_dir,
    register_test_services,
    running_server,
)

# A deadline for each call, so that a server that never replies fails the test instead of hanging it.
CALL_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cert_dir(tmp_path_factory.mktemp("tls"))


async def check_health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT)
    return response.status


async def get_report(channel: grpc.aio.Channel) -> scheduler_pb2.WorkerReport:
    stub = worker_pb2_grpc.WorkerStub(channel)
    return await stub.GetReport(worker_pb2.GetReportRequest(), timeout=CALL_TIMEOUT)


async def generate_texts(channel: grpc.aio.Channel) -> list[str]:
    stub = worker_pb2_grpc.WorkerStub(channel)
    call = stub.Generate(worker_pb2.WorkerGenerateRequest(), timeout=CALL_TIMEOUT)
    return [response.delta.text async for response in call]


async def whoami_call(channel: grpc.aio.Channel) -> bytes:
    return await channel.unary_unary(WHOAMI_METHOD)(b"", timeout=CALL_TIMEOUT)


async def echo_stream_call(channel: grpc.aio.Channel, messages: list[bytes]) -> list[bytes]:
    call = channel.stream_stream(ECHO_STREAM_METHOD)(iter(messages), timeout=CALL_TIMEOUT)
    return [response async for response in call]


async def join_call(channel: grpc.aio.Channel, messages: list[bytes]) -> bytes:
    return await channel.stream_unary(JOIN_METHOD)(iter(messages), timeout=CALL_TIMEOUT)


def test_service_certificate_passes(cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_server(cert_dir) as server:
            credentials = tls.service_channel_credentials(cert_dir, "scheduler")
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                report = await get_report(channel)
                generated = await generate_texts(channel)
                identity = await whoami_call(channel)

        assert report.worker_id == TEST_WORKER_ID
        assert generated == ["Hello", " world"]
        assert identity == b"service:scheduler"

    asyncio.run(scenario())


def test_service_certificate_passes_client_streaming(cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_server(cert_dir) as server:
            credentials = tls.service_channel_credentials(cert_dir, "scheduler")
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                echoed = await echo_stream_call(channel, [b"a", b"b", b"c"])
                joined = await join_call(channel, [b"a", b"b", b"c"])

        assert echoed == [b"a", b"b", b"c"]
        assert joined == b"abc"

    asyncio.run(scenario())


def test_tenant_rejected_on_client_streaming(cert_dir: Path) -> None:
    # The calls send no request before the status arrives. In grpcio 1.85 an
    # asyncio client whose write races with the server's early status may
    # report INTERNAL "Internal error from Core" in place of that status.
    async def scenario() -> None:
        async with running_server(cert_dir) as server:
            credentials = tls.tenant_channel_credentials(cert_dir, "alpha")
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                bidirectional_call = channel.stream_stream(ECHO_STREAM_METHOD)(timeout=CALL_TIMEOUT)
                with pytest.raises(grpc.aio.AioRpcError) as bidirectional:
                    await bidirectional_call.read()
                client_streaming_call = channel.stream_unary(JOIN_METHOD)(timeout=CALL_TIMEOUT)
                with pytest.raises(grpc.aio.AioRpcError) as client_streaming:
                    await client_streaming_call

        assert bidirectional.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert client_streaming.value.code() == grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(scenario())


def test_health_reports_every_service_serving(cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_server(cert_dir) as server:
            credentials = tls.service_channel_credentials(cert_dir, "scheduler")
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                overall = await check_health(channel)
                worker = await check_health(channel, WORKER_SERVICE)

        assert overall == health_pb2.HealthCheckResponse.SERVING
        assert worker == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(scenario())


def test_tenant_rejected_by_internal_service(cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_server(cert_dir) as server:
            credentials = tls.tenant_channel_credentials(cert_dir, "alpha")
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as unary:
                    await get_report(channel)
                with pytest.raises(grpc.aio.AioRpcError) as streaming:
                    await generate_texts(channel)
                with pytest.raises(grpc.aio.AioRpcError) as generic:
                    await whoami_call(channel)

        assert unary.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "service certificate is required" in unary.value.details()
        assert streaming.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert generic.value.code() == grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(scenario())


def test_tenant_reaches_health_and_reflection(cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_server(cert_dir) as server:
            credentials = tls.tenant_channel_credentials(cert_dir, "alpha")
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                status = await check_health(channel)
                services = await list_services(channel)

        assert status == health_pb2.HealthCheckResponse.SERVING
        assert WORKER_SERVICE in services
        assert "grpc.health.v1.Health" in services

    asyncio.run(scenario())


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=CALL_TIMEOUT)]
    return [service.name for service in responses[0].list_services_response.service]


def test_tenant_passes_without_peer_check(cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_server(cert_dir, allowed_peer=None, service_name="admission") as server:
            credentials = tls.tenant_channel_credentials(cert_dir, "alpha")
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                identity = await whoami_call(channel)
                report = await get_report(channel)

        assert identity == b"tenant:alpha"
        assert report.worker_id == TEST_WORKER_ID

    asyncio.run(scenario())


def test_service_rejected_by_tenant_only_server(cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_server(cert_dir, allowed_peer=PeerKind.TENANT, service_name="admission") as server:
            credentials = tls.service_channel_credentials(cert_dir, "scheduler")
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await whoami_call(channel)

        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "tenant certificate is required" in raised.value.details()

    asyncio.run(scenario())


def test_client_without_certificate_fails(cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_server(cert_dir) as server:
            credentials = grpc.ssl_channel_credentials(root_certificates=(cert_dir / "ca.crt").read_bytes())
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await check_health(channel)

        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_client_from_foreign_ca_fails(cert_dir: Path, tmp_path: Path) -> None:
    foreign_dir = tmp_path / "foreign"
    certs.create_ca(foreign_dir)
    foreign_cert, foreign_key = certs.add_tenant(foreign_dir, "alpha")

    async def scenario() -> None:
        async with running_server(cert_dir) as server:
            # Trusts our CA for the server but presents a certificate from the foreign CA.
            credentials = grpc.ssl_channel_credentials(
                root_certificates=(cert_dir / "ca.crt").read_bytes(),
                private_key=foreign_key.read_bytes(),
                certificate_chain=foreign_cert.read_bytes(),
            )
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await check_health(channel)

        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_expired_client_certificate_fails(cert_dir: Path) -> None:
    expired_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    certs.add_tenant(cert_dir, "expired", not_before=expired_at - dt.timedelta(days=30), not_after=expired_at)

    async def scenario() -> None:
        async with running_server(cert_dir, allowed_peer=None) as server:
            credentials = tls.tenant_channel_credentials(cert_dir, "expired")
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await check_health(channel)

        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_server_from_foreign_ca_fails(cert_dir: Path, tmp_path: Path) -> None:
    foreign_dir = tmp_path / "foreign"
    certs.init_certs(foreign_dir, ["localhost", "127.0.0.1"])

    async def scenario() -> None:
        async with running_server(foreign_dir) as server:
            credentials = tls.service_channel_credentials(cert_dir, "scheduler")
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await check_health(channel)

        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_server_name_override(tmp_path: Path) -> None:
    # The certificates name only "localhost" and the service names, not 127.0.0.1.
    cert_dir = make_cert_dir(tmp_path, hosts=["localhost"])

    async def scenario() -> None:
        async with running_server(cert_dir) as server:
            credentials = tls.service_channel_credentials(cert_dir, "scheduler")
            target = f"127.0.0.1:{server.port}"
            async with tls.secure_channel(target, credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await check_health(channel)
            async with tls.secure_channel(target, credentials, server_name="worker-gpu") as channel:
                status = await check_health(channel)

        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(scenario())


def test_insecure_connection_has_no_peer() -> None:
    async def scenario() -> bytes:
        server = grpc.aio.server()
        register_test_services(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await whoami_call(channel)
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == b"none"


def test_start_server_port_in_use_fails(cert_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def scenario() -> None:
            with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
                await start_server("worker-gpu", f"127.0.0.1:{port}", cert_dir, register_test_services)

        asyncio.run(scenario())


def test_second_server_on_same_port_fails(cert_dir: Path) -> None:
    async def scenario() -> None:
        async with running_server(cert_dir) as server:
            with pytest.raises(RuntimeError, match="failed to bind"):
                await start_server("worker-gpu", f"127.0.0.1:{server.port}", cert_dir, register_test_services)

    asyncio.run(scenario())


def test_missing_service_certificate_fails(tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(FileNotFoundError, match="tenantserve certs init"):
            await start_server("worker-gpu", "127.0.0.1:0", tmp_path, register_test_services)

    asyncio.run(scenario())
