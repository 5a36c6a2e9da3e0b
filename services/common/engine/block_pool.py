"""Pool of fixed-size KV cache blocks, with a cache of full prompt blocks.

The KV cache is split into blocks of ``block_size`` token slots. A request
owns a block table, the list of its block ids in position order: position
``p`` lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

Prefix caching: once a prompt is prefilled, each of its full blocks is
registered under a hash of the tenant id and every token up to the block's
end. A later prompt of the same tenant that starts with the same tokens
shares those blocks, read-only, and skips their prefill. A cached block
whose last user has finished stays cached and counts as free. allocate()
reuses such blocks for new tokens only when no uncached block is left, and
takes the least recently freed one first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        # Blocks with no user and no cached content.
        self._free_block_ids: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._hash_of_block: dict[int, bytes] = {}
        self._block_of_hash: dict[bytes, int] = {}
        # Cached blocks with no user, least recently freed first.
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free_blocks(self) -> int:
        """Blocks that allocate() can hand out, cached ones without a user included."""
        return len(self._free_block_ids) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_of_block)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int, shared_block_ids: Sequence[int] = ()) -> bool:
        """Check that ``num_blocks`` new blocks fit once ``shared_block_ids`` (cache hits) are in use."""
        num_reclaimed = sum(1 for block_id in shared_block_ids if block_id in self._evictable)
        return num_blocks <= self.num_free_blocks - num_reclaimed

    def allocate(self, num_blocks: int, shared_block_ids: Sequence[int] = ()) -> list[int]:
        """Return ``shared_block_ids`` followed by ``num_blocks`` new blocks; check can_allocate first."""
        assert self.can_allocate(num_blocks, shared_block_ids), (
            f"allocate({num_blocks}) with {self.num_free_blocks} free blocks"
        )
        for block_id in shared_block_ids:
            self._evictable.pop(block_id, None)
            self._ref_counts[block_id] += 1
        new_block_ids = [self._take_block() for _ in range(num_blocks)]
        return [*shared_block_ids, *new_block_ids]

    def free(self, block_ids: Iterable[int]) -> None:
        # Reversed, so that the tail blocks of a prompt are evicted before its head.
        for block_id in reversed(list(block_ids)):
            assert self._ref_counts[block_id] > 0, f"block {block_id} freed but not allocated"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] > 0:
                continue
            if block_id in self._hash_of_block:
                self._evictable[block_id] = None
            else:
                self._free_block_ids.append(block_id)

    def find_cached_prefix(self, block_hashes: Sequence[bytes]) -> list[int]:
        """Return the cached blocks for the longest prefix of ``block_hashes``."""
        block_ids = []
        for block_hash in block_hashes:
            block_id = self._block_of_hash.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Register an allocated block whose keys and values are complete; the first block per hash wins."""
        assert self._ref_counts[block_id] > 0, f"block {block_id} cached but not allocated"
        if block_hash in self._block_of_hash or block_id in self._hash_of_block:
            return
        self._block_of_hash[block_hash] = block_id
        self._hash_of_block[block_id] = block_hash

    def _take_block(self) -> int:
        if self._free_block_ids:
            block_id = self._free_block_ids.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            del self._block_of_hash[self._hash_of_block.pop(block_id)]
        self._ref_counts[block_id] = 1
        return block_id


def prompt_block_hashes(tenant_id: str, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Hash each full block of ``token_ids`` together with everything before it.

    The tenant id is part of the first hash, so tenants never share blocks
    and one tenant cannot learn from response times which prompts another
    tenant sent. SHA-256 makes a collision, which would hand one prompt
    another prompt's keys and values, practically impossible.
    """
    digest = hashlib.sha256(tenant_id.encode()).digest()
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        digest = hashlib.sha256(digest + b"".join(token_id.to_bytes(4, "little") for token_id in block)).digest()
        hashes.append(digest)
    return hashes


def slot_mapping(block_table: Sequence[int], start_position: int, num_tokens: int, block_size: int) -> list[int]:
    """Return the cache slot of each position in [start_position, start_position + num_tokens)."""
    return [
        block_table[position // block_size] * block_size + position % block_size
        for position in range(start_position, start_position + num_tokens)
    ]
