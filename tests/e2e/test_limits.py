"""Tenant limits, cancellation and deadlines through the whole stack."""

from __future__ import annotations

import itertools
from typing import Any

import grpc
import pytest

from tenantserve.v1 import inference_pb2

from .support import (
    CALL_TIMEOUT_SECONDS,
    FINISHED_REASONS,
    chat_request,
    generate,
    inference_stub,
    metric_value,
    read_completion,
    wait_until,
)

NUM_BURST_REQUESTS = 50
RUNNING_REQUESTS = "tenantserve_worker_gpu_running_requests"
ABORTED_REQUESTS = "tenantserve_worker_gpu_aborted_requests_total"
ADMISSION_REQUESTS = "tenantserve_admission_requests_total"


def long_request(seed: int) -> inference_pb2.GenerateRequest:
    """A request that streams for many seconds: at temperature 2 the model almost never samples its end token."""
    return chat_request("Tell me a very long story about dragons.", max_tokens=1024, temperature=2.0, seed=seed)


def num_active_streams(stub: Any) -> int:
    return stub.GetUsage(inference_pb2.GetUsageRequest(), timeout=10).num_active_streams


def test_rate_limit_exact_for_burst(stack: Any) -> None:
    channel, stub = inference_stub(stack, "ratelimited")
    with channel:
        # Every call is sent before any response is read.
        calls = [stub.Generate(chat_request("Say hi.", max_tokens=1), timeout=CALL_TIMEOUT_SECONDS) for _ in range(NUM_BURST_REQUESTS)]
        completions, errors = [], []
        for call in calls:
            try:
                completions.append(read_completion(call))
            except grpc.RpcError as error:
                errors.append(error)
        usage = stub.GetUsage(inference_pb2.GetUsageRequest(), timeout=10)

    assert len(completions) == 20
    assert len(errors) == NUM_BURST_REQUESTS - 20
    assert {error.code() for error in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("requests_per_minute=20" in error.details() for error in errors)
    assert usage.num_requests == 20


def test_concurrency_limit_exact_while_streaming(stack: Any) -> None:
    channel, stub = inference_stub(stack, "narrow")
    with channel:
        calls = [stub.Generate(long_request(seed=7), timeout=CALL_TIMEOUT_SECONDS) for _ in range(NUM_BURST_REQUESTS)]
        admitted, errors = [], []
        for call in calls:
            try:
                next(call)
                admitted.append(call)
            except grpc.RpcError as error:
                errors.append(error)
        num_streams_while_open = num_active_streams(stub)

        for call in admitted:
            call.cancel()
        wait_until(lambda: num_active_streams(stub) == 0, "the cancelled streams released their leases")
        after_release = generate(stub, chat_request(max_tokens=2))

    assert len(admitted) == 5
    assert len(errors) == NUM_BURST_REQUESTS - 5
    assert {error.code() for error in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("max_concurrent_streams=5" in error.details() for error in errors)
    assert num_streams_while_open == 5
    assert after_release.result.finish_reason in FINISHED_REASONS


def test_cancel_frees_batch_place(stack: Any) -> None:
    metrics_port = stack.config.worker_gpu.metrics_port
    admission_metrics_port = stack.config.admission.metrics_port
    aborted_before = metric_value(metrics_port, ABORTED_REQUESTS, tenant_id="canceller")
    cancelled_before = metric_value(admission_metrics_port, ADMISSION_REQUESTS, tenant_id="canceller", outcome="cancelled")
    channel, stub = inference_stub(stack, "canceller")
    with channel:
        victim = stub.Generate(long_request(seed=1), timeout=CALL_TIMEOUT_SECONDS)
        others = [stub.Generate(chat_request("Describe the sea.", max_tokens=96, temperature=2.0, seed=seed),
                                timeout=CALL_TIMEOUT_SECONDS) for seed in (2, 3)]
        next(victim)
        first_responses = [next(call) for call in others]
        wait_until(lambda: metric_value(metrics_port, RUNNING_REQUESTS) == 3, "all three requests run in the batch")

        victim.cancel()
        wait_until(lambda: metric_value(metrics_port, RUNNING_REQUESTS) <= 2, "the cancelled request left the batch")
        others_done_at_drop = [call.done() for call in others]
        completions = [read_completion(itertools.chain([first], call)) for first, call in zip(first_responses, others)]
        with pytest.raises(grpc.RpcError) as cancelled:
            next(victim)
        wait_until(lambda: num_active_streams(stub) == 0, "every lease of the tenant was released")

    assert others_done_at_drop == [False, False]
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED
    for completion in completions:
        assert completion.result.finish_reason in FINISHED_REASONS
        assert completion.result.usage.completion_tokens == len(completion.token_ids)
    assert metric_value(metrics_port, ABORTED_REQUESTS, tenant_id="canceller") == aborted_before + 1
    cancelled_after = metric_value(admission_metrics_port, ADMISSION_REQUESTS, tenant_id="canceller", outcome="cancelled")
    assert cancelled_after == cancelled_before + 1


def test_deadline_reaches_worker(stack: Any) -> None:
    metrics_port = stack.config.worker_gpu.metrics_port
    admission_metrics_port = stack.config.admission.metrics_port
    aborted_before = metric_value(metrics_port, ABORTED_REQUESTS, tenant_id="canceller")
    expired_before = metric_value(admission_metrics_port, ADMISSION_REQUESTS, tenant_id="canceller", outcome="deadline_exceeded")
    channel, stub = inference_stub(stack, "canceller")
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            read_completion(stub.Generate(long_request(seed=5), timeout=3.0))
        wait_until(
            lambda: metric_value(metrics_port, ABORTED_REQUESTS, tenant_id="canceller") == aborted_before + 1,
            "the worker aborted the request",
        )
        wait_until(lambda: num_active_streams(stub) == 0, "the lease was released")

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    expired_after = metric_value(admission_metrics_port, ADMISSION_REQUESTS, tenant_id="canceller", outcome="deadline_exceeded")
    assert expired_after == expired_before + 1
