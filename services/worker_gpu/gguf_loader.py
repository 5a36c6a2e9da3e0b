"""Load a llama-architecture GGUF file into float32 numpy weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize

logger = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The GGUF file is not a llama model this worker can run."""


@dataclass(frozen=True)
class LlamaConfig:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    # Context length the model was trained for.
    max_position: int


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray  # [hidden]
    # Rows of q and k in the rotate-half order of the Hugging Face checkpoint.
    q_proj: np.ndarray  # [num_heads * head_dim, hidden]
    k_proj: np.ndarray  # [num_kv_heads * head_dim, hidden]
    v_proj: np.ndarray  # [num_kv_heads * head_dim, hidden]
    o_proj: np.ndarray  # [hidden, num_heads * head_dim]
    ffn_norm: np.ndarray  # [hidden]
    gate_proj: np.ndarray  # [intermediate, hidden]
    up_proj: np.ndarray  # [intermediate, hidden]
    down_proj: np.ndarray  # [hidden, intermediate]


@dataclass(frozen=True)
class LlamaWeights:
    config: LlamaConfig
    embed_tokens: np.ndarray  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: np.ndarray  # [hidden]
    # The embedding matrix when the model ties input and output embeddings.
    lm_head: np.ndarray  # [vocab, hidden]


def load_llama_gguf(path: Path) -> LlamaWeights:
    """Read and dequantize every tensor of a llama GGUF file.

    Raises ModelLoadError for another architecture or an unsupported rope
    scaling, and OSError when the file cannot be read.
    """
    reader = gguf.GGUFReader(path)
    config = _read_config(reader.fields, path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}

    def load(name: str) -> np.ndarray:
        if name not in tensors:
            raise ModelLoadError(f"{path}: tensor {name} is missing")
        tensor = tensors[name]
        # Both GGUFReader and dequantize return arrays in numpy (row-major)
        # order, the reverse of the shape GGUF lists, so a weight comes out
        # as [out_features, in_features] like torch.nn.Linear.weight.
        array = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        # F32 tensors come back as read-only views of the memory-mapped file.
        return array if array.flags.writeable else array.copy()

    layers = [_load_layer(load, config, index) for index in range(config.num_layers)]
    embed_tokens = load("token_embd.weight")
    lm_head = load("output.weight") if "output.weight" in tensors else embed_tokens
    weights = LlamaWeights(config, embed_tokens, layers, load("output_norm.weight"), lm_head)
    logger.info("loaded %s: %s layers, hidden size %s", path.name, config.num_layers, config.hidden_size)
    return weights


def _read_config(fields: dict[str, Any], path: Path) -> LlamaConfig:
    def value(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        if field is None:
            if default is None:
                raise ModelLoadError(f"{path}: metadata key {key} is missing")
            return default
        return field.contents()

    architecture = value("general.architecture")
    if architecture != "llama":
        raise ModelLoadError(f"{path}: architecture {architecture!r} is not supported; only llama is")
    rope_scaling = value("llama.rope.scaling.type", "none")
    if rope_scaling != "none":
        raise ModelLoadError(f"{path}: rope scaling {rope_scaling!r} is not supported")

    hidden_size = int(value("llama.embedding_length"))
    num_heads = int(value("llama.attention.head_count"))
    return LlamaConfig(
        num_layers=int(value("llama.block_count")),
        hidden_size=hidden_size,
        intermediate_size=int(value("llama.feed_forward_length")),
        num_heads=num_heads,
        num_kv_heads=int(value("llama.attention.head_count_kv", num_heads)),
        head_dim=int(value("llama.rope.dimension_count", hidden_size // num_heads)),
        vocab_size=len(fields["tokenizer.ggml.tokens"].data),
        rope_theta=float(value("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(value("llama.attention.layer_norm_rms_epsilon")),
        max_position=int(value("llama.context_length")),
    )


def _load_layer(load: Any, config: LlamaConfig, index: int) -> LayerWeights:
    prefix = f"blk.{index}."
    return LayerWeights(
        attn_norm=load(prefix + "attn_norm.weight"),
        q_proj=_unpermute_rotary_rows(load(prefix + "attn_q.weight"), config.num_heads),
        k_proj=_unpermute_rotary_rows(load(prefix + "attn_k.weight"), config.num_kv_heads),
        v_proj=load(prefix + "attn_v.weight"),
        o_proj=load(prefix + "attn_output.weight"),
        ffn_norm=load(prefix + "ffn_norm.weight"),
        gate_proj=load(prefix + "ffn_gate.weight"),
        up_proj=load(prefix + "ffn_up.weight"),
        down_proj=load(prefix + "ffn_down.weight"),
    )


def _unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo the row permutation that llama.cpp's converter applies to q and k.

    convert_hf_to_gguf.py reorders each head's rows from the rotate-half
    layout (first half, second half) to interleaved pairs, for llama.cpp's
    rotary kernel. Restoring the order lets the model use rotate-half rotary.
    """
    rows, columns = weight.shape
    head_dim = rows // num_heads
    return np.ascontiguousarray(
        weight.reshape(num_heads, head_dim // 2, 2, columns).swapaxes(1, 2).reshape(rows, columns)
    )
