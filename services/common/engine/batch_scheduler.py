"""Continuous batching: which requests run in the next model step.

Every step decodes one token for each running request. Waiting requests
join at the next step once a batch slot and their KV cache blocks are free,
and finished requests leave at once, so no request waits for another to
finish. A request reserves the blocks for its whole context (prompt plus
max_tokens, capped at the context length) when it is admitted, so a running
request never runs out of cache and is never preempted. Full prompt blocks
that are in the prefix cache are shared instead of reserved, and their
tokens are not prefilled again.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from services.common.engine.block_pool import BlockPool, prompt_block_hashes
from services.common.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int
    # Requests accepted but not yet running.
    max_waiting: int
    # Prompt plus completion tokens of one request.
    max_model_len: int
    # Prompt tokens prefilled in one step; a longer prompt still runs alone.
    max_num_prefill_tokens: int = 2048
    # Share the KV cache blocks of identical prompt prefixes within a tenant.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_waiting", "max_model_len", "max_num_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledStep:
    # Requests admitted in this step, whose prompts are prefilled now.
    prefills: list[Request] = field(default_factory=list)
    # Running requests that decode one token.
    decodes: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_sequences(self) -> int:
        return len(self.prefills) + len(self.decodes)


class BatchScheduler:
    def __init__(self, config: BatchConfig, block_pool: BlockPool) -> None:
        self.config = config
        self.block_pool = block_pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def num_blocks_needed(self, request: Request) -> int:
        num_tokens = min(request.num_prompt_tokens + request.sampling.max_tokens, self.config.max_model_len)
        return self.block_pool.num_blocks_for(num_tokens)

    def can_add(self) -> bool:
        return len(self.waiting) < self.config.max_waiting

    def add(self, request: Request) -> None:
        """Queue ``request``; the caller checks can_add and validates the prompt length."""
        assert self.can_add(), "waiting queue is full"
        self.waiting.append(request)

    def schedule(self) -> ScheduledStep:
        """Admit waiting requests in arrival order and return the step's batch."""
        step = ScheduledStep(decodes=list(self.running))
        num_prefill_tokens = 0
        while self.waiting and len(self.running) < self.config.max_batch_size:
            request = self.waiting[0]
            cached_block_ids = self._find_cached_prefix(request)
            num_new_tokens = request.num_prompt_tokens - len(cached_block_ids) * self.block_pool.block_size
            # The first prompt of a step is admitted whatever its length.
            if step.prefills and num_prefill_tokens + num_new_tokens > self.config.max_num_prefill_tokens:
                break
            num_new_blocks = self.num_blocks_needed(request) - len(cached_block_ids)
            # Admission stays in arrival order: a request that does not fit
            # blocks the ones behind it instead of being overtaken forever.
            if not self.block_pool.can_allocate(num_new_blocks, cached_block_ids):
                break
            self.waiting.popleft()
            self._admit(request, cached_block_ids, num_new_blocks)
            step.prefills.append(request)
            num_prefill_tokens += num_new_tokens
        return step

    def cache_prompt_blocks(self, request: Request) -> None:
        """Offer the request's full prompt blocks to the prefix cache once they are prefilled."""
        for block_id, block_hash in zip(request.block_table, request.block_hashes or ()):
            self.block_pool.cache(block_id, block_hash)

    def _find_cached_prefix(self, request: Request) -> list[int]:
        if not self.config.enable_prefix_caching:
            return []
        if request.block_hashes is None:
            request.block_hashes = prompt_block_hashes(
                request.tenant_id, request.prompt_token_ids, self.block_pool.block_size
            )
        cached_block_ids = self.block_pool.find_cached_prefix(request.block_hashes)
        # At least one prompt token must run through the model to give the
        # logits of the first completion token.
        max_cached_blocks = (request.num_prompt_tokens - 1) // self.block_pool.block_size
        return cached_block_ids[:max_cached_blocks]

    def _admit(self, request: Request, cached_block_ids: list[int], num_new_blocks: int) -> None:
        request.block_table = self.block_pool.allocate(num_new_blocks, cached_block_ids)
        request.num_computed_tokens = len(cached_block_ids) * self.block_pool.block_size
        request.num_cached_tokens = request.num_computed_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def finish(self, request: Request) -> None:
        """Remove ``request`` from the waiting queue or the batch and free its blocks."""
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        self.block_pool.free(request.block_table)
        request.block_table = []
        request.status = RequestStatus.FINISHED
