"""Factories for the engine tests: the real model's tokenizer and plain requests."""

from __future__ import annotations

import functools

from services.common.config import load_config
from services.common.engine.detokenizer import IncrementalDetokenizer
from services.common.engine.request import Request, SamplingParams
from services.common.gguf_tokenizer import ChatTokenizer, load_chat_tokenizer


@functools.cache
def model_tokenizer() -> ChatTokenizer:
    """The tokenizer of the configured model, loaded once per test process."""
    return load_chat_tokenizer(load_config().models[0].gguf_path())


def make_request(request_id: str, num_prompt_tokens: int = 10, max_tokens: int = 8) -> Request:
    return Request(
        request_id=request_id,
        tenant_id="alpha",
        prompt_token_ids=[100] * num_prompt_tokens,
        sampling=SamplingParams(max_tokens=max_tokens),
        seed=0,
        detokenizer=IncrementalDetokenizer([b""] * 200),
    )
