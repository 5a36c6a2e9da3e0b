"""Factories for the admission tests: configs, an in-process server and tenant clients."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.admission.server import AdmissionServer, start_admission
from services.admission.tokenization import PromptTokenizer
from services.common import certs, tls
from services.common.config import DEFAULT_CONFIG_PATH, Config, parse_config
from tenantserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

MODEL = "smollm2-135m-instruct"
TEST_HOSTS = ("localhost", "127.0.0.1")


def closed_port() -> int:
    """Return a loopback port that nothing listens on a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_config(
    cert_dir: Path, redis_url: str, tenants: Sequence[dict[str, Any]], scheduler_address: str = ""
) -> Config:
    """Build a config from the default one with the given tenants.

    The scheduler address defaults to a closed loopback port, so a request
    that passes admission fails with UNAVAILABLE at the scheduler.
    """
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["tls"]["cert_dir"] = str(cert_dir)
    raw["redis_url"] = redis_url
    raw["tenants"] = list(tenants)
    raw["services"]["scheduler"]["listen"] = scheduler_address or f"127.0.0.1:{closed_port()}"
    return parse_config(raw, environ={})


def make_cert_dir(tmp_path: Path, tenant_ids: Sequence[str]) -> Path:
    cert_dir = tmp_path / "certs"
    certs.init_certs(cert_dir, TEST_HOSTS)
    for tenant_id in tenant_ids:
        certs.add_tenant(cert_dir, tenant_id)
    return cert_dir


@functools.cache
def default_tokenizer() -> PromptTokenizer:
    """Load the default model's tokenizer once per test session (it takes seconds)."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    return PromptTokenizer.load(parse_config(raw, environ={}))


@contextlib.asynccontextmanager
async def running_admission(config: Config, lease_ttl_seconds: float = 30.0) -> AsyncIterator[AdmissionServer]:
    server = await start_admission(
        config, listen="127.0.0.1:0", tokenizer=default_tokenizer(), lease_ttl_seconds=lease_ttl_seconds
    )
    try:
        yield server
    finally:
        await server.stop(None)


def tenant_stub(cert_dir: Path, tenant_id: str, port: int) -> tuple[grpc.aio.Channel, inference_pb2_grpc.InferenceStub]:
    channel = tls.secure_channel(f"127.0.0.1:{port}", tls.tenant_channel_credentials(cert_dir, tenant_id))
    return channel, inference_pb2_grpc.InferenceStub(channel)


def client_credentials_with_sans(cert_dir: Path, sans: Sequence[x509.GeneralName]) -> grpc.ChannelCredentials:
    """Issue a client certificate from the test CA carrying exactly ``sans`` and return credentials for it."""
    ca_certificate, ca_key = certs.load_ca(cert_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test client")]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca_cert_path(cert_dir).read_bytes(),
        private_key=key_pem,
        certificate_chain=certificate.public_bytes(serialization.Encoding.PEM),
    )


def service_stub(cert_dir: Path, service_name: str, port: int) -> tuple[grpc.aio.Channel, inference_pb2_grpc.InferenceStub]:
    channel = tls.secure_channel(f"127.0.0.1:{port}", tls.service_channel_credentials(cert_dir, service_name))
    return channel, inference_pb2_grpc.InferenceStub(channel)


def chat_request(content: str = "What is the capital of France?", max_tokens: int = 8, **sampling: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=MODEL,
        messages=inference_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)]
        ),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **sampling),
    )


async def collect_stream(call: Any) -> tuple[list[common_pb2.GenerateResponse], grpc.aio.AioRpcError | None]:
    """Read a Generate call to its end; return the responses and the error that ended it, if any."""
    responses = []
    try:
        async for response in call:
            responses.append(response)
    except grpc.aio.AioRpcError as error:
        return responses, error
    return responses, None
