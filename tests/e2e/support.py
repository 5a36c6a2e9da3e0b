"""Clients and probes for the end-to-end tests against a running stack.

The tests use synchronous gRPC clients, and threads or several open calls
where requests must overlap.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.common import tls
from services.common.certs import ca_cert_path, service_cert_paths, tenant_cert_paths
from tenantserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

# Tenants of the end-to-end stack. ratelimited and narrow have small limits
# so that the limit tests can fill them with 50 requests.
E2E_TENANTS: list[dict[str, Any]] = [
    {"name": "alpha"},
    {"name": "beta"},
    {"name": "gamma"},
    {"name": "ratelimited", "requests_per_minute": 20, "max_concurrent_streams": 64},
    {"name": "narrow", "requests_per_minute": 600, "max_concurrent_streams": 5},
    {"name": "canceller"},
    {"name": "metadata-probe"},
]
# Has a certificate from the stack's CA but no entry in the config.
UNCONFIGURED_TENANT = "mallory"

E2E_OVERRIDES: dict[str, Any] = {
    "tenants": E2E_TENANTS,
    # 768 blocks of 16 tokens hold 12288 tokens: enough for the largest test
    # (5 streams of up to 1024 completion tokens) without a 2048-block cache
    # in the memory of a small test machine.
    "services": {"worker_gpu": {"num_kv_blocks": 768}},
}

MODEL = "smollm2-135m-instruct"
# Generous bound on one Generate call of the tests on a loaded CPU.
CALL_TIMEOUT_SECONDS = 180.0
FINISHED_REASONS = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP_STRING)


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    num_deltas: int
    result: common_pb2.GenerateResult


def credentials_from_files(ca_path: Path, cert_path: Path | None, key_path: Path | None) -> grpc.ChannelCredentials:
    """Build client credentials; without a certificate and key the client presents none."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_path.read_bytes(),
        private_key=key_path.read_bytes() if key_path else None,
        certificate_chain=cert_path.read_bytes() if cert_path else None,
    )


def tenant_credentials(cert_dir: Path, tenant_id: str) -> grpc.ChannelCredentials:
    cert_path, key_path = tenant_cert_paths(cert_dir, tenant_id)
    return credentials_from_files(ca_cert_path(cert_dir), cert_path, key_path)


def service_credentials(cert_dir: Path, service_name: str) -> grpc.ChannelCredentials:
    cert_path, key_path = service_cert_paths(cert_dir, service_name)
    return credentials_from_files(ca_cert_path(cert_dir), cert_path, key_path)


def open_channel(target: str, credentials: grpc.ChannelCredentials) -> grpc.Channel:
    return grpc.secure_channel(target, credentials, options=list(tls.CHANNEL_OPTIONS))


def inference_stub(stack: Any, tenant_id: str) -> tuple[grpc.Channel, inference_pb2_grpc.InferenceStub]:
    """Open a channel to admission with the tenant's certificate; the caller closes it."""
    channel = open_channel(stack.config.admission.target, tenant_credentials(stack.config.tls.cert_dir, tenant_id))
    return channel, inference_pb2_grpc.InferenceStub(channel)


def chat_request(
    content: str = "What is the capital of France?",
    max_tokens: int = 16,
    temperature: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    client_request_id: str = "",
) -> inference_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=list(stop))
    if seed is not None:
        sampling.seed = seed
    return inference_pb2.GenerateRequest(
        model=MODEL,
        messages=inference_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)]
        ),
        sampling=sampling,
        client_request_id=client_request_id,
    )


def read_completion(responses: Any) -> Completion:
    """Read a Generate stream to its result; raises grpc.RpcError when the stream fails."""
    pieces: list[str] = []
    token_ids: list[int] = []
    num_deltas = 0
    for response in responses:
        if response.HasField("result"):
            return Completion("".join(pieces), token_ids, num_deltas, response.result)
        num_deltas += 1
        pieces.append(response.delta.text)
        token_ids.extend(response.delta.token_ids)
    raise AssertionError(f"the stream ended without a result after {num_deltas} deltas")


def generate(stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.GenerateRequest, **kwargs: Any) -> Completion:
    return read_completion(stub.Generate(request, timeout=CALL_TIMEOUT_SECONDS, **kwargs))


def generate_error(stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.GenerateRequest) -> tuple[int, grpc.RpcError]:
    """Send a request that must fail; return the deltas received before the error and the error."""
    num_deltas = 0
    try:
        for response in stub.Generate(request, timeout=CALL_TIMEOUT_SECONDS):
            if response.HasField("result"):
                raise AssertionError(f"expected an error, got a result: {response.result}")
            num_deltas += 1
    except grpc.RpcError as error:
        return num_deltas, error
    raise AssertionError("the stream ended without a result or an error")


def health_status(stack: Any, section: str) -> int:
    """Return the overall gRPC health status of one service of the stack."""
    target = getattr(stack.config, section).target
    with open_channel(target, service_credentials(stack.config.tls.cert_dir, "admission")) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status


def scrape_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of a /metrics endpoint keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric_value(port: int, name: str, **labels: str) -> float:
    """Return one sample's value, or 0 when the endpoint does not have it yet."""
    return scrape_metrics(port).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(condition: Callable[[], bool], description: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` every 50 ms until it holds; fail with ``description`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting until {description}")
        time.sleep(0.05)
