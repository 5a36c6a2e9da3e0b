"""Factories shared by the tests of services.common: certificates and small TLS servers."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.common import certs
from services.common.grpc_server import RunningServer, start_server
from services.common.identity import PeerKind, peer_from_context
from tenantserve.v1 import common_pb2, scheduler_pb2, worker_pb2_grpc

TEST_HOSTS = ("localhost", "127.0.0.1")
WORKER_SERVICE = "tenantserve.v1.Worker"
TEST_WORKER_ID = "test-worker"
WHOAMI_METHOD = "/tenantserve.test.Identity/WhoAmI"
# Bidirectional and client-streaming methods: they reply with the received
# messages joined into one (client-streaming) or echoed one by one (bidirectional).
ECHO_STREAM_METHOD = "/tenantserve.test.Identity/EchoStream"
JOIN_METHOD = "/tenantserve.test.Identity/Join"


def make_cert_dir(tmp_path: Path, hosts: Sequence[str] = TEST_HOSTS) -> Path:
    """Create a CA, the service certificates and a certificate for tenant "alpha"."""
    cert_dir = tmp_path / "certs"
    certs.init_certs(cert_dir, hosts)
    certs.add_tenant(cert_dir, "alpha")
    return cert_dir


def certificate_with_sans(sans: Sequence[x509.GeneralName]) -> x509.Certificate:
    """Build a self-signed certificate carrying exactly ``sans`` (no SAN extension when empty)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(key, hashes.SHA256())


class ReportingWorker(worker_pb2_grpc.WorkerServicer):
    """A Worker servicer with a fixed report and a two-message Generate stream."""

    async def GetReport(self, request: object, context: grpc.aio.ServicerContext) -> scheduler_pb2.WorkerReport:
        return scheduler_pb2.WorkerReport(worker_id=TEST_WORKER_ID)

    async def Generate(  # type: ignore[override]
        self, request: object, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        for text in ("Hello", " world"):
            yield common_pb2.GenerateResponse(delta=common_pb2.TextDelta(text=text))


async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Return "<kind>:<name>" of the caller, or "none"."""
    peer = peer_from_context(context)
    if peer is None:
        return b"none"
    return f"{peer.kind.value}:{peer.name}".encode()


async def echo_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def join(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    return b"".join([request async for request in requests])


def register_test_services(server: grpc.aio.Server) -> list[str]:
    worker_pb2_grpc.add_WorkerServicer_to_server(ReportingWorker(), server)
    identity_handler = grpc.method_handlers_generic_handler(
        "tenantserve.test.Identity",
        {
            "WhoAmI": grpc.unary_unary_rpc_method_handler(whoami),
            "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream),
            "Join": grpc.stream_unary_rpc_method_handler(join),
        },
    )
    server.add_generic_rpc_handlers((identity_handler,))
    return [WORKER_SERVICE]


@contextlib.asynccontextmanager
async def running_server(
    cert_dir: Path, allowed_peer: PeerKind | None = PeerKind.SERVICE, service_name: str = "worker-gpu"
) -> AsyncIterator[RunningServer]:
    """Run a start_server server with the test services on a free loopback port."""
    server = await start_server(
        service_name, "127.0.0.1:0", cert_dir, register_test_services, allowed_peer=allowed_peer
    )
    try:
        yield server
    finally:
        await server.stop(None)
