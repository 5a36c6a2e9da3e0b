"""Mutual TLS on every hop: who may call admission, the scheduler and the worker."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common import certs
from services.common.certs import ca_cert_path
from tenantserve.v1 import inference_pb2, inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

from .support import (
    UNCONFIGURED_TENANT,
    chat_request,
    credentials_from_files,
    generate,
    generate_error,
    inference_stub,
    open_channel,
    service_credentials,
    tenant_credentials,
)


def list_models_error(target: str, credentials: grpc.ChannelCredentials) -> grpc.RpcError:
    with open_channel(target, credentials) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
    return caught.value


def copy_ca(stack: Any, tmp_path: Path) -> Path:
    """Return a new certificate directory with the stack's CA, to issue extra tenant certificates."""
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    for name in ("ca.crt", "ca.key"):
        shutil.copy(stack.config.tls.cert_dir / name, cert_dir / name)
    return cert_dir


def test_client_without_certificate_fails(stack: Any) -> None:
    credentials = credentials_from_files(ca_cert_path(stack.config.tls.cert_dir), None, None)

    error = list_models_error(stack.config.admission.target, credentials)

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_other_ca_fails(stack: Any, tmp_path: Path) -> None:
    foreign_dir = tmp_path / "foreign"
    certs.create_ca(foreign_dir, common_name="foreign CA")
    cert_path, key_path = certs.add_tenant(foreign_dir, "alpha")
    credentials = credentials_from_files(ca_cert_path(stack.config.tls.cert_dir), cert_path, key_path)

    error = list_models_error(stack.config.admission.target, credentials)

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_expired_certificate_fails(stack: Any, tmp_path: Path) -> None:
    cert_dir = copy_ca(stack, tmp_path)
    now = dt.datetime.now(dt.timezone.utc)
    cert_path, key_path = certs.add_tenant(
        cert_dir, "alpha", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    credentials = credentials_from_files(ca_cert_path(cert_dir), cert_path, key_path)

    error = list_models_error(stack.config.admission.target, credentials)

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_unconfigured_tenant_denied(stack: Any) -> None:
    channel, stub = inference_stub(stack, UNCONFIGURED_TENANT)
    with channel:
        num_deltas, generate_failure = generate_error(stub, chat_request(max_tokens=4))
        with pytest.raises(grpc.RpcError) as usage_failure:
            stub.GetUsage(inference_pb2.GetUsageRequest(), timeout=10)

    assert num_deltas == 0
    assert generate_failure.code() == grpc.StatusCode.PERMISSION_DENIED
    assert generate_failure.details() == f"tenant '{UNCONFIGURED_TENANT}' is not configured"
    assert usage_failure.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_service_certificate_denied_at_admission(stack: Any) -> None:
    target = stack.config.admission.target
    with open_channel(target, service_credentials(stack.config.tls.cert_dir, "scheduler")) as channel:
        num_deltas, error = generate_error(inference_pb2_grpc.InferenceStub(channel), chat_request(max_tokens=4))

    assert num_deltas == 0
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_tenant_id_in_metadata_ignored(stack: Any) -> None:
    metadata = (("tenant-id", "alpha"), ("x-tenant-id", "alpha"), ("tenant_id", "alpha"))
    request = chat_request(max_tokens=4, client_request_id="alpha")
    probe_channel, probe = inference_stub(stack, "metadata-probe")
    alpha_channel, alpha = inference_stub(stack, "alpha")
    with probe_channel, alpha_channel:
        probe_before = probe.GetUsage(inference_pb2.GetUsageRequest(), timeout=10)
        alpha_before = alpha.GetUsage(inference_pb2.GetUsageRequest(), timeout=10)

        completion = generate(probe, request, metadata=metadata)
        probe_after = probe.GetUsage(inference_pb2.GetUsageRequest(), metadata=metadata, timeout=10)
        alpha_after = alpha.GetUsage(inference_pb2.GetUsageRequest(), timeout=10)

    assert probe_after.tenant_id == "metadata-probe"
    assert probe_after.num_requests == probe_before.num_requests + 1
    assert probe_after.prompt_tokens == probe_before.prompt_tokens + completion.result.usage.prompt_tokens
    assert probe_after.completion_tokens == probe_before.completion_tokens + completion.result.usage.completion_tokens
    assert alpha_after.num_requests == alpha_before.num_requests
    assert completion.result.client_request_id == "alpha"


def test_scheduler_rejects_tenant_certificate(stack: Any) -> None:
    credentials = tenant_credentials(stack.config.tls.cert_dir, "alpha")
    request = scheduler_pb2.ScheduleRequest(
        tenant_id="alpha", request_id="forged", model="smollm2-135m-instruct", prompt_token_ids=[1, 2, 3]
    )
    with open_channel(stack.config.scheduler.target, credentials) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(scheduler_pb2_grpc.SchedulerStub(channel).Schedule(request, timeout=10))

    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_worker_rejects_tenant_certificate(stack: Any) -> None:
    credentials = tenant_credentials(stack.config.tls.cert_dir, "alpha")
    request = worker_pb2.WorkerGenerateRequest(
        tenant_id="alpha", request_id="forged", model="smollm2-135m-instruct", prompt_token_ids=[1, 2, 3]
    )
    with open_channel(stack.config.worker_gpu.target, credentials) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        with pytest.raises(grpc.RpcError) as report_failure:
            stub.GetReport(worker_pb2.GetReportRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as generate_failure:
            list(stub.Generate(request, timeout=10))

    assert report_failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert generate_failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
