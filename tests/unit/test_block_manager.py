import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def seq(tokens, parent=None):
    return Sequence("r", 0, list(tokens), len(tokens), SamplingParams(), parent=parent)


def test_allocate_grows_block_table_and_free_returns_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(10))
    assert bm.allocate_slots(s, 10)
    assert len(s.block_ids) == 3 and bm.num_free_blocks == 5
    s.num_computed_tokens = 10
    assert bm.allocate_slots(s, 2)  # tokens 10, 11 fit in block 3
    assert len(s.block_ids) == 3
    s.num_computed_tokens = 12
    assert bm.allocate_slots(s, 1)
    assert len(s.block_ids) == 4
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_ids == []


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(range(12))
    assert not bm.allocate_slots(s, 12)
    assert s.block_ids == [] and bm.num_free_blocks == 2


def test_prefix_cache_hit_reuses_full_blocks_and_leaves_a_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(10))
    assert bm.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    b = seq(list(range(8)) + [99, 98, 97])
    hit = bm.get_computed_blocks(b)
    assert hit == a.block_ids[:2]
    assert bm.allocate_slots(b, b.num_tokens - 8, hit)
    assert b.num_computed_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    assert bm.blocks[a.block_ids[0]].ref_count == 2
    # an exact full-block prompt keeps its last block to compute (logits are needed)
    c = seq(range(8))
    assert bm.get_computed_blocks(c) == a.block_ids[:1]
    assert bm.stats.hits == 8 and bm.stats.queries == 10 + 11


def test_freed_cached_blocks_are_revived_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    assert bm.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    first, second = a.block_ids[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = seq([1, 2, 3, 4, 7])
    assert bm.get_computed_blocks(b) == [first, second]
    assert bm.allocate_slots(b, 1, [first, second])
    assert bm.num_free_blocks == 1
    bm.free(b)
    # fill the pool with unrelated tokens: every cached block is evicted
    c = seq(range(100, 108))
    assert bm.allocate_slots(c, 8)
    assert bm.cached == {}
    assert bm.get_computed_blocks(seq([1, 2, 3, 4, 7])) == []


def test_n_children_fork_parent_blocks():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    p = seq(range(10))
    assert bm.allocate_slots(p, 10)
    p.num_computed_tokens = 10
    c = seq(range(10), parent=p)
    shared = bm.get_computed_blocks(c)
    assert shared == p.block_ids[:2]
    assert bm.allocate_slots(c, 2, shared)
    assert c.block_ids[2] != p.block_ids[2]
    bm.free(p)
    bm.free(c)
    assert bm.num_free_blocks == 16


def test_double_free_is_detected():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(range(3))
    bm.allocate_slots(s, 3)
    ids = list(s.block_ids)
    bm.free(s)
    s.block_ids = ids
    with pytest.raises(AssertionError):
        bm.free(s)
