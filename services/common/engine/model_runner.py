"""Interface between the engine and a model implementation (PyTorch, JAX)."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from services.common.engine.request import SamplingParams


@dataclass(frozen=True)
class SequenceInput:
    """One sequence of a model step."""

    request_id: str
    # Tokens to run through the model: the whole prompt at prefill, the last
    # sampled token at decode.
    token_ids: list[int]
    # Position of token_ids[0]; the KV cache contains the positions before it.
    # A prefill starts after the prompt blocks found in the prefix cache, so
    # it can be above 0.
    start_position: int
    # KV cache block ids of the sequence, in position order.
    block_table: list[int]
    sampling: SamplingParams
    # Seed of the sequence's random generator, fixed for the request's lifetime.
    seed: int


@dataclass(frozen=True)
class ModelInput:
    prefills: list[SequenceInput]
    decodes: list[SequenceInput]


class ModelRunner(abc.ABC):
    """Runs the model over one step's batch with a paged KV cache.

    A runner owns ``num_kv_blocks`` blocks of ``kv_block_size`` token slots.
    The engine hands out block ids in [0, num_kv_blocks); the runner writes
    the keys and values of position ``p`` of a sequence to slot
    ``block_table[p // kv_block_size] * kv_block_size + p % kv_block_size``.
    """

    num_kv_blocks: int
    kv_block_size: int
    # Positions the model supports, from the model file.
    max_position: int

    def initialize(self) -> None:
        """Allocate device state such as the KV cache; the engine calls it once on its thread."""

    @abc.abstractmethod
    def execute(self, batch: ModelInput) -> list[int]:
        """Process each sequence's new tokens and sample its next token.

        Returns one token id per sequence, prefills first, then decodes, in
        the order given.
        """

    @abc.abstractmethod
    def release(self, request_id: str) -> None:
        """Drop per-request state such as the request's random generator."""
