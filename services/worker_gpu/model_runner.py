"""PyTorch implementation of the engine's ModelRunner."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from services.common.engine import ModelInput, ModelRunner, SequenceInput
from services.worker_gpu.model import AttentionInput, LlamaModel
from services.worker_gpu.sampler import Sampler

logger = logging.getLogger(__name__)


class TorchModelRunner(ModelRunner):
    """ModelRunner over a LlamaModel, with one batched forward per step for
    the new prompts and one for the decoding sequences.

    The KV cache is one tensor, allocated by initialize() on the engine thread:
    [num_layers, 2, (num_kv_blocks + 1) * kv_block_size, num_kv_heads, head_dim].
    The extra last block is scratch space: padding tokens write there and
    padded read positions point there, always under a mask.

    NOTE: the tests run the CPU path only. The CUDA path (float32, bfloat16,
    float16) has not run on a GPU yet.
    """

    def __init__(self, model: LlamaModel, num_kv_blocks: int, kv_block_size: int) -> None:
        self.model = model
        self.num_kv_blocks = num_kv_blocks
        self.kv_block_size = kv_block_size
        self.max_position = model.config.max_position
        self.device = model.device
        self.kv_cache: torch.Tensor | None = None
        self._scratch_block_id = num_kv_blocks
        self._block_offsets = torch.arange(kv_block_size, device=model.device)
        self.sampler = Sampler()

    def initialize(self) -> None:
        # Zero-filling the cache runs an OpenMP parallel region; on the engine
        # thread it adds no second OpenMP team (see factory.load_model_async).
        # Zeros matter: a masked slot still enters attention with weight 0,
        # and 0 * NaN from uninitialized memory would be NaN.
        config = self.model.config
        num_slots = (self.num_kv_blocks + 1) * self.kv_block_size
        shape = (config.num_layers, 2, num_slots, config.num_kv_heads, config.head_dim)
        self.kv_cache = torch.zeros(shape, device=self.device, dtype=self.model.dtype)
        logger.info(
            "KV cache: %s blocks of %s tokens, %.1f MiB",
            self.num_kv_blocks,
            self.kv_block_size,
            self.kv_cache.numel() * self.kv_cache.element_size() / 2**20,
        )

    def execute(self, batch: ModelInput) -> list[int]:
        with torch.inference_mode():
            logits = [self._forward(seqs) for seqs in (batch.prefills, batch.decodes) if seqs]
            return self.sampler.sample(torch.cat(logits), batch.prefills + batch.decodes)

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)

    def _forward(self, sequences: Sequence[SequenceInput]) -> torch.Tensor:
        """Run one padded batch; returns the logits of each sequence's last token."""
        assert self.kv_cache is not None, "initialize() allocates the KV cache before the first step"
        input_ids, positions, num_new_tokens, block_tables = self._pad_inputs(sequences)
        attn = self._attention_input(positions, num_new_tokens, block_tables)
        hidden = self.model.forward(input_ids, positions, self.kv_cache, attn)
        last_index = (num_new_tokens - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return self.model.compute_logits(hidden.gather(1, last_index).squeeze(1))

    def _pad_inputs(
        self, sequences: Sequence[SequenceInput]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Build input_ids and positions [B, Q], new-token counts [B] and block tables [B, max_blocks].

        A padding token repeats the sequence's last position, so its query
        attends to the same keys as the last real token and its output is
        ignored.
        """
        num_queries = max(len(seq.token_ids) for seq in sequences)
        max_blocks = max(len(seq.block_table) for seq in sequences)
        input_ids, positions, block_tables = [], [], []
        for seq in sequences:
            num_new = len(seq.token_ids)
            num_padding = num_queries - num_new
            last_position = seq.start_position + num_new - 1
            input_ids.append(seq.token_ids + [0] * num_padding)
            positions.append(list(range(seq.start_position, last_position + 1)) + [last_position] * num_padding)
            block_tables.append(seq.block_table + [self._scratch_block_id] * (max_blocks - len(seq.block_table)))
        device = self.device
        return (
            torch.tensor(input_ids, device=device),
            torch.tensor(positions, device=device),
            torch.tensor([len(seq.token_ids) for seq in sequences], device=device),
            torch.tensor(block_tables, device=device),
        )

    def _attention_input(
        self, positions: torch.Tensor, num_new_tokens: torch.Tensor, block_tables: torch.Tensor
    ) -> AttentionInput:
        block_size = self.kv_block_size
        batch_size, num_queries = positions.shape
        # Tokens in each sequence's cache once this step's tokens are written.
        seq_lens = positions[:, -1] + 1  # [B]
        max_len = int(seq_lens.max())

        query_index = torch.arange(num_queries, device=self.device)
        is_padding = query_index[None, :] >= num_new_tokens[:, None]  # [B, Q]
        write_slots = block_tables.gather(1, positions // block_size) * block_size + positions % block_size
        scratch_slot = self._scratch_block_id * block_size
        write_slots = write_slots.masked_fill(is_padding, scratch_slot).view(-1)

        # Slots of positions [0, max_len) of each sequence, in position order.
        read_slots = (block_tables[:, :, None] * block_size + self._block_offsets).view(batch_size, -1)[:, :max_len]
        read_slots = read_slots.reshape(-1)
        key_positions = torch.arange(max_len, device=self.device)
        # Causal: a query attends to keys at or before its position. Keys past
        # the sequence's length are never within that bound for a real query.
        visible = key_positions[None, None, :] <= positions[:, :, None]  # [B, Q, L]
        # An additive mask, built once per step: SDPA would otherwise convert
        # a boolean mask in every layer.
        mask = torch.zeros(visible.shape, device=self.device, dtype=self.model.dtype)
        mask.masked_fill_(~visible, float("-inf"))

        cos, sin = self.model.rotary_tables(positions)
        return AttentionInput(write_slots=write_slots, read_slots=read_slots, mask=mask.unsqueeze(1), cos=cos, sin=sin)
