"""The block pool's bookkeeping: reference counts, the prefix index, LRU eviction, snapshot slots."""

from __future__ import annotations

import pytest

from loopcoder.inference.kv import block_pool as blocks
from loopcoder.inference.kv.block_pool import NULL_BLOCK, BlockPool


def test_blocks_are_counted_shared_and_freed():
    pool = BlockPool(5)
    a = pool.allocate(2)
    assert a == [1, 2] and pool.held == 2 and pool.available() == 2
    assert pool.allocate(3) is None and pool.available() == 2  # nothing taken on failure
    pool.hold(a[0])  # a second sequence shares block 1
    pool.release(a)
    assert pool.refs[1] == 1 and pool.refs[2] == 0 and pool.held == 1
    pool.release([a[0]])
    assert pool.held == 0 and pool.available() == 4
    with pytest.raises(ValueError, match="released more often than held"):
        pool.release([a[0]])
    assert NULL_BLOCK not in pool.allocate(4)


def test_cached_blocks_are_found_by_their_prefix_and_evicted_least_recently_used():
    pool = BlockPool(4)
    tokens = list(range(10))
    first, second = pool.allocate(2)
    e1 = pool.register(None, tuple(tokens[:4]), first)
    e2 = pool.register(e1, tuple(tokens[4:8]), second)
    assert pool.match(tokens, 4, 2) == [e1, e2]
    assert pool.match([0, 1, 2, 3, 9, 9, 9, 9], 4, 2) == [e1]  # same first block only
    assert pool.match(tokens[4:], 4, 2) == []  # the second block's tokens without its prefix do not match
    pool.release([first, second])
    assert pool.cached == 2 and pool.available() == 3
    pool.hold(first)  # a hit: the first block is in use again, out of the eviction order
    pool.release([first])  # ... and now the most recently used
    got = pool.allocate(2)  # the free block, then the least recently used cached one (the second)
    assert got == [3, second] and pool.stats.evicted_blocks == 1
    assert pool.match(tokens, 4, 2) == [e1]


def test_a_hash_collision_never_returns_another_prefix(monkeypatch):
    monkeypatch.setattr(blocks, "chain_key", lambda parent, tokens: 7)  # every block hashes alike
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    ea = pool.register(None, (1, 2), a)
    eb = pool.register(None, (3, 4), b)
    assert pool.match([1, 2, 5], 2, 1) == [ea] and pool.match([3, 4, 5], 2, 1) == [eb]
    assert pool.match([5, 6, 7], 2, 1) == []
    assert pool.register(None, (1, 2), 3) is ea  # content already indexed: the existing entry


def test_snapshots_follow_their_block_and_are_evicted_least_recently_used():
    pool = BlockPool(4, num_snapshots=2)
    a, b, c = pool.allocate(3)
    entries = [pool.register(None, (i,), blk) for i, blk in enumerate((a, b, c))]
    s0, s1 = pool.new_snapshot(), pool.new_snapshot()
    assert pool.attach_snapshot(entries[0], s0) and pool.attach_snapshot(entries[1], s1)
    pool.touch_snapshot(s0)  # entry 0's snapshot was used by a hit: entry 1's is now the oldest
    s2 = pool.new_snapshot()
    assert s2 == s1 and entries[1].snapshot is None and entries[0].snapshot == s0
    pool.release([a, b, c])
    pool.allocate(3)  # evicts every cached block, and entry 0's snapshot with it
    assert entries[0].snapshot is None and pool.snapshots_in_use == 1  # s2: still pending
