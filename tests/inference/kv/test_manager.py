"""The KV manager alone (no tensors, no model): block tables, allocation, prefix hits, commit, free, eviction
order, snapshot ids, exhaustion and hostile calls."""

from __future__ import annotations

import pytest

from loopcoder.inference.kv.manager import KVCacheManager


def manager(num_blocks: int = 9, *, rings: bool = False, block_size: int = 4, **kw) -> KVCacheManager:
    # window 3: one ring's worth of positions (w + 1 = 4) is one block, so every block boundary gets a snapshot
    return KVCacheManager(4, 32, block_size, num_blocks, has_rings=rings, window=3, **kw)


def test_manager_imports_no_torch():
    from pathlib import Path

    import loopcoder.inference.kv.manager as m

    source = Path(m.__file__).read_text()
    assert "import torch" not in source and "from torch" not in source


def test_reserve_allocates_whole_blocks_and_fails_without_taking_anything():
    m = manager(5)  # 4 usable blocks
    assert m.reserve(0, 5) == [1, 2]
    assert m.reserve(0, 8) == []  # already held
    assert m.reserve(1, 13) is None and m.tables[1] == [] and m.pool.available() == 2  # needs 4
    assert m.reserve(1, 33) is None  # past max_len
    assert m.room(1) == 8 and m.room(0) == 16
    assert m.capacity() == 16


def test_free_returns_blocks_and_a_second_free_is_a_no_op():
    m = manager(5)
    m.reserve(0, 8)
    m.free(0)
    assert m.tables[0] == [] and m.pool.held == 0 and m.pool.available() == 4
    m.free(0)  # nothing held any more: nothing released twice
    assert m.pool.held == 0 and m.pool.available() == 4
    assert m.reserve(1, 16) == [1, 2, 3, 4]


@pytest.mark.parametrize("slot", [-1, 4])
def test_slots_out_of_range_are_refused(slot):
    m = manager()
    for call in (lambda: m.reserve(slot, 4), lambda: m.free(slot), lambda: m.resume(slot, [1, 2, 3, 4, 5])):
        with pytest.raises(ValueError, match="out of range"):
            call()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="block_size"):
        manager(block_size=0)
    with pytest.raises(ValueError, match="max_batch"):
        KVCacheManager(0, 8, 4, 5, has_rings=False, window=3)


def test_a_committed_prefix_is_resumed_by_a_later_prompt_and_counted():
    m = manager()
    prompt = list(range(10))
    m.reserve(0, 10)
    assert m.has_uncommitted(0, 10)
    assert m.commit(0, prompt, 10) is None  # no rings: no snapshot to take
    assert not m.has_uncommitted(0, 10)
    held = list(m.tables[0][:2])
    m.free(0)
    assert m.pool.cached == 2
    hit = m.resume(1, [*prompt[:9], 99])
    assert hit is not None and hit.blocks == held and hit.length == 8 and hit.snapshot is None
    assert m.tables[1] == held and m.pool.held == 2
    assert m.pool.stats.queried_tokens == 10 and m.pool.stats.hit_tokens == 8
    assert m.resume(2, [7] * 10) is None  # no match
    assert m.resume(3, prompt[:8]) is not None and m.tables[3] == held[:1]  # at most len - 1 tokens: 1 block


def test_resume_into_a_slot_that_holds_blocks_is_refused():
    m = manager()
    m.reserve(0, 8)
    m.commit(0, list(range(8)), 8)
    m.reserve(1, 4)
    with pytest.raises(ValueError, match="already holds blocks"):
        m.resume(1, list(range(9)))


def test_without_prefix_caching_nothing_is_indexed():
    m = manager(prefix_caching=False)
    m.reserve(0, 8)
    assert not m.has_uncommitted(0, 8)
    assert m.commit(0, list(range(8)), 8) is None and m.pool.stats.registered_blocks == 0
    assert m.resume(1, list(range(9))) is None and m.pool.stats.queried_tokens == 0
    assert m.pool.num_snapshots == 0


def test_cached_blocks_are_evicted_least_recently_used_last_blocks_first():
    m = manager(5)
    a, b = list(range(8)), list(range(100, 108))
    m.reserve(0, 8)
    m.commit(0, a, 8)
    m.free(0)  # a's blocks 1, 2 cached (tail first: 2 is evicted before 1)
    m.reserve(1, 8)
    m.commit(1, b, 8)
    m.free(1)  # b's blocks 3, 4 cached after a's
    assert m.pool.cached == 4 and m.pool.available() == 4
    assert m.reserve(2, 4) == [2]  # a's last block is the least recently used
    assert m.resume(3, [*a, 0]) is not None and m.tables[3] == [1]  # a's first block still hits
    assert m.reserve(2, 8) == [4]  # then b's last block; a's first is held again, not evictable
    assert m.pool.stats.evicted_blocks == 2


def test_fork_shares_full_blocks_and_copies_a_partial_one():
    m = manager(6)
    m.reserve(0, 6)
    m.commit(0, list(range(6)), 6)
    fork = m.fork(0, 1, 6)
    assert fork is not None and fork.blocks == [1, 3] and fork.copy == (2, 3)
    assert m.pool.refs[1] == 2 and m.entries[1] == m.entries[0]
    exact = m.fork(0, 2, 4)  # ends on a block boundary: nothing to copy
    assert exact is not None and exact.copy is None and exact.blocks == [1]
    m.reserve(3, 8)  # the pool is exhausted: a fork that needs a block fails and takes nothing
    assert m.fork(0, 2, 6) is None and m.pool.refs[1] == 3


def test_reorder_moves_tables_and_empties_the_rest():
    m = manager()
    m.reserve(0, 4)
    m.reserve(2, 4)
    m.free(0)
    m.reorder([2])
    assert m.tables == [[2], [], [], []]
    assert m.is_run(0, 1) and not m.is_run(1, 1)


def test_plt_snapshots_pending_then_attached_and_resumed_from():
    m = manager(rings=True, snapshots=2)
    tokens = list(range(12))
    m.reserve(0, 12)
    assert m.chunk_boundaries(0, 12) == [4, 8, 12] and m.chunk_boundaries(4, 11) == [8]
    s4, s8 = m.pending_snapshot(0, 4), m.pending_snapshot(0, 8)
    assert {s4, s8} == {0, 1} and m.pending_snapshot(0, 4) == s4  # one id per boundary
    assert m.pending_snapshot(0, 12) is None  # every slot pending: none to give
    assert m.commit(0, tokens, 10) is None  # pending ones attach; boundary 12 is not reached
    assert m.pool.snapshots_in_use == 2 and m.pending[0] == {12: None}  # 12 still pending (it had no slot)
    m.free(0)
    hit = m.resume(1, tokens)
    assert hit is not None and hit.length == 8 and hit.snapshot == s8


def test_plt_resumes_only_at_a_boundary_with_a_snapshot():
    m = manager(rings=True, snapshots=2)
    tokens = list(range(10))
    m.reserve(0, 9)
    s = m.pending_snapshot(0, 4)
    m.commit(0, tokens, 9)  # boundary 8 had no pending snapshot and is behind the sequence: none taken
    m.free(0)
    hit = m.resume(1, tokens)
    assert hit is not None and hit.length == 4 and hit.snapshot == s and hit.blocks == [1]


def test_a_new_snapshot_evicts_the_least_recently_used_attached_one():
    m = manager(rings=True, snapshots=1)
    tokens = list(range(9))
    m.reserve(0, 8)
    s = m.pending_snapshot(0, 4)
    m.commit(0, tokens, 8)  # boundary 8 is where the sequence stands: its snapshot takes boundary 4's slot
    assert m.pool.stats.snapshots_evicted == 1
    m.free(0)
    hit = m.resume(1, tokens)
    assert hit is not None and hit.length == 8 and hit.snapshot == s
    m.free(1)
    assert m.resume(2, tokens[:5]) is None  # boundary 4 lost its snapshot: nothing to resume from


def test_commit_asks_for_a_snapshot_at_the_current_boundary():
    m = manager(rings=True, snapshots=1)
    m.reserve(0, 8)
    s = m.commit(0, list(range(8)), 8)  # after a decode step: the store copies the rings into slot s
    assert s == 0 and m.pool.snapshots_in_use == 1
    m.free(0)
    assert m.resume(1, list(range(9))).snapshot == s


def test_freeing_a_slot_frees_its_pending_snapshots():
    m = manager(rings=True, snapshots=2)
    m.reserve(0, 8)
    m.pending_snapshot(0, 4)
    m.pending_snapshot(0, 8)
    m.free(0)
    assert m.pool.snapshots_in_use == 0
