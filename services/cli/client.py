"""A small tenant client of the Inference API, used by `chat`, `demo` and the benchmark."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from services.common import tls
from tenantserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc


@dataclasses.dataclass
class ChatResult:
    text: str
    num_completion_tokens: int
    num_prompt_tokens: int
    finish_reason: str
    request_id: str
    # Seconds from sending the request to the first delta, and to the result.
    time_to_first_token: float
    total_time: float

    @property
    def tokens_per_second(self) -> float:
        decode_time = self.total_time - self.time_to_first_token
        if self.num_completion_tokens <= 1 or decode_time <= 0:
            return 0.0
        return (self.num_completion_tokens - 1) / decode_time


def tenant_channel(target: str, cert_dir: Path, tenant_id: str) -> grpc.aio.Channel:
    """Open a mutual-TLS channel to admission with the tenant's certificate."""
    return tls.secure_channel(target, tls.tenant_channel_credentials(cert_dir, tenant_id))


def chat_request(
    model: str,
    prompt: str,
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: int | None = None,
    system: str | None = None,
) -> inference_pb2.GenerateRequest:
    messages = []
    if system:
        messages.append(common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=system))
    messages.append(common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt))
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    return inference_pb2.GenerateRequest(
        model=model,
        messages=inference_pb2.ChatMessages(messages=messages),
        sampling=sampling,
        service_class=common_pb2.SERVICE_CLASS_INTERACTIVE,
    )


async def stream_generate(
    channel: grpc.aio.Channel,
    request: inference_pb2.GenerateRequest,
    on_text: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> ChatResult:
    """Send one Generate request and collect its stream, passing each delta's text to ``on_text``."""
    stub = inference_pb2_grpc.InferenceStub(channel)
    start = time.perf_counter()
    first_token_at: float | None = None
    pieces: list[str] = []
    result = None
    async for response in stub.Generate(request, timeout=timeout):
        if response.HasField("delta"):
            if first_token_at is None:
                first_token_at = time.perf_counter()
            pieces.append(response.delta.text)
            if on_text:
                on_text(response.delta.text)
        else:
            result = response.result
    end = time.perf_counter()
    if result is None:
        raise RuntimeError("the stream ended without a result message")
    return ChatResult(
        text="".join(pieces),
        num_completion_tokens=result.usage.completion_tokens,
        num_prompt_tokens=result.usage.prompt_tokens,
        finish_reason=common_pb2.FinishReason.Name(result.finish_reason),
        request_id=result.request_id,
        time_to_first_token=(first_token_at or end) - start,
        total_time=end - start,
    )
