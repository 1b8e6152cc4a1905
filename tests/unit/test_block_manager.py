import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.block_manager import BlockManager, hash_block_tokens, root_hash
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


def test_the_sequence_reporting_prompt_logprobs_computes_the_whole_prompt():
    """Prompt logprobs need every prompt position's logits: no prefix-cache hit for the first sample
    until it has its first token; its n > 1 siblings still share its blocks."""
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(10))
    assert bm.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    params = SamplingParams(n=2, prompt_logprobs=1)
    p = Sequence("r", 0, list(range(10)), 10, params)
    assert bm.get_computed_blocks(p) == []
    assert bm.allocate_slots(p, 10)
    p.num_computed_tokens = 10
    child = Sequence("r", 1, list(range(10)), 10, params, parent=p)
    assert bm.get_computed_blocks(child) == p.block_ids[:2]
    p.token_ids.append(5)  # preempted after its first token: its prompt logprobs are out, hits are fine
    assert bm.get_computed_blocks(p) == a.block_ids[:2]


def test_double_free_is_detected():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(range(3))
    bm.allocate_slots(s, 3)
    ids = list(s.block_ids)
    bm.free(s)
    s.block_ids = ids
    with pytest.raises(AssertionError):
        bm.free(s)


def chain(seed, blocks):
    h, out = root_hash(seed), []
    for tokens in blocks:
        h = hash_block_tokens(h, tokens)
        out.append(h)
    return out


BLOCKS = [list(range(16)), [151643, 0, 7, 2**31] * 4, [5] * 16]


@pytest.mark.parametrize("hashseed", ["0", "1", "12345"])
def test_block_hashes_are_equal_in_another_process(hashseed):
    # a str seed and a first block: the values Python's own hash() salts per process
    code = ("from engine.block_manager import hash_block_tokens, root_hash\n"
            "h, out = root_hash('model-a'), []\n"
            f"for t in {BLOCKS!r}:\n"
            "    h = hash_block_tokens(h, t); out.append(h)\n"
            "print(out)")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == repr(chain("model-a", BLOCKS))


def test_block_hash_is_an_unsigned_64_bit_int():
    for h in chain(b"", BLOCKS):
        assert isinstance(h, int) and 0 <= h < 2**64


def test_model_identity_separates_block_hashes():
    assert root_hash("model-a") == root_hash(b"model-a")
    assert root_hash("model-a") != root_hash("model-b")
    a, b = chain("model-a", BLOCKS), chain("model-b", BLOCKS)
    assert not set(a) & set(b)
    s = seq(range(8))
    bms = [BlockManager(num_blocks=4, block_size=4, hash_seed=seed) for seed in ("model-a", "model-b")]
    for bm in bms:
        assert bm.allocate_slots(s, 8)
        s.num_computed_tokens = 8
        bm.cache_full_blocks(s)
        bm.free(s)
        s.num_computed_tokens = 0
    assert not set(bms[0].cached) & set(bms[1].cached)


def test_block_hashes_chain_over_the_prefix():
    a = chain("m", [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert chain("m", [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])[:2] == a  # same prefix, same hashes
    b = chain("m", [[1, 2, 3, 5], [5, 6, 7, 8]])
    assert a[1] != b[1]  # same tokens after a different parent
    assert hash_block_tokens(a[0], [5, 6, 7, 8]) == a[1]
    assert chain("m", [[5, 6, 7, 8]])[0] != a[1]  # the same block first in its sequence
