"""Prompt policy: control characters, invalid UTF-8, blocked patterns and hooks."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.admission.policy import (
    EmailRedactor,
    PolicyHook,
    PolicyInput,
    PolicyViolation,
    PromptPolicy,
    check_control_characters,
    find_invalid_utf8,
    load_hook,
)
from services.common.config import Config, ConfigError
from services.common.errors import InvalidArgument, PermissionDenied
from tenantserve.v1 import common_pb2, inference_pb2

from .support import MODEL, chat_request, collect_stream, make_cert_dir, make_config, running_admission, tenant_stub

GENERATE_METHOD = "/tenantserve.v1.Inference/Generate"


def unique_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def prompt_request(prompt: str, **fields: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=MODEL, prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=8), **fields
    )


class RejectSecrets(PolicyHook):
    """A test hook that rejects prompts containing the word "secret" and labels the others."""

    def apply(self, policy_input: PolicyInput) -> None:
        if any("secret" in prompt_text.text for prompt_text in policy_input.texts):
            raise PolicyViolation("classified as confidential")
        policy_input.labels["checked"] = "yes"


class NotAHook:
    pass


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (prompt_request("hello\x00world"), "prompt"),
        (prompt_request("bell \x07"), "prompt"),
        (prompt_request("escape \x1b[31m"), "prompt"),
        (prompt_request("delete \x7f"), "prompt"),
        (prompt_request("c1 \x85"), "prompt"),
        (chat_request("fine"), None),
        (chat_request("form feed \x0c"), "messages[0].content"),
        (prompt_request("ok", client_request_id="id\x01"), "client_request_id"),
        (
            inference_pb2.GenerateRequest(
                model=MODEL, prompt="ok", sampling=common_pb2.SamplingParams(max_tokens=8, stop=["fine", "bad\x02"])
            ),
            "sampling.stop[1]",
        ),
    ],
)
def test_control_characters_name_field(request_message: inference_pb2.GenerateRequest, field: str | None) -> None:
    if field is None:
        check_control_characters(request_message)
        return
    with pytest.raises(InvalidArgument) as caught:
        check_control_characters(request_message)
    assert caught.value.field == field
    assert "control character U+" in caught.value.message


def test_newline_tab_return_allowed() -> None:
    check_control_characters(prompt_request("line one\r\n\tline two\n"))


def test_blocked_pattern_rejects_without_echo() -> None:
    policy = PromptPolicy({"alpha": [re.compile(r"(?i)internal\s+project")]}, [])
    request = chat_request("Tell me about Internal  Project Zebra")

    with pytest.raises(PermissionDenied) as caught:
        policy.apply("alpha", MODEL, request)

    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.message.startswith("messages[0].content: matches blocked pattern 0")
    assert "Zebra" not in caught.value.message
    assert "Project" not in caught.value.message


def test_blocked_pattern_only_for_its_tenant() -> None:
    policy = PromptPolicy({"alpha": [re.compile("forbidden")]}, [])

    labels = policy.apply("beta", MODEL, prompt_request("forbidden words"))

    assert labels == {}


def test_email_redactor_rewrites_request() -> None:
    policy = PromptPolicy({}, [EmailRedactor()])
    request = chat_request("Write to jane.doe@example.com or ops@corp.example.org today")

    labels = policy.apply("alpha", MODEL, request)

    assert request.messages.messages[0].content == "Write to [email] or [email] today"
    assert labels == {"emails_redacted": "2"}


def test_blocked_pattern_sees_text_before_redaction() -> None:
    policy = PromptPolicy({"alpha": [re.compile(r"@example\.com")]}, [EmailRedactor()])

    with pytest.raises(PermissionDenied):
        policy.apply("alpha", MODEL, prompt_request("mail jane@example.com"))


def test_hooks_run_in_order() -> None:
    policy = PromptPolicy({}, [EmailRedactor(), RejectSecrets()])
    request = prompt_request("mail a@b.io")

    labels = policy.apply("alpha", MODEL, request)

    assert request.prompt == "mail [email]"
    assert labels == {"emails_redacted": "1", "checked": "yes"}


def test_hook_violation_is_permission_denied() -> None:
    policy = PromptPolicy({}, [RejectSecrets()])

    with pytest.raises(PermissionDenied) as caught:
        policy.apply("alpha", MODEL, prompt_request("the secret plan"))

    assert caught.value.message == "the request is rejected by the prompt policy: classified as confidential"


def test_load_hook_by_dotted_path() -> None:
    hook = load_hook("services.admission.policy:EmailRedactor")

    assert isinstance(hook, EmailRedactor)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("services.admission.policy.EmailRedactor", "use package.module:ClassName"),
        ("no_such_package.module:Hook", "cannot import"),
        ("services.admission.policy:Missing", "not a subclass"),
        (f"{__name__}:NotAHook", "not a subclass"),
    ],
)
def test_load_hook_rejects_bad_path(path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_hook(path)


def test_invalid_pattern_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tenants\[alpha\]\.blocked_patterns\[1\]"):
        PromptPolicy.from_config(make_config(tmp_path, "", [{"name": "alpha", "blocked_patterns": ["ok", "(unclosed"]}]))


# Serialized as UTF-8 and then patched into the invalid byte 0xFF, because the
# protobuf runtime refuses to serialize invalid UTF-8 itself.
PLACEHOLDER = "\u00a4"


def invalid_utf8_bytes(message: inference_pb2.GenerateRequest) -> bytes:
    """Serialize ``message`` with each PLACEHOLDER character turned into the invalid UTF-8 byte 0xFF."""
    return message.SerializeToString().replace(PLACEHOLDER.encode(), b"\xff")


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (prompt_request(f"a{PLACEHOLDER}b"), "prompt"),
        (chat_request(f"a{PLACEHOLDER}b"), "messages.messages[0].content"),
        (prompt_request("ok", client_request_id=PLACEHOLDER), "client_request_id"),
        (inference_pb2.GenerateRequest(model=f"m{PLACEHOLDER}"), "model"),
        (
            inference_pb2.GenerateRequest(
                model=MODEL, prompt="ok", sampling=common_pb2.SamplingParams(max_tokens=8, stop=["x", PLACEHOLDER])
            ),
            "sampling.stop[1]",
        ),
        (prompt_request("fine"), None),
    ],
)
def test_find_invalid_utf8_names_field(message: inference_pb2.GenerateRequest, field: str | None) -> None:
    data = invalid_utf8_bytes(message)

    assert find_invalid_utf8(inference_pb2.GenerateRequest.DESCRIPTOR, data) == field


@pytest.mark.parametrize("data", [b"\x1a", b"\x1a\x80", b"\x1b", b"\xff" * 11])
def test_find_invalid_utf8_tolerates_malformed(data: bytes) -> None:
    assert find_invalid_utf8(inference_pb2.GenerateRequest.DESCRIPTOR, data) is None


def policy_config(tmp_path: Path, valkey_url: str, tenant: str, **admission: Any) -> tuple[Path, Config]:
    cert_dir = make_cert_dir(tmp_path, [tenant])
    base = make_config(cert_dir, valkey_url, [{"name": tenant, "blocked_patterns": [r"(?i)\bproject\s+zebra\b"]}])
    admission.setdefault("audit_log_path", str(tmp_path / "audit.jsonl"))
    return cert_dir, dataclasses.replace(base, admission=dataclasses.replace(base.admission, **admission))


def test_server_rejects_invalid_utf8_naming_field(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir, config = policy_config(tmp_path, valkey_url, tenant)
    data = invalid_utf8_bytes(chat_request(f"caf{PLACEHOLDER}"))

    async def main() -> grpc.aio.AioRpcError | None:
        async with running_admission(config) as server:
            channel, _ = tenant_stub(cert_dir, tenant, server.port)
            async with channel:
                # No serializers: the bytes go out as they are.
                _, error = await collect_stream(channel.unary_stream(GENERATE_METHOD)(data))
        return error

    error = asyncio.run(main())

    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "messages.messages[0].content: is not valid UTF-8; send text encoded as UTF-8"


@pytest.mark.parametrize(
    ("request_message", "code", "detail_start"),
    [
        (chat_request("ring \x07 the bell"), grpc.StatusCode.INVALID_ARGUMENT, "messages[0].content: contains the control"),
        (chat_request("Status of Project Zebra?"), grpc.StatusCode.PERMISSION_DENIED, "messages[0].content: matches blocked"),
    ],
)
def test_server_applies_policy(
    tmp_path: Path, valkey_url: str, request_message: inference_pb2.GenerateRequest, code: grpc.StatusCode, detail_start: str
) -> None:
    tenant = unique_name()
    cert_dir, config = policy_config(tmp_path, valkey_url, tenant)

    async def main() -> tuple[list[object], grpc.aio.AioRpcError | None]:
        async with running_admission(config) as server:
            channel, stub = tenant_stub(cert_dir, tenant, server.port)
            async with channel:
                return await collect_stream(stub.Generate(request_message))

    responses, error = asyncio.run(main())

    assert responses == []
    assert error is not None
    assert error.code() == code
    assert error.details().startswith(detail_start)
    assert "Zebra" not in error.details()


def test_server_runs_configured_hook(tmp_path: Path, valkey_url: str) -> None:
    tenant = unique_name()
    cert_dir, config = policy_config(
        tmp_path, valkey_url, tenant, policy_hooks=("services.admission.policy:EmailRedactor",)
    )

    async def main() -> grpc.aio.AioRpcError | None:
        async with running_admission(config) as server:
            channel, stub = tenant_stub(cert_dir, tenant, server.port)
            async with channel:
                _, error = await collect_stream(stub.Generate(chat_request("Reply to jane@example.com")))
        return error

    error = asyncio.run(main())
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]

    # The scheduler port is closed, so an admitted request fails there.
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert records[0]["outcome"] == "admitted"
    assert records[0]["labels"] == {"emails_redacted": "1"}
