import pytest

from services.common.engine.block_pool import BlockPool, slot_mapping


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
