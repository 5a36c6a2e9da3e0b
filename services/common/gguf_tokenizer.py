"""Chat tokenizer built from the tokenizer metadata of a GGUF model file.

Supports the byte-level BPE tokenizers that llama.cpp stores as
``tokenizer.ggml.model = gpt2``. The pre-tokenizer follows llama.cpp's
definition for the ``tokenizer.ggml.pre`` value. For ``smollm`` and the other
StarCoder-style vocabularies it splits every digit into its own piece before
the GPT-2 regex, and for ``gpt2`` it applies the GPT-2 regex alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import jinja2.sandbox
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")

# llama.cpp (src/llama-vocab.cpp) splits digits one by one before the GPT-2
# regex for these pre-tokenizer types.
_DIGIT_SPLIT_PRE_TYPES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
_PLAIN_GPT2_PRE_TYPES = frozenset({"gpt2", "default", "mpt", "olmo", "jais"})

# Control tokens that end a turn in common chat formats. llama.cpp
# (src/llama-vocab.cpp) treats these names, among others, as
# end-of-generation tokens besides the declared eos token.
_END_OF_TURN_TOKENS = frozenset({"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>"})

# Values of tokenizer.ggml.token_type (gguf.TokenType).
_TOKEN_TYPE_CONTROL = int(gguf.TokenType.CONTROL)
_TOKEN_TYPE_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)


class TokenizerError(ValueError):
    """The GGUF file has no usable tokenizer, or a chat is invalid."""


@dataclass(frozen=True)
class TokenizerMetadata:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre_type: str
    chat_template: str
    bos_token_id: int | None
    eos_token_id: int


def load_chat_tokenizer(gguf_path: Path) -> ChatTokenizer:
    """Build a ChatTokenizer from the tokenizer metadata of ``gguf_path``.

    Raises TokenizerError when the file has no byte-level BPE tokenizer or
    no chat template, and OSError when it cannot be read.
    """
    reader = gguf.GGUFReader(gguf_path)
    return ChatTokenizer(read_tokenizer_metadata(reader.fields, gguf_path))


def read_tokenizer_metadata(fields: Mapping[str, Any], source: Path | str) -> TokenizerMetadata:
    def value(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        return default if field is None else field.contents()

    model_type = value("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise TokenizerError(f"{source}: tokenizer.ggml.model is {model_type!r}; only byte-level BPE ('gpt2') is supported")
    chat_template = value("tokenizer.chat_template")
    if not chat_template:
        raise TokenizerError(f"{source}: tokenizer.chat_template is missing")
    eos_token_id = value("tokenizer.ggml.eos_token_id")
    if eos_token_id is None:
        raise TokenizerError(f"{source}: tokenizer.ggml.eos_token_id is missing")
    return TokenizerMetadata(
        tokens=value("tokenizer.ggml.tokens"),
        token_types=value("tokenizer.ggml.token_type"),
        merges=value("tokenizer.ggml.merges"),
        pre_type=value("tokenizer.ggml.pre", "default"),
        chat_template=chat_template,
        bos_token_id=value("tokenizer.ggml.bos_token_id"),
        eos_token_id=int(eos_token_id),
    )


class ChatTokenizer:
    """Encode text and chats to token ids and decode token ids to text.

    Control tokens such as ``<|im_start|>`` are recognised only in the text
    that the chat template itself adds. Message contents are encoded as plain
    text, so a message that contains ``<|im_end|>`` cannot end its turn early.
    """

    ROLES = ROLES

    def __init__(self, metadata: TokenizerMetadata) -> None:
        self.eos_token_id = metadata.eos_token_id
        self.bos_token_id = metadata.bos_token_id
        self.vocab_size = len(metadata.tokens)
        self.special_token_ids = frozenset(
            i for i, t in enumerate(metadata.token_types) if t in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
        )
        self._plain = _build_bpe(metadata)
        self._with_special = _build_bpe(metadata)
        self._with_special.add_special_tokens(
            [AddedToken(metadata.tokens[i], special=True, normalized=False) for i in sorted(self.special_token_ids)]
        )
        # The same environment options as Hugging Face transformers' apply_chat_template.
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.globals["raise_exception"] = _raise_template_error
        self._template = environment.from_string(metadata.chat_template)
        self._template_variables = {
            "bos_token": metadata.tokens[metadata.bos_token_id] if metadata.bos_token_id is not None else "",
            "eos_token": metadata.tokens[metadata.eos_token_id],
        }
        # Token ids that end a completion: eos and the end-of-turn control tokens.
        self.stop_token_ids = frozenset(
            {self.eos_token_id} | {i for i in self.special_token_ids if metadata.tokens[i] in _END_OF_TURN_TOKENS}
        )
        # Bytes each token id decodes to, for incremental detokenizing.
        self.token_bytes = _token_bytes_table(metadata.tokens, self.special_token_ids)
        # No token covers more input bytes than this, so a text of more than
        # max_token_bytes * N bytes cannot encode to N tokens or fewer.
        self.max_token_bytes = max(len(b) for b in self.token_bytes)

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` as plain text: control token names are not special here."""
        # encode_batch releases the GIL while encode holds it, so a long text
        # encoded on a worker thread does not stall the caller's event loop.
        return self._plain.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Render ``messages`` (role, content) with the chat template and encode them.

        Appends the assistant generation prompt. Raises TokenizerError for an
        unknown role or an empty chat.
        """
        if not messages:
            raise TokenizerError("a chat needs at least one message")
        for role, _ in messages:
            if role not in ROLES:
                raise TokenizerError(f"role {role!r} is invalid; use one of {', '.join(ROLES)}")

        # Each content is replaced by a marker so that the template's own text
        # (with control tokens) and the contents (plain text) are encoded apart.
        markers = [f"\x00content{i}\x00" for i in range(len(messages))]
        rendered = self._template.render(
            messages=[{"role": role, "content": marker} for (role, _), marker in zip(messages, markers)],
            add_generation_prompt=True,
            **self._template_variables,
        )
        ids: list[int] = []
        for index, marker in enumerate(markers):
            template_text, found, rendered = rendered.partition(marker)
            if not found:
                raise TokenizerError("the chat template does not render every message content exactly once")
            ids += self._with_special.encode(template_text, add_special_tokens=False).ids
            ids += self.encode(messages[index][1])
        ids += self._with_special.encode(rendered, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode ``ids``; invalid UTF-8 becomes U+FFFD. Control tokens are dropped unless asked for."""
        return self._with_special.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _raise_template_error(message: str) -> None:
    raise TokenizerError(f"the chat template rejected the chat: {message}")


def _build_bpe(metadata: TokenizerMetadata) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(metadata.tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if metadata.pre_type in _DIGIT_SPLIT_PRE_TYPES:
        digits = pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    elif metadata.pre_type in _PLAIN_GPT2_PRE_TYPES:
        tokenizer.pre_tokenizer = byte_level
    else:
        raise TokenizerError(f"tokenizer.ggml.pre {metadata.pre_type!r} is not supported")
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _token_bytes_table(tokens: Sequence[str], special_token_ids: frozenset[int]) -> list[bytes]:
    """Map each token id to the bytes it decodes to; control tokens map to b""."""
    byte_of_char = {char: byte for byte, char in _bytes_to_unicode().items()}
    table: list[bytes] = []
    for token_id, token in enumerate(tokens):
        if token_id in special_token_ids:
            table.append(b"")
            continue
        table.append(bytes(byte_of_char[char] for char in token))
    return table


def _bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's reversible mapping from each byte to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {byte: chr(byte) for byte in printable}
    next_code = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_code)
            next_code += 1
    return mapping
