"""Prompt policy: character checks, per-tenant blocked patterns and custom hooks.

Admission applies the policy to every GenerateRequest after validation and
before tokenization, in this order:

1. Control characters. Any character of Unicode category Cc except
   ``\\n``, ``\\t`` and ``\\r`` in the prompt, a message's content, a stop
   string or client_request_id fails with INVALID_ARGUMENT naming the field.
   Invalid UTF-8 never reaches this step: the protobuf runtime rejects it
   while parsing, and ``InvalidUtf8Interceptor`` turns that failure into
   INVALID_ARGUMENT naming the field.
2. Blocked patterns. Each ``tenants[].blocked_patterns`` entry of the config
   is a Python regular expression searched in the prompt and in every
   message's content. A match fails with PERMISSION_DENIED: the request is
   well formed, but the tenant's policy forbids it. The message names the
   field and the pattern's index, never the text.
3. Hooks. ``services.admission.policy_hooks`` lists classes as
   ``package.module:ClassName``, instantiated once at start-up without
   arguments and called in order for each request (see ``PolicyHook``).
   A hook may rewrite texts (redaction), attach labels (classification),
   or reject the request by raising ``PolicyViolation``.

Blocked patterns are searched in the text as the caller sent it, before any
hook rewrites it, so a redacting hook cannot hide a blocked term.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import inspect
import logging
import re
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor as protobuf_descriptor
from google.protobuf.message import DecodeError

from services.common.config import Config, ConfigError
from services.common.errors import InvalidArgument, PermissionDenied
from tenantserve.v1 import inference_pb2

logger = logging.getLogger(__name__)

ALLOWED_CONTROL_CHARACTERS = frozenset("\n\t\r")


@dataclasses.dataclass
class PromptText:
    """One text of a request that the policy inspects."""

    # Field path in the request, for example "messages[1].content".
    field: str
    # The text; a hook may replace it, and the request then carries the new text.
    text: str


@dataclasses.dataclass
class PolicyInput:
    """The view of one request passed to each hook. Hooks may change ``texts[i].text`` and ``labels``."""

    tenant_id: str
    model: str
    # The prompt or the messages' contents, in request order.
    texts: list[PromptText]
    # Classification results, for example {"contains_email": "true"}; they go
    # into the request's audit record. Keys and values are short strings and
    # must not contain prompt text.
    labels: dict[str, str] = dataclasses.field(default_factory=dict)


class PolicyViolation(Exception):
    """Raised by a hook to reject a request with PERMISSION_DENIED.

    ``reason`` reaches the caller and the audit log, so it must not quote
    the prompt.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PolicyHook(abc.ABC):
    """A custom policy step, loaded from ``services.admission.policy_hooks``.

    The class must take no constructor arguments. ``apply`` runs on the
    event loop for every request, so it must be fast and must not block
    on I/O. It inspects ``policy_input`` and may rewrite texts in place,
    add labels, or raise PolicyViolation. Any other exception fails the
    request with INTERNAL and is logged with its traceback.
    """

    @abc.abstractmethod
    def apply(self, policy_input: PolicyInput) -> None:
        """Inspect and possibly change one request's texts."""


class EmailRedactor(PolicyHook):
    """Replace e-mail addresses in prompts with ``[email]`` and label the request.

    Enable it with ``policy_hooks: ["services.admission.policy:EmailRedactor"]``.
    """

    PATTERN = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
    REPLACEMENT = "[email]"

    def apply(self, policy_input: PolicyInput) -> None:
        num_redacted = 0
        for prompt_text in policy_input.texts:
            prompt_text.text, count = self.PATTERN.subn(self.REPLACEMENT, prompt_text.text)
            num_redacted += count
        if num_redacted:
            policy_input.labels["emails_redacted"] = str(num_redacted)


class PromptPolicy:
    """The prompt policy of one admission process, built from the config."""

    def __init__(self, blocked_patterns: Mapping[str, Sequence[re.Pattern[str]]], hooks: Sequence[PolicyHook]) -> None:
        self._blocked_patterns = blocked_patterns
        self._hooks = hooks

    @classmethod
    def from_config(cls, config: Config) -> PromptPolicy:
        """Compile every tenant's blocked patterns and load the hooks; raise ConfigError naming a bad entry."""
        blocked_patterns = {tenant.name: _compile_patterns(tenant.name, tenant.blocked_patterns) for tenant in config.tenants}
        hooks = [load_hook(path) for path in config.admission.policy_hooks]
        if hooks:
            logger.info("prompt policy hooks: %s", ", ".join(config.admission.policy_hooks))
        return cls(blocked_patterns, hooks)

    def apply(self, tenant_id: str, model: str, request: inference_pb2.GenerateRequest) -> dict[str, str]:
        """Check ``request``, let the hooks rewrite its texts in place, and return the hooks' labels.

        Raises InvalidArgument for a control character, and
        PermissionDenied for a blocked pattern or a hook's PolicyViolation.
        """
        check_control_characters(request)
        texts = prompt_texts(request)
        self._check_blocked_patterns(tenant_id, texts)
        if not self._hooks:
            return {}

        policy_input = PolicyInput(tenant_id=tenant_id, model=model, texts=texts)
        for hook in self._hooks:
            try:
                hook.apply(policy_input)
            except PolicyViolation as exc:
                raise PermissionDenied(f"the request is rejected by the prompt policy: {exc.reason}") from exc
        _write_back(request, policy_input.texts)
        return policy_input.labels

    def _check_blocked_patterns(self, tenant_id: str, texts: Sequence[PromptText]) -> None:
        # NOTE: patterns run on Python's backtracking engine with no time
        # limit, so an operator's pattern with nested quantifiers can take
        # seconds on a crafted prompt.
        for index, pattern in enumerate(self._blocked_patterns.get(tenant_id, ())):
            for prompt_text in texts:
                if pattern.search(prompt_text.text):
                    raise PermissionDenied(
                        f"{prompt_text.field}: matches blocked pattern {index} of tenant {tenant_id!r}; "
                        "the prompt is not allowed by the tenant's content policy"
                    )


def check_control_characters(request: inference_pb2.GenerateRequest) -> None:
    """Raise InvalidArgument naming the first field that contains a forbidden control character."""
    fields = [(prompt_text.field, prompt_text.text) for prompt_text in prompt_texts(request)]
    fields += [(f"sampling.stop[{index}]", text) for index, text in enumerate(request.sampling.stop)]
    fields.append(("client_request_id", request.client_request_id))
    for field, text in fields:
        for position, character in enumerate(text):
            if character not in ALLOWED_CONTROL_CHARACTERS and unicodedata.category(character) == "Cc":
                raise InvalidArgument(
                    field,
                    f"contains the control character U+{ord(character):04X} at index {position}; "
                    "only \\n, \\t and \\r are allowed",
                )


def prompt_texts(request: inference_pb2.GenerateRequest) -> list[PromptText]:
    """Return the prompt, or every message's content, with its field path."""
    if request.WhichOneof("input") == "prompt":
        return [PromptText("prompt", request.prompt)]
    return [
        PromptText(f"messages[{index}].content", message.content)
        for index, message in enumerate(request.messages.messages)
    ]


def load_hook(path: str) -> PolicyHook:
    """Import ``package.module:ClassName`` and instantiate it; raise ConfigError with the reason."""
    module_name, colon, class_name = path.partition(":")
    if not colon or not module_name or not class_name:
        raise ConfigError(f"services.admission.policy_hooks: {path!r} is invalid; use package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"services.admission.policy_hooks: cannot import {module_name!r}: {exc}") from exc
    hook_class = getattr(module, class_name, None)
    if not (inspect.isclass(hook_class) and issubclass(hook_class, PolicyHook)):
        raise ConfigError(
            f"services.admission.policy_hooks: {path!r} is not a subclass of services.admission.policy.PolicyHook"
        )
    return hook_class()


def _compile_patterns(tenant_id: str, patterns: Sequence[str]) -> list[re.Pattern[str]]:
    compiled = []
    for index, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ConfigError(f"tenants[{tenant_id}].blocked_patterns[{index}] is not a valid regular expression: {exc}") from exc
    return compiled


def _write_back(request: inference_pb2.GenerateRequest, texts: Sequence[PromptText]) -> None:
    if request.WhichOneof("input") == "prompt":
        request.prompt = texts[0].text
        return
    for message, prompt_text in zip(request.messages.messages, texts, strict=True):
        message.content = prompt_text.text


# --- Invalid UTF-8 --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request message that failed to parse."""

    # Field path of the first string field with invalid UTF-8, or None
    # when the bytes are malformed otherwise.
    invalid_utf8_field: str | None


class InvalidUtf8Interceptor(grpc.aio.ServerInterceptor):
    """Fail requests that do not parse with INVALID_ARGUMENT, naming a field with invalid UTF-8.

    The protobuf runtime (upb) rejects a string field that is not valid
    UTF-8 while parsing, and grpcio 1.85 then returns UNKNOWN with the
    DecodeError's text, which names no field. This interceptor parses the request itself so that the caller
    learns which field is wrong. It handles unary-request RPCs only, which
    are all that admission serves.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        message_class = getattr(handler.request_deserializer, "__self__", None) if handler is not None else None
        if handler is None or handler.request_streaming or message_class is None:
            return handler
        deserialize = _tolerant_deserializer(message_class)
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _reject_malformed_unary(handler.unary_unary), request_deserializer=deserialize, response_serializer=serializer
            )
        return grpc.unary_stream_rpc_method_handler(
            _reject_malformed_stream(handler.unary_stream), request_deserializer=deserialize, response_serializer=serializer
        )


def find_invalid_utf8(descriptor: protobuf_descriptor.Descriptor, data: bytes, prefix: str = "") -> str | None:
    """Return the path of the first string field in ``data`` that is not valid UTF-8, or None.

    Walks the protobuf wire format guided by ``descriptor``; unknown fields
    are skipped. Returns None as well when the bytes are malformed.
    """
    position = 0
    num_seen: dict[int, int] = {}
    try:
        while position < len(data):
            tag, position = _read_varint(data, position)
            number, wire_type = tag >> 3, tag & 7
            if wire_type != 2:
                position = _skip_scalar(data, position, wire_type)
                continue
            length, position = _read_varint(data, position)
            value = data[position : position + length]
            position += length
            found = _check_length_delimited(descriptor, number, value, prefix, num_seen)
            if found is not None:
                return found
    except (IndexError, ValueError):
        return None
    return None


def _check_length_delimited(
    descriptor: protobuf_descriptor.Descriptor, number: int, value: bytes, prefix: str, num_seen: dict[int, int]
) -> str | None:
    field = descriptor.fields_by_number.get(number)
    if field is None:
        return None
    path = prefix + field.name
    if field.is_repeated:
        path += f"[{num_seen.get(number, 0)}]"
        num_seen[number] = num_seen.get(number, 0) + 1
    if field.type == field.TYPE_STRING:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return path
        return None
    if field.type == field.TYPE_MESSAGE:
        return find_invalid_utf8(field.message_type, value, path + ".")
    return None


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 64, 7):
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
    raise ValueError("varint longer than 10 bytes")


def _skip_scalar(data: bytes, position: int, wire_type: int) -> int:
    if wire_type == 0:
        return _read_varint(data, position)[1]
    if wire_type == 1:
        return position + 8
    if wire_type == 5:
        return position + 4
    raise ValueError(f"unsupported wire type {wire_type}")


def _tolerant_deserializer(message_class: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError:
            return MalformedRequest(find_invalid_utf8(message_class.DESCRIPTOR, data))

    return deserialize


async def _abort_malformed(request: MalformedRequest, context: grpc.aio.ServicerContext) -> None:
    if request.invalid_utf8_field is None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request message is not valid protobuf")
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, f"{request.invalid_utf8_field}: is not valid UTF-8; send text encoded as UTF-8"
    )


def _reject_malformed_unary(behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            await _abort_malformed(request, context)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return checked


def _reject_malformed_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def checked_generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, MalformedRequest):
                await _abort_malformed(request, context)
            async for response in behavior(request, context):
                yield response

        return checked_generator

    async def checked_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, MalformedRequest):
            await _abort_malformed(request, context)
        result = behavior(request, context)
        if inspect.isawaitable(result):
            await result

    return checked_writer
