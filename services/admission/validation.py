"""Checks of a GenerateRequest against the model's limits and the API's rules.

Every check raises a ``ServiceError`` whose message starts with the field
name and states the limit, so a caller can fix the request from the message
alone. Nothing here touches the network or the quota store.
"""

from __future__ import annotations

import math

from services.common.config import Config, ModelConfig
from services.common.errors import InvalidArgument, NotFound
from tenantserve.v1 import common_pb2, inference_pb2

MAX_STOP_STRINGS = 4
MAX_STOP_BYTES = 64
MAX_CLIENT_REQUEST_ID_CHARS = 128
MAX_TEMPERATURE = 2.0

ROLE_NAMES: dict[int, str] = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}
# An empty assistant message is allowed: it is an earlier turn in which the
# model returned nothing. An empty system or user message carries no input.
ROLES_NEEDING_CONTENT = frozenset({common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER})

SERVICE_CLASSES = frozenset(
    {common_pb2.SERVICE_CLASS_INTERACTIVE, common_pb2.SERVICE_CLASS_BATCH, common_pb2.SERVICE_CLASS_BACKGROUND}
)


def validate_request(request: inference_pb2.GenerateRequest, config: Config) -> ModelConfig:
    """Check every field that does not need the tokenizer and return the model's config.

    Raises NotFound for an unknown model and InvalidArgument for any other
    invalid field. The prompt length is checked later by
    ``check_context_length``, once the prompt is tokenized.
    """
    model = find_model(request.model, config)
    check_input(request)
    check_sampling(request.sampling, model)
    check_service_class(request.service_class)
    check_client_request_id(request.client_request_id)
    return model


def find_model(name: str, config: Config) -> ModelConfig:
    if not name:
        raise InvalidArgument("model", "must not be empty; ListModels returns the available models")
    model = config.model(name)
    if model is None:
        raise NotFound(f"model {name!r} not found; ListModels returns the available models")
    return model


def check_input(request: inference_pb2.GenerateRequest) -> None:
    input_kind = request.WhichOneof("input")
    if input_kind is None:
        raise InvalidArgument("input", "set either messages or prompt")
    if input_kind == "prompt":
        if not request.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        return

    messages = request.messages.messages
    if not messages:
        raise InvalidArgument("messages", "must contain at least one message")
    for index, message in enumerate(messages):
        if message.role not in ROLE_NAMES:
            raise InvalidArgument(
                f"messages[{index}].role",
                f"must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT, got {_role_name(message.role)}",
            )
        if message.role in ROLES_NEEDING_CONTENT and not message.content:
            raise InvalidArgument(f"messages[{index}].content", f"must not be empty in a {_role_name(message.role)} message")


def check_sampling(sampling: common_pb2.SamplingParams, model: ModelConfig) -> None:
    if not 1 <= sampling.max_tokens <= model.max_completion_tokens:
        raise InvalidArgument(
            "sampling.max_tokens",
            f"must be between 1 and {model.max_completion_tokens}, got {sampling.max_tokens}",
        )
    # The negated range checks also reject NaN.
    if not 0.0 <= sampling.temperature <= MAX_TEMPERATURE:
        raise InvalidArgument("sampling.temperature", f"must be between 0 and 2, got {_format_float(sampling.temperature)}")
    if not 0.0 <= sampling.top_p <= 1.0:
        raise InvalidArgument("sampling.top_p", f"must be between 0 and 1, got {_format_float(sampling.top_p)}")
    check_stop_strings(sampling.stop)


def check_stop_strings(stop: list[str]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("sampling.stop", f"must contain at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    for index, text in enumerate(stop):
        if not text:
            raise InvalidArgument(f"sampling.stop[{index}]", "must not be empty")
        num_bytes = len(text.encode("utf-8"))
        if num_bytes > MAX_STOP_BYTES:
            raise InvalidArgument(
                f"sampling.stop[{index}]", f"must be at most {MAX_STOP_BYTES} bytes of UTF-8, got {num_bytes}"
            )


def check_service_class(service_class: int) -> None:
    if service_class != common_pb2.SERVICE_CLASS_UNSPECIFIED and service_class not in SERVICE_CLASSES:
        raise InvalidArgument(
            "service_class",
            f"must be SERVICE_CLASS_INTERACTIVE, SERVICE_CLASS_BATCH or SERVICE_CLASS_BACKGROUND, got {service_class}",
        )


def check_client_request_id(client_request_id: str) -> None:
    if len(client_request_id) > MAX_CLIENT_REQUEST_ID_CHARS:
        raise InvalidArgument(
            "client_request_id",
            f"must be at most {MAX_CLIENT_REQUEST_ID_CHARS} characters, got {len(client_request_id)}",
        )


def check_context_length(
    num_prompt_tokens: int, max_tokens: int, model: ModelConfig, input_field: str = "prompt"
) -> None:
    """Raise InvalidArgument naming ``input_field`` when the prompt plus max_tokens exceed the model's context."""
    if num_prompt_tokens + max_tokens > model.max_context_tokens:
        raise InvalidArgument(
            input_field,
            f"{num_prompt_tokens} prompt tokens plus sampling.max_tokens {max_tokens} exceed the context "
            f"of {model.max_context_tokens} tokens of model {model.name!r}; shorten the prompt or lower max_tokens",
        )


def chat_messages(request: inference_pb2.GenerateRequest) -> list[tuple[str, str]]:
    """Return the request's chat as (role, content) pairs for the chat template."""
    return [(ROLE_NAMES[message.role], message.content) for message in request.messages.messages]


def effective_service_class(service_class: int) -> int:
    """Map SERVICE_CLASS_UNSPECIFIED to interactive, as the API defines."""
    if service_class == common_pb2.SERVICE_CLASS_UNSPECIFIED:
        return common_pb2.SERVICE_CLASS_INTERACTIVE
    return service_class


def _role_name(role: int) -> str:
    if role in common_pb2.Role.values():
        return common_pb2.Role.Name(role)
    return str(role)


def _format_float(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:g}"


# Names of the service classes in tenant limits and in the Redis decision.
SERVICE_CLASS_NAMES: dict[int, str] = {
    common_pb2.SERVICE_CLASS_INTERACTIVE: "interactive",
    common_pb2.SERVICE_CLASS_BATCH: "batch",
    common_pb2.SERVICE_CLASS_BACKGROUND: "background",
}
