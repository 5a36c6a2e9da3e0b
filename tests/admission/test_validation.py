"""Validation of GenerateRequest fields: each invalid field gets its code and a message naming it."""

from __future__ import annotations

import grpc
import pytest
import yaml

from services.admission.validation import check_context_length, effective_service_class, validate_request
from services.common.config import DEFAULT_CONFIG_PATH, Config, parse_config
from services.common.errors import ServiceError
from tenantserve.v1 import common_pb2, inference_pb2

MODEL = "smollm2-135m-instruct"


def default_config() -> Config:
    return parse_config(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text()), environ={})


def message(role: int = common_pb2.ROLE_USER, content: str = "Hello") -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=role, content=content)


def make_request(
    messages: list[common_pb2.ChatMessage] | None = None,
    prompt: str | None = None,
    model: str = MODEL,
    client_request_id: str = "",
    service_class: int = common_pb2.SERVICE_CLASS_UNSPECIFIED,
    **sampling: object,
) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(
        model=model,
        sampling=common_pb2.SamplingParams(**{"max_tokens": 16, **sampling}),
        client_request_id=client_request_id,
        service_class=service_class,
    )
    if prompt is not None:
        request.prompt = prompt
    else:
        request.messages.messages.extend(messages if messages is not None else [message()])
    return request


INVALID_REQUESTS = [
    ("model empty", make_request(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model: must not be empty"),
    ("model unknown", make_request(model="gpt-9"), grpc.StatusCode.NOT_FOUND, "model 'gpt-9' not found"),
    ("no input", inference_pb2.GenerateRequest(model=MODEL, sampling=common_pb2.SamplingParams(max_tokens=4)),
     grpc.StatusCode.INVALID_ARGUMENT, "input: set either messages or prompt"),
    ("prompt empty", make_request(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty"),
    ("messages empty", make_request(messages=[]), grpc.StatusCode.INVALID_ARGUMENT,
     "messages: must contain at least one message"),
    ("role unspecified", make_request(messages=[message(role=common_pb2.ROLE_UNSPECIFIED)]),
     grpc.StatusCode.INVALID_ARGUMENT, "messages[0].role: must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT, got ROLE_UNSPECIFIED"),
    ("role out of range", make_request(messages=[message(), message(role=9)]),
     grpc.StatusCode.INVALID_ARGUMENT, "messages[1].role: must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT, got 9"),
    ("user content empty", make_request(messages=[message(content="")]), grpc.StatusCode.INVALID_ARGUMENT,
     "messages[0].content: must not be empty"),
    ("system content empty", make_request(messages=[message(common_pb2.ROLE_SYSTEM, ""), message()]),
     grpc.StatusCode.INVALID_ARGUMENT, "messages[0].content: must not be empty"),
    ("max_tokens zero", make_request(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.max_tokens: must be between 1 and 1024, got 0"),
    ("max_tokens negative", make_request(max_tokens=-5), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.max_tokens: must be between 1 and 1024, got -5"),
    ("max_tokens above model", make_request(max_tokens=1025), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.max_tokens: must be between 1 and 1024, got 1025"),
    ("temperature above 2", make_request(temperature=2.5), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.temperature: must be between 0 and 2, got 2.5"),
    ("temperature negative", make_request(temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.temperature: must be between 0 and 2, got -0.5"),
    ("temperature NaN", make_request(temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.temperature: must be between 0 and 2, got NaN"),
    ("top_p above 1", make_request(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.top_p: must be between 0 and 1, got 1.5"),
    ("top_p negative", make_request(top_p=-0.25), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.top_p: must be between 0 and 1, got -0.25"),
    ("five stop strings", make_request(stop=["a", "b", "c", "d", "e"]), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.stop: must contain at most 4 strings, got 5"),
    ("stop string empty", make_request(stop=["end", ""]), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.stop[1]: must not be empty"),
    ("stop string 65 bytes", make_request(stop=["x" * 65]), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.stop[0]: must be at most 64 bytes of UTF-8, got 65"),
    # 22 characters but 66 bytes of UTF-8.
    ("stop string multibyte", make_request(stop=["€" * 22]), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.stop[0]: must be at most 64 bytes of UTF-8, got 66"),
    ("client_request_id 129", make_request(client_request_id="r" * 129), grpc.StatusCode.INVALID_ARGUMENT,
     "client_request_id: must be at most 128 characters, got 129"),
    ("service class unknown", make_request(service_class=42), grpc.StatusCode.INVALID_ARGUMENT,
     "service_class: must be SERVICE_CLASS_INTERACTIVE"),
]


@pytest.mark.parametrize(
    ("request_proto", "code", "message_start"),
    [case[1:] for case in INVALID_REQUESTS],
    ids=[case[0] for case in INVALID_REQUESTS],
)
def test_invalid_request_rejected(
    request_proto: inference_pb2.GenerateRequest, code: grpc.StatusCode, message_start: str
) -> None:
    with pytest.raises(ServiceError) as caught:
        validate_request(request_proto, default_config())

    assert caught.value.code == code
    assert caught.value.message.startswith(message_start), caught.value.message


VALID_REQUESTS = [
    ("chat", make_request()),
    ("raw prompt", make_request(prompt="Once upon a time")),
    ("empty assistant turn", make_request(messages=[message(), message(common_pb2.ROLE_ASSISTANT, ""), message()])),
    ("limits inclusive", make_request(max_tokens=1024, temperature=2.0, top_p=1.0, stop=["x" * 64] * 4)),
    ("client_request_id 128", make_request(client_request_id="r" * 128)),
    ("greedy", make_request(temperature=0.0, top_p=0.0)),
    ("batch class", make_request(service_class=common_pb2.SERVICE_CLASS_BATCH)),
]


@pytest.mark.parametrize("request_proto", [case[1] for case in VALID_REQUESTS], ids=[case[0] for case in VALID_REQUESTS])
def test_valid_request_returns_model(request_proto: inference_pb2.GenerateRequest) -> None:
    model = validate_request(request_proto, default_config())

    assert model.name == MODEL


def test_context_length_limit_inclusive() -> None:
    model = default_config().model(MODEL)
    assert model is not None

    check_context_length(2048 - 16, 16, model)
    with pytest.raises(ServiceError) as caught:
        check_context_length(2048 - 15, 16, model)

    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith("prompt: 2033 prompt tokens plus sampling.max_tokens 16 exceed the context of 2048")


def test_unspecified_service_class_is_interactive() -> None:
    assert effective_service_class(common_pb2.SERVICE_CLASS_UNSPECIFIED) == common_pb2.SERVICE_CLASS_INTERACTIVE
    assert effective_service_class(common_pb2.SERVICE_CLASS_BACKGROUND) == common_pb2.SERVICE_CLASS_BACKGROUND
