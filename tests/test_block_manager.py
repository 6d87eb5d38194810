"""BlockManager: allocation, ref counts with shared prefixes, LRU eviction of cached blocks. No torch."""

import subprocess
import sys

from cbgen.config import SamplingParams
from cbgen.engine.block_manager import BlockManager
from cbgen.engine.request import Request

BS = 4


def req(tokens, rid="r"):
    return Request(rid, list(tokens), SamplingParams())


def compute_all(bm, r):
    """What a step that prefilled the whole prompt leaves behind."""
    r.num_computed_tokens = r.num_tokens
    bm.cache_full_blocks(r)


def test_block_manager_imports_without_torch():
    code = "import sys, cbgen.engine.block_manager; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_admit_allocates_room_for_the_chunk_only():
    bm = BlockManager(8, BS)
    r = req(range(10))
    assert bm.admit(r, 6) == 0          # chunked: room for 6 tokens = 2 blocks
    assert len(r.block_table) == 2 and bm.num_free_blocks == 6
    r.num_computed_tokens = 6
    assert bm.grow(r, 4) and len(r.block_table) == 3   # 10 tokens
    assert bm.grow(r, 2) and len(r.block_table) == 3   # 8 + ... fits: computed 6 + 2 = 8
    bm.free(r)
    assert bm.all_free() and r.block_table == []


def test_grow_and_admit_change_nothing_when_the_pool_is_short():
    bm = BlockManager(3, BS)
    a = req(range(8), "a")
    assert bm.admit(a, 8) == 0 and bm.num_free_blocks == 1
    a.num_computed_tokens = 8
    assert not bm.grow(a, 8)            # needs 2 more blocks, 1 free
    assert len(a.block_table) == 2 and bm.num_free_blocks == 1
    b = req(range(100, 108), "b")
    assert bm.admit(b, 8) is None
    assert b.block_table == [] and bm.num_free_blocks == 1 and bm.prefix_queries == 8


def test_shared_prefix_is_ref_counted():
    bm = BlockManager(16, BS)
    prefix = list(range(50, 58))         # two full blocks
    a = req(prefix + [1, 2, 3], "a")
    assert bm.admit(a, a.num_tokens) == 0
    compute_all(bm, a)
    b = req(prefix + [7, 8, 9, 10, 11], "b")
    assert bm.admit(b, b.num_tokens) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert [bm.ref_counts[x] for x in a.block_table[:2]] == [2, 2]
    assert bm.prefix_hits == 8 and bm.prefix_queries == a.num_tokens + b.num_tokens
    bm.free(a)
    # The shared blocks are still b's; only a's tail went back to the pool.
    assert all(bm.ref_counts[x] == 1 for x in b.block_table[:2])
    assert bm.num_free_blocks == 16 - len(b.block_table)
    bm.free(b)
    assert bm.all_free()


def freed_prefix(num_blocks: int) -> BlockManager:
    """A pool where a request with two full blocks (tokens 0..7) ran and was freed."""
    bm = BlockManager(num_blocks, BS)
    a = req(list(range(8)) + [99], "a")
    bm.admit(a, a.num_tokens)
    compute_all(bm, a)
    bm.free(a)
    return bm


def test_a_freed_prefix_stays_findable_and_is_revived():
    bm = freed_prefix(4)
    assert bm.all_free()
    b = req(list(range(8)) + [42, 43], "b")
    # Two hit blocks come back out of the free list; one new block for the tail.
    assert bm.admit(b, b.num_tokens) == 8
    assert bm.num_free_blocks == 1
    assert all(bm.ref_counts[x] == 1 for x in b.block_table)


def test_revived_blocks_do_not_count_as_free_room():
    bm = freed_prefix(3)
    # 2 hit blocks (in the free list) + 2 new blocks needed = 4 > 3.
    b = req(list(range(8)) + list(range(200, 206)), "b")
    assert bm.admit(b, b.num_tokens) is None
    assert b.block_table == [] and bm.all_free()
    assert bm.admit(b, 2) == 8          # a smaller chunk fits: 2 hits + 1 new
    bm.free(b)
    assert bm.all_free()


def test_admit_always_leaves_a_token_to_compute():
    bm = BlockManager(8, BS)
    a = req(range(8), "a")               # exactly two full blocks
    bm.admit(a, 8)
    compute_all(bm, a)
    same = req(range(8), "same")
    cached = bm.admit(same, 8)
    assert cached == 4, "the last full block is recomputed: the step needs its logits"
    assert same.num_tokens - cached >= 1
    one_more = req(list(range(8)) + [77], "one_more")
    assert bm.admit(one_more, 9) == 8
    tiny = req([0], "tiny")
    assert bm.admit(tiny, 1) == 0


def test_hashes_chain_the_whole_prefix():
    bm = BlockManager(8, BS)
    a = req([1, 2, 3, 4, 5, 6, 7, 8, 0], "a")
    bm.admit(a, a.num_tokens)
    compute_all(bm, a)
    # b's first block equals a's *second* block: same tokens, different prefix, no hit.
    b = req([5, 6, 7, 8, 0, 0], "b")
    assert bm.admit(b, b.num_tokens) == 0
    c = req([1, 2, 3, 4, 9, 9, 9, 9, 0], "c")
    assert bm.admit(c, c.num_tokens) == 4


def test_partial_blocks_are_not_cached():
    bm = BlockManager(8, BS)
    a = req(range(6), "a")
    bm.admit(a, 6)
    compute_all(bm, a)
    assert len(a.block_hashes) == 1
    b = req(list(range(6)) + [1, 1, 1], "b")
    assert bm.admit(b, b.num_tokens) == 4


def test_eviction_is_least_recently_freed_tail_first():
    bm = BlockManager(3, BS)
    a = req(list(range(8)) + [0], "a")      # 3 blocks: 2 full (cached) + 1 partial
    bm.admit(a, a.num_tokens)
    compute_all(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)                               # free order: tail, middle, head
    b = req([90, 91, 92], "b")
    bm.admit(b, 3)
    assert b.block_table == [a_blocks[2]]    # the uncached partial tail goes first
    c = req([95, 96, 97], "c")
    bm.admit(c, 3)
    assert c.block_table == [a_blocks[1]]    # then a's second block: its hash is dropped
    assert bm.block_hash[a_blocks[1]] is None and bm.block_hash[a_blocks[0]] is not None
    bm.free(b)
    bm.free(c)
    d = req(list(range(8)) + [5], "d")
    assert bm.admit(d, d.num_tokens) == 4    # only a's first block is still a hit
    assert d.block_table[0] == a_blocks[0]
    bm.free(d)
    assert bm.all_free()


def test_free_list_reuses_uncached_blocks_first_then_evicts_cached_lru():
    bm = BlockManager(4, BS)
    old = req(list(range(4)) + [0], "old")        # one full (hashed) block + a partial tail
    new = req(list(range(10, 14)) + [0], "new")
    for r in (old, new):
        bm.admit(r, r.num_tokens)
        compute_all(bm, r)
    old_head, old_tail = old.block_table
    new_head, new_tail = new.block_table
    bm.free(old)                                  # freed first: its cached head is evicted first
    bm.free(new)
    # Blocks holding nothing cacheable are reused first; both cached prefixes survive.
    filler = req(range(100, 108), "filler")
    bm.admit(filler, 8)
    assert sorted(filler.block_table) == sorted([old_tail, new_tail])
    assert bm.block_hash[old_head] is not None and bm.block_hash[new_head] is not None
    # The next block evicts the least recently freed cached one: old's head.
    one = req(range(200, 203), "one")
    bm.admit(one, 3)
    assert one.block_table == [old_head] and bm.block_hash[old_head] is None
    bm.free(filler)
    bm.free(one)
    assert bm.admit(req(list(range(10, 14)) + [1], "new2"), 5) == 4   # new's prefix survived


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = req(range(9), "a")
    bm.admit(a, 9)
    compute_all(bm, a)
    assert a.block_hashes == [] and not bm.hash_to_block
    b = req(range(9), "b")
    assert bm.admit(b, 9) == 0
    bm.free(a)
    bm.free(b)
    assert bm.all_free() and bm.hit_rate == 0.0


def test_first_writer_stays_canonical_for_equal_blocks():
    bm = BlockManager(8, BS)
    a, b = req(range(5), "a"), req(range(5), "b")
    bm.admit(a, 5)
    bm.admit(b, 5)                           # admitted together: no hit yet
    compute_all(bm, a)
    compute_all(bm, b)
    h = a.block_hashes[0]
    assert b.block_hashes[0] == h and bm.hash_to_block[h] == a.block_table[0]
    bm.free(a)
    bm.free(b)
    assert bm.all_free()


def test_preempted_readmission_does_not_count_as_a_prefix_query():
    bm = BlockManager(8, BS)
    a = req(range(9), "a")
    bm.admit(a, 9)
    compute_all(bm, a)
    bm.free(a)
    a.num_computed_tokens = 0
    a.num_preemptions = 1
    assert bm.admit(a, 9) == 8              # its own cached blocks are reused
    assert (bm.prefix_queries, bm.prefix_hits) == (9, 0)
    bm.free(a)
    assert bm.all_free()
