"""Pool of fixed-size KV cache blocks.

The KV cache is split into blocks of ``block_size`` token slots. A request
owns a block table, the list of its block ids in position order: position
``p`` lives in slot ``block_table[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        self._free_block_ids: deque[int] = deque(range(num_blocks))
        self._allocated: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free_block_ids)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` free blocks; the caller checks can_allocate first."""
        assert self.can_allocate(num_blocks), f"allocate({num_blocks}) with {self.num_free_blocks} free blocks"
        block_ids = [self._free_block_ids.popleft() for _ in range(num_blocks)]
        self._allocated.update(block_ids)
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        for block_id in block_ids:
            assert block_id in self._allocated, f"block {block_id} freed but not allocated"
            self._allocated.remove(block_id)
            self._free_block_ids.append(block_id)


def slot_mapping(block_table: Sequence[int], start_position: int, num_tokens: int, block_size: int) -> list[int]:
    """Return the cache slot of each position in [start_position, start_position + num_tokens)."""
    return [
        block_table[position // block_size] * block_size + position % block_size
        for position in range(start_position, start_position + num_tokens)
    ]
