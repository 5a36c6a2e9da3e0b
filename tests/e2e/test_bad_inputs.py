"""Invalid requests through the whole stack: each gets its status code and nothing breaks."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tenantserve.v1 import common_pb2, inference_pb2

from .support import MODEL, FINISHED_REASONS, chat_request, generate, generate_error, health_status, inference_stub


def with_sampling(**fields: Any) -> inference_pb2.GenerateRequest:
    request = chat_request(max_tokens=4)
    for name, value in fields.items():
        if name == "stop":
            request.sampling.stop.extend(value)
        else:
            setattr(request.sampling, name, value)
    return request


def with_messages(*messages: tuple[int, str]) -> inference_pb2.GenerateRequest:
    request = chat_request(max_tokens=4)
    del request.messages.messages[:]
    request.messages.messages.extend(common_pb2.ChatMessage(role=role, content=content) for role, content in messages)
    return request


def raw_prompt(prompt: str) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(model=MODEL, prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=4))


def unknown_model() -> inference_pb2.GenerateRequest:
    request = chat_request(max_tokens=4)
    request.model = "no-such-model"
    return request


def long_client_request_id() -> inference_pb2.GenerateRequest:
    return chat_request(max_tokens=4, client_request_id="r" * 129)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_INPUTS = [
    ("unknown model", unknown_model(), grpc.StatusCode.NOT_FOUND, "model 'no-such-model' not found"),
    ("max_tokens zero", with_sampling(max_tokens=0), INVALID, "sampling.max_tokens: must be between 1 and 1024, got 0"),
    ("max_tokens above model", with_sampling(max_tokens=1025), INVALID, "sampling.max_tokens: must be between 1 and 1024"),
    ("empty prompt", raw_prompt(""), INVALID, "prompt: must not be empty"),
    ("empty messages", with_messages(), INVALID, "messages: must contain at least one message"),
    ("unspecified role", with_messages((common_pb2.ROLE_UNSPECIFIED, "Hi")), INVALID, "messages[0].role:"),
    ("empty user content", with_messages((common_pb2.ROLE_USER, "")), INVALID, "messages[0].content: must not be empty"),
    ("temperature above 2", with_sampling(temperature=2.5), INVALID, "sampling.temperature: must be between 0 and 2"),
    ("temperature negative", with_sampling(temperature=-1.0), INVALID, "sampling.temperature: must be between 0 and 2"),
    ("top_p above 1", with_sampling(top_p=1.5), INVALID, "sampling.top_p: must be between 0 and 1"),
    ("five stop strings", with_sampling(stop=["a", "b", "c", "d", "e"]), INVALID, "sampling.stop: must contain at most 4"),
    ("stop string 65 bytes", with_sampling(stop=["s" * 65]), INVALID, "sampling.stop[0]: must be at most 64 bytes"),
    ("empty stop string", with_sampling(stop=[""]), INVALID, "sampling.stop[0]: must not be empty"),
    ("client_request_id 129", long_client_request_id(), INVALID, "client_request_id: must be at most 128 characters"),
    ("prompt over context", raw_prompt("hello" + " hello" * 2100), INVALID, "prompt: "),
    ("messages over context", with_messages((common_pb2.ROLE_USER, "hello" + " hello" * 2100)), INVALID, "messages: "),
    ("prompt of 4 MB", raw_prompt("x" * 4_000_000), INVALID, "prompt: 4000000 bytes cannot fit the context"),
    ("messages of 4 MB", with_messages((common_pb2.ROLE_USER, "x" * 4_000_000)), INVALID, "messages: 4000000 bytes"),
]


@pytest.mark.parametrize(
    ("request_proto", "code", "details_start"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_rejected(
    stack: Any, request_proto: inference_pb2.GenerateRequest, code: grpc.StatusCode, details_start: str
) -> None:
    channel, stub = inference_stub(stack, "alpha")
    with channel:
        num_deltas, error = generate_error(stub, request_proto)

    assert num_deltas == 0
    assert error.code() == code
    assert error.details().startswith(details_start), error.details()
    assert health_status(stack, "admission") == health_pb2.HealthCheckResponse.SERVING


def test_stack_serves_after_bad_inputs(stack: Any) -> None:
    channel, stub = inference_stub(stack, "alpha")
    with channel:
        completion = generate(stub, chat_request(max_tokens=4))

    for section in ("admission", "scheduler", "worker_gpu"):
        assert health_status(stack, section) == health_pb2.HealthCheckResponse.SERVING, section
    assert completion.result.finish_reason in FINISHED_REASONS
