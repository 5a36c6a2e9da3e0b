"""Tokenizers of the configured models, used to count and send prompt tokens."""

from __future__ import annotations

import asyncio
import logging

from services.common.config import Config, ModelConfig
from services.common.errors import InvalidArgument
from services.common.gguf_tokenizer import ChatTokenizer, load_chat_tokenizer
from tenantserve.v1 import inference_pb2

from .validation import chat_messages

logger = logging.getLogger(__name__)


class PromptTokenizer:
    """Turn a request's prompt into token ids with its model's GGUF tokenizer."""

    def __init__(self, tokenizers: dict[str, ChatTokenizer]) -> None:
        self._tokenizers = tokenizers

    @classmethod
    def load(cls, config: Config) -> PromptTokenizer:
        """Load the tokenizer of every configured model.

        Raises ConfigError for a model whose GGUF package is missing, and
        OSError or TokenizerError for a file without a usable tokenizer.
        """
        tokenizers = {}
        for model in config.models:
            path = model.gguf_path()
            tokenizers[model.name] = load_chat_tokenizer(path)
            logger.info("loaded the tokenizer of model %s from %s", model.name, path)
        return cls(tokenizers)

    def check_size(self, request: inference_pb2.GenerateRequest, model: ModelConfig) -> None:
        """Reject a prompt whose size in bytes proves it cannot fit the context, before any tokenizing.

        Raises InvalidArgument naming the input field. This bounds the work a
        single request can cause before its tenant's limits are checked.
        """
        max_bytes = model.max_context_tokens * self._tokenizers[model.name].max_token_bytes
        if request.WhichOneof("input") == "prompt":
            field, num_bytes = "prompt", len(request.prompt.encode())
        else:
            field = "messages"
            num_bytes = sum(len(message.content.encode()) for message in request.messages.messages)
        if num_bytes > max_bytes:
            raise InvalidArgument(
                field,
                f"{num_bytes} bytes cannot fit the context of {model.max_context_tokens} tokens "
                f"of model {model.name!r} (at most {max_bytes} bytes)",
            )

    async def tokenize(self, request: inference_pb2.GenerateRequest, model: ModelConfig) -> list[int]:
        """Return the prompt token ids: chat messages go through the chat template, a raw prompt does not.

        Runs in a worker thread, and the tokenizer releases the GIL, so that a
        long prompt does not stall other streams.
        """
        tokenizer = self._tokenizers[model.name]
        if request.WhichOneof("input") == "prompt":
            return await asyncio.to_thread(tokenizer.encode, request.prompt)
        return await asyncio.to_thread(tokenizer.encode_chat, chat_messages(request))
