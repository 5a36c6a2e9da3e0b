"""Llama decoder in PyTorch that reads and writes a paged KV cache.

One forward call processes a padded batch of sequences, each with Q new
tokens (Q = 1 for decode, the prompt length for prefill). The new keys and
values go to their cache slots first; then each sequence's keys and values
are gathered from its slots and attention runs under a mask that hides
padding and future positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from services.worker_gpu.gguf_loader import LlamaConfig, LlamaWeights


@dataclass(frozen=True)
class AttentionInput:
    """Per-step index tensors that every layer shares."""

    # Cache slot each new token's key and value are written to.
    write_slots: torch.Tensor  # [B * Q] int64
    # Cache slots each sequence attends to, in position order.
    read_slots: torch.Tensor  # [B, L] int64
    # True where query q of sequence b may attend to key position l.
    mask: torch.Tensor  # [B, 1, Q, L] bool
    cos: torch.Tensor  # [B, Q, 1, head_dim]
    sin: torch.Tensor  # [B, Q, 1, head_dim]


class LlamaLayer:
    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor]) -> None:
        self.config = config
        self.attn_norm = weights["attn_norm"]
        # q, k and v share one matmul, and so do gate and up.
        self.qkv_proj = weights["qkv_proj"]  # [(H + 2 * KVH) * D, hidden]
        self.o_proj = weights["o_proj"]
        self.ffn_norm = weights["ffn_norm"]
        self.gate_up_proj = weights["gate_up_proj"]  # [2 * intermediate, hidden]
        self.down_proj = weights["down_proj"]

    def forward(self, hidden: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionInput) -> torch.Tensor:
        hidden = hidden + self._attention(rms_norm(hidden, self.attn_norm, self.config.rms_norm_eps), kv_cache, attn)
        return hidden + self._mlp(rms_norm(hidden, self.ffn_norm, self.config.rms_norm_eps))

    def _attention(self, x: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionInput) -> torch.Tensor:
        config = self.config
        batch_size, num_queries, _ = x.shape
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        q, k, v = F.linear(x, self.qkv_proj).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rotary(q.view(batch_size, num_queries, config.num_heads, config.head_dim), attn.cos, attn.sin)
        k = apply_rotary(k.view(batch_size, num_queries, config.num_kv_heads, config.head_dim), attn.cos, attn.sin)
        v = v.view(batch_size, num_queries, config.num_kv_heads, config.head_dim)

        # kv_cache: [2, num_slots, KVH, D] for this layer.
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        key_cache.index_copy_(0, attn.write_slots, k.reshape(-1, config.num_kv_heads, config.head_dim))
        value_cache.index_copy_(0, attn.write_slots, v.reshape(-1, config.num_kv_heads, config.head_dim))
        keys = key_cache[attn.read_slots].transpose(1, 2)  # [B, KVH, L, D]
        values = value_cache[attn.read_slots].transpose(1, 2)

        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=attn.mask, enable_gqa=True)
        return F.linear(out.transpose(1, 2).reshape(batch_size, num_queries, q_size), self.o_proj)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj)


class LlamaModel:
    """Weights on one device plus the forward pass; holds no per-request state."""

    def __init__(self, weights: LlamaWeights, device: torch.device, dtype: torch.dtype) -> None:
        config = weights.config
        self.config = config
        self.device = device
        self.dtype = dtype

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(device=device, dtype=dtype)

        self.embed_tokens = tensor(weights.embed_tokens)
        self.lm_head = self.embed_tokens if weights.lm_head is weights.embed_tokens else tensor(weights.lm_head)
        self.final_norm = tensor(weights.final_norm)
        self.layers = [
            LlamaLayer(
                config,
                {
                    "attn_norm": tensor(layer.attn_norm),
                    "qkv_proj": tensor(np.concatenate([layer.q_proj, layer.k_proj, layer.v_proj])),
                    "o_proj": tensor(layer.o_proj),
                    "ffn_norm": tensor(layer.ffn_norm),
                    "gate_up_proj": tensor(np.concatenate([layer.gate_proj, layer.up_proj])),
                    "down_proj": tensor(layer.down_proj),
                },
            )
            for layer in weights.layers
        ]
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim))
        angles = torch.outer(torch.arange(config.max_position, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [max_position, head_dim]
        self.rotary_cos = angles.cos().to(device=device, dtype=dtype)
        self.rotary_sin = angles.sin().to(device=device, dtype=dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionInput
    ) -> torch.Tensor:
        """Run the decoder; returns the final hidden states [B, Q, hidden] before the norm.

        ``kv_cache`` is [num_layers, 2, num_slots, num_kv_heads, head_dim].
        """
        hidden = F.embedding(input_ids, self.embed_tokens)
        for layer, layer_cache in zip(self.layers, kv_cache):
            hidden = layer.forward(hidden, layer_cache, attn)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return float32 logits [N, vocab] for hidden states [N, hidden]."""
        return F.linear(rms_norm(hidden, self.final_norm, self.config.rms_norm_eps), self.lm_head).float()

    def rotary_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos and sin [B, Q, 1, head_dim] for positions [B, Q]."""
        return self.rotary_cos[positions].unsqueeze(2), self.rotary_sin[positions].unsqueeze(2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in float32 so that bfloat16 and float16 keep their precision.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32.to(x.dtype) * weight


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding; x is [B, Q, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
