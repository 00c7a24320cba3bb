import pytest

from serving.engine.block_pool import BlockPool, NoFreeBlocks


def test_allocates_in_order_and_reuses_least_recently_freed_first():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    pool.free([1])
    pool.free([0])
    assert pool.num_free == 3 and pool.num_used == 1
    assert pool.allocate(3) == [3, 1, 0]  # 3 was never used, then 1 (freed first), then 0
    assert pool.num_free == 0


def test_shared_blocks_return_to_the_queue_when_the_last_holder_frees():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.share([block])
    assert pool.ref_count(block) == 2
    pool.free([block])
    assert pool.ref_count(block) == 1 and pool.num_free == 1
    pool.free([block])
    assert pool.ref_count(block) == 0 and pool.num_free == 2
    assert pool.allocate(2) == [1, 0]


def test_over_allocation_raises_and_changes_nothing():
    pool = BlockPool(2)
    pool.allocate(1)
    with pytest.raises(NoFreeBlocks):
        pool.allocate(2)
    assert pool.num_free == 1


def test_double_free_is_an_invariant_violation():
    pool = BlockPool(1)
    pool.allocate(1)
    pool.free([0])
    with pytest.raises(AssertionError):
        pool.free([0])


def test_empty_pool():
    pool = BlockPool(0)
    assert pool.allocate(0) == [] and pool.num_free == 0
    with pytest.raises(ValueError):
        BlockPool(-1)
