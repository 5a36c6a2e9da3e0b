"""Server certificates rotate without a restart: new connections see the new files."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import certs, tls
from services.common.grpc_server import start_server
from services.common.tls import CertificateReloader

from .support import TEST_HOSTS, make_cert_dir, running_server

SERVICE = "worker-gpu"
PEER_ADDRESS_METHOD = "/tenantserve.test.Peer/Address"
# Short enough that a test can wait for it: gRPC adds up to 10 % jitter.
SHORT_CONNECTION_AGE_OPTIONS = (("grpc.max_connection_age_ms", 200), ("grpc.max_connection_age_grace_ms", 200))


def presented_fingerprint(cert_dir: Path, port: int) -> str:
    """Open a fresh TLS connection as a service and return the SHA-256 fingerprint of the server's certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs.ca_cert_path(cert_dir)))
    cert_path, key_path = certs.service_cert_paths(cert_dir, "scheduler")
    context.load_cert_chain(cert_path, key_path)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
    return certs.certificate_fingerprint(ssl.DER_cert_to_PEM_cert(der).encode())


def file_fingerprint(cert_dir: Path) -> str:
    cert_path, _ = certs.service_cert_paths(cert_dir, SERVICE)
    return certs.certificate_fingerprint(cert_path.read_bytes())


def rotate_service_certificate(cert_dir: Path, scratch_dir: Path) -> None:
    """Issue a new certificate and key for SERVICE from the same CA and move them over the old files."""
    scratch_dir.mkdir()
    shutil.copy(certs.ca_cert_path(cert_dir), scratch_dir / certs.CA_CERT_FILE)
    shutil.copy(cert_dir / certs.CA_KEY_FILE, scratch_dir / certs.CA_KEY_FILE)
    certs.init_certs(scratch_dir, TEST_HOSTS, service_names=[SERVICE])
    new_cert, new_key = certs.service_cert_paths(scratch_dir, SERVICE)
    old_cert, old_key = certs.service_cert_paths(cert_dir, SERVICE)
    os.replace(new_key, old_key)
    os.replace(new_cert, old_cert)


async def check_health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status


def test_new_connection_sees_rotated_certificate(tmp_path: Path) -> None:
    cert_dir = make_cert_dir(tmp_path)
    old_fingerprint = file_fingerprint(cert_dir)

    async def main() -> tuple[str, str, int, int]:
        async with running_server(cert_dir) as server:
            before = await asyncio.to_thread(presented_fingerprint, cert_dir, server.port)
            open_channel = tls.secure_channel(
                f"127.0.0.1:{server.port}", tls.service_channel_credentials(cert_dir, "scheduler"), server_name="localhost"
            )
            async with open_channel:
                await check_health(open_channel)
                rotate_service_certificate(cert_dir, tmp_path / "scratch")
                after = await asyncio.to_thread(presented_fingerprint, cert_dir, server.port)
                status_on_open_channel = await check_health(open_channel)
            new_channel = tls.secure_channel(
                f"127.0.0.1:{server.port}", tls.service_channel_credentials(cert_dir, "scheduler"), server_name="localhost"
            )
            async with new_channel:
                status_on_new_channel = await check_health(new_channel)
        return before, after, status_on_open_channel, status_on_new_channel

    before, after, status_on_open_channel, status_on_new_channel = asyncio.run(main())

    assert before == old_fingerprint
    assert after == file_fingerprint(cert_dir)
    assert after != old_fingerprint
    assert status_on_open_channel == health_pb2.HealthCheckResponse.SERVING
    assert status_on_new_channel == health_pb2.HealthCheckResponse.SERVING


def test_reloader_keeps_pair_until_key_matches(tmp_path: Path) -> None:
    cert_dir = make_cert_dir(tmp_path)
    reloader = CertificateReloader(cert_dir, SERVICE)
    reloader.initial_configuration()
    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    shutil.copy(certs.ca_cert_path(cert_dir), scratch_dir / certs.CA_CERT_FILE)
    shutil.copy(cert_dir / certs.CA_KEY_FILE, scratch_dir / certs.CA_KEY_FILE)
    certs.init_certs(scratch_dir, TEST_HOSTS, service_names=[SERVICE])
    new_cert, new_key = certs.service_cert_paths(scratch_dir, SERVICE)
    old_cert, old_key = certs.service_cert_paths(cert_dir, SERVICE)

    unchanged = reloader.fetch()
    os.replace(new_cert, old_cert)
    certificate_without_key = reloader.fetch()
    os.replace(new_key, old_key)
    matching_pair = reloader.fetch()
    after_reload = reloader.fetch()

    assert unchanged is None
    assert certificate_without_key is None
    assert matching_pair is not None
    assert after_reload is None


async def peer_address(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Return the client's address and port, which differ between two connections."""
    return context.peer().encode()


def register_peer_address(server: grpc.aio.Server) -> list[str]:
    handler = grpc.method_handlers_generic_handler(
        "tenantserve.test.Peer", {"Address": grpc.unary_unary_rpc_method_handler(peer_address)}
    )
    server.add_generic_rpc_handlers((handler,))
    return []


def test_max_connection_age_reconnects_channel(tmp_path: Path) -> None:
    cert_dir = make_cert_dir(tmp_path)

    async def main() -> tuple[bytes, bytes]:
        server = await start_server(
            SERVICE,
            "127.0.0.1:0",
            cert_dir,
            register_peer_address,
            allowed_peer=None,
            extra_options=SHORT_CONNECTION_AGE_OPTIONS,
        )
        try:
            credentials = tls.service_channel_credentials(cert_dir, "scheduler")
            async with tls.secure_channel(f"127.0.0.1:{server.port}", credentials, server_name="localhost") as channel:
                call = channel.unary_unary(PEER_ADDRESS_METHOD)
                first = await call(b"", timeout=10)
                # Well past the age plus grace, so the server has closed the connection.
                await asyncio.sleep(1.0)
                second = await call(b"", timeout=10, wait_for_ready=True)
        finally:
            await server.stop(None)
        return first, second

    first, second = asyncio.run(main())

    assert first.startswith(b"ipv4:127.0.0.1:")
    assert second != first
