import pytest

from services.common.engine.block_pool import BlockPool, prompt_block_hashes, slot_mapping


def test_allocate_and_free_keep_counts():
    pool = BlockPool(num_blocks=8, block_size=16)

    first = pool.allocate(3)
    second = pool.allocate(5)

    assert pool.num_free_blocks == 0
    assert len(set(first) | set(second)) == 8
    assert not pool.can_allocate(1)
    pool.free(first)
    assert pool.num_free_blocks == 3
    assert pool.can_allocate(3)
    assert not pool.can_allocate(4)
    pool.free(second)
    assert pool.num_free_blocks == 8


def test_freed_blocks_are_reused():
    pool = BlockPool(num_blocks=2, block_size=4)
    blocks = pool.allocate(2)
    pool.free(blocks)

    assert sorted(pool.allocate(2)) == sorted(blocks)


def test_double_free_is_an_error():
    pool = BlockPool(num_blocks=2, block_size=4)
    blocks = pool.allocate(1)
    pool.free(blocks)

    with pytest.raises(AssertionError):
        pool.free(blocks)


def test_allocate_beyond_free_is_an_error():
    pool = BlockPool(num_blocks=2, block_size=4)

    with pytest.raises(AssertionError):
        pool.allocate(3)


@pytest.mark.parametrize(("num_tokens", "num_blocks"), [(0, 0), (1, 1), (16, 1), (17, 2), (33, 3)])
def test_num_blocks_for_rounds_up(num_tokens, num_blocks):
    assert BlockPool(num_blocks=4, block_size=16).num_blocks_for(num_tokens) == num_blocks


def test_slot_mapping_follows_block_table():
    # Positions 2..5 with 4-token blocks: block 7 offsets 2, 3, then block 3 offsets 0, 1.
    assert slot_mapping([7, 3], start_position=2, num_tokens=4, block_size=4) == [30, 31, 12, 13]


def test_pool_rejects_invalid_sizes():
    with pytest.raises(ValueError):
        BlockPool(num_blocks=0, block_size=16)


def test_cached_block_is_shared_and_counted_once():
    pool = BlockPool(num_blocks=4, block_size=2)
    [first] = pool.allocate(1)
    pool.cache(first, b"prefix")

    shared = pool.allocate(1, shared_block_ids=[first])

    assert shared[0] == first
    assert pool.num_free_blocks == 2
    pool.free([first])
    assert pool.num_free_blocks == 2
    pool.free(shared)
    # Both users are gone: the cached block and the new one count as free.
    assert pool.num_free_blocks == 4
    assert pool.find_cached_prefix([b"prefix"]) == [first]


def test_cached_prefix_stops_at_first_miss():
    pool = BlockPool(num_blocks=4, block_size=2)
    blocks = pool.allocate(3)
    pool.cache(blocks[0], b"a")
    pool.cache(blocks[2], b"c")

    assert pool.find_cached_prefix([b"a", b"b", b"c"]) == [blocks[0]]


def test_allocate_evicts_least_recently_freed_cached_block():
    pool = BlockPool(num_blocks=2, block_size=2)
    old, recent = pool.allocate(2)
    pool.cache(old, b"old")
    pool.cache(recent, b"recent")
    pool.free([old])
    pool.free([recent])

    [block] = pool.allocate(1)

    assert block == old
    assert pool.find_cached_prefix([b"old"]) == []
    assert pool.find_cached_prefix([b"recent"]) == [recent]


def test_reusing_evictable_block_reduces_free_count():
    pool = BlockPool(num_blocks=2, block_size=2)
    cached, other = pool.allocate(2)
    pool.cache(cached, b"prefix")
    pool.free([cached, other])

    assert pool.can_allocate(1, shared_block_ids=[cached])
    assert not pool.can_allocate(2, shared_block_ids=[cached])


def test_first_block_per_hash_stays_cached():
    pool = BlockPool(num_blocks=2, block_size=2)
    first, second = pool.allocate(2)
    pool.cache(first, b"same")
    pool.cache(second, b"same")
    pool.free([second])

    assert pool.find_cached_prefix([b"same"]) == [first]
    assert pool.num_cached_blocks == 1


def test_block_hashes_cover_full_blocks_and_their_prefix():
    hashes = prompt_block_hashes("alpha", [1, 2, 3, 4, 5], block_size=2)
    other_tail = prompt_block_hashes("alpha", [1, 2, 9, 4], block_size=2)

    assert len(hashes) == 2
    assert other_tail[0] == hashes[0]
    # The second block has the same tokens but follows a different first block.
    assert prompt_block_hashes("alpha", [9, 9, 3, 4], block_size=2)[1] != hashes[1]
    assert other_tail[1] != hashes[1]


def test_block_hashes_differ_between_tenants():
    assert prompt_block_hashes("alpha", [1, 2], 2) != prompt_block_hashes("beta", [1, 2], 2)
