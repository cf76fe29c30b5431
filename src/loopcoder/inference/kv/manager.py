"""`KVCacheManager`: the paged cache's bookkeeping, in block ids and snapshot ids only (no tensors), as vLLM v1
keeps `KVCacheManager` over `BlockPool` on the scheduler's side and the K/V tensors in the worker.

It owns each slot's block table (a list of block ids), the index entries of its full blocks, the snapshot
slots its prefill chunks are filling (`pending`), and the prefix-cache policy: the longest cached prefix a
prompt can resume from (`resume`), entering full blocks in the index (`commit`) and where PLT's boundary
snapshots are taken. Every method returns what the tensor store must copy (new blocks to zero, a partial block
to duplicate, a snapshot to restore or to take), and the store (`paged.PagedSlotCache`) does the copies.
"""

from __future__ import annotations

from dataclasses import dataclass

from loopcoder.inference.kv.block_pool import BlockPool, Entry


@dataclass(frozen=True)
class Resume:
    """A prefix-cache hit: the slot starts at `length` tokens, in `blocks`; `snapshot`: the boundary snapshot
    whose rings and CLP states the slot resumes from (PLT with rings), else None."""

    blocks: list[int]
    length: int
    snapshot: int | None


@dataclass(frozen=True)
class Fork:
    """A fork's blocks: `blocks` is the new slot's table; `copy` = (source block, new block) of a partly
    filled last block the store must duplicate, or None."""

    blocks: list[int]
    copy: tuple[int, int] | None


class KVCacheManager:
    """Block tables, prefix lookup, allocation, commit and free for `max_batch` slots over one `BlockPool`.

    `has_rings`: PLT with loops >= 2, whose resumption needs a boundary snapshot (every `snapshot_every`
    blocks); without rings (the vanilla looped transformer, R = 1) a sequence resumes after any cached block.
    """

    def __init__(
        self,
        max_batch: int,
        max_len: int,
        block_size: int,
        num_blocks: int,
        *,
        has_rings: bool,
        window: int,
        prefix_caching: bool = True,
        snapshot_every: int | None = None,
        snapshots: int | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_batch < 1 or max_len < 1:
            raise ValueError(f"max_batch and max_len must be >= 1, got {max_batch} and {max_len}")
        self.max_batch, self.max_len, self.block_size = max_batch, max_len, block_size
        self.max_blocks = -(-max_len // block_size)
        self.has_rings, self.prefix_caching = has_rings, prefix_caching
        self.snapshot_every = snapshot_every or -(-(window + 1) // block_size)
        if not (prefix_caching and has_rings):
            snapshots = 0
        elif snapshots is None:  # a quarter of a full pool's boundaries, plus a few per slot; evicted LRU
            snapshots = -(-num_blocks // (4 * self.snapshot_every)) + 2 * max_batch
        self.pool = BlockPool(num_blocks, snapshots)
        self.tables: list[list[int]] = [[] for _ in range(max_batch)]
        self.entries: list[list[Entry]] = [[] for _ in range(max_batch)]  # index entries of each slot's full blocks
        self.pending: list[dict[int, int | None]] = [{} for _ in range(max_batch)]  # boundary -> snapshot slot

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} out of range 0..{self.max_batch - 1}")

    # -- blocks of a slot -------------------------------------------------------------------------------
    def capacity(self) -> int:
        """Positions the pool holds for all sequences together."""
        return self.pool.capacity * self.block_size

    def reserve(self, slot: int, length: int) -> list[int] | None:
        """Blocks for `length` positions of `slot`: the newly allocated ones ([] if it had enough), or None
        (and nothing taken) when `length` exceeds `max_len` or the pool."""
        self._check_slot(slot)
        if length > self.max_len:
            return None
        need = -(-length // self.block_size) - len(self.tables[slot])
        if need <= 0:
            return []
        blocks = self.pool.allocate(need)
        if blocks is not None:
            self.tables[slot].extend(blocks)
        return blocks

    def room(self, slot: int) -> int:
        """Positions `slot` could hold now (what `reserve` would grant)."""
        return min(self.max_len, (len(self.tables[slot]) + self.pool.available()) * self.block_size)

    def free(self, slot: int) -> None:
        """Drop `slot`'s blocks (cached ones stay in the index) and its pending snapshots."""
        self._check_slot(slot)
        self.pool.release(self.tables[slot])
        for s in self.pending[slot].values():
            if s is not None:
                self.pool.free_snapshot(s)
        self.tables[slot], self.entries[slot], self.pending[slot] = [], [], {}

    def reorder(self, order: list[int]) -> None:
        """Slot i takes the tables of slot order[i]; the others are empty (their blocks were freed)."""
        for lists in (self.tables, self.entries, self.pending):
            lists[:] = [lists[src] for src in order] + [type(lists[0])() for _ in range(self.max_batch - len(order))]

    def fork(self, src: int, dst: int, length: int) -> Fork | None:
        """`dst` (empty) shares `src`'s full blocks of its `length` positions and gets a new block for a partly
        filled last one; None (nothing taken) when no block is available."""
        full, part = divmod(length, self.block_size)
        blocks = self.tables[src][:full]
        copy = None
        if part:
            new = self.pool.allocate(1)
            if new is None:
                return None
            copy = (self.tables[src][full], new[0])
        for b in blocks:
            self.pool.hold(b)
        self.tables[dst] = blocks + ([copy[1]] if copy else [])
        self.entries[dst] = list(self.entries[src])
        return Fork(self.tables[dst], copy)

    def is_run(self, slot: int, nb: int) -> bool:
        """Whether `slot`'s first `nb` blocks are consecutive ids (read as one view, no gather)."""
        t = self.tables[slot]
        return len(t) >= nb and t[nb - 1] - t[0] == nb - 1 and all(t[j + 1] == t[j] + 1 for j in range(nb - 1))

    # -- the prefix cache ---------------------------------------------------------------------------------
    def has_uncommitted(self, slot: int, length: int) -> bool:
        """Whether `length` positions of `slot` fill blocks not yet entered in the index."""
        return self.prefix_caching and length // self.block_size > len(self.entries[slot])

    def _resumable(self, entries: list[Entry]) -> int:
        """How many matched blocks a sequence can resume after: the deepest boundary with a snapshot for PLT
        with rings, any for the vanilla looped transformer and R = 1."""
        if not self.has_rings:
            return len(entries)
        for j in range(len(entries), 0, -1):
            if entries[j - 1].snapshot is not None:
                return j
        return 0

    def resume(self, slot: int, tokens: list[int]) -> Resume | None:
        """Start `slot` (empty) from the longest cached prefix of `tokens` it can resume from (at most
        len(tokens) - 1 tokens: the last prompt position is always computed), holding its blocks."""
        self._check_slot(slot)
        if not self.prefix_caching:
            return None
        if self.tables[slot]:
            raise ValueError(f"slot {slot} already holds blocks: free it before resuming a prefix")
        self.pool.stats.queried_tokens += len(tokens)
        entries = self.pool.match(tokens, self.block_size, (len(tokens) - 1) // self.block_size)
        entries = entries[: self._resumable(entries)]
        if not entries:
            return None
        for e in entries:
            self.pool.hold(e.block)
        self.tables[slot], self.entries[slot] = [e.block for e in entries], list(entries)
        length = len(entries) * self.block_size
        snapshot = entries[-1].snapshot if self.has_rings else None
        if snapshot is not None:
            self.pool.touch_snapshot(snapshot)
        self.pool.stats.hit_tokens += length
        return Resume(list(self.tables[slot]), length, snapshot)

    def snapshot_boundary(self, b: int) -> bool:
        return self.has_rings and b % (self.snapshot_every * self.block_size) == 0

    def chunk_boundaries(self, start: int, end: int) -> list[int]:
        """Snapshot boundaries in (start, end]: those a prefill chunk from `start` to `end` passes."""
        step = self.snapshot_every * self.block_size
        return list(range((start // step + 1) * step, end + 1, step))

    def pending_snapshot(self, slot: int, boundary: int) -> int | None:
        """The snapshot slot a prefill chunk of `slot` fills at `boundary` (taken on first request; None when
        every slot is pending)."""
        pending = self.pending[slot]
        if boundary not in pending:
            pending[boundary] = self.pool.new_snapshot()
        return pending[boundary]

    def commit(self, slot: int, tokens: list[int], length: int) -> int | None:
        """Enter `slot`'s newly full blocks of its `length` positions in the index (`tokens`: its token ids)
        and attach the snapshots its prefill took at their boundaries. Returns a snapshot slot the store must
        fill now from `slot`'s rings and states (the boundary is where the sequence stands, after a decode
        step), or None."""
        self._check_slot(slot)
        if not self.prefix_caching:
            return None
        B = self.block_size
        entries, pending = self.entries[slot], self.pending[slot]
        take_now = None
        for j in range(len(entries), min(length, len(tokens), len(self.tables[slot]) * B) // B):
            parent = entries[-1] if entries else None
            entry = self.pool.register(parent, tuple(tokens[j * B : (j + 1) * B]), self.tables[slot][j])
            entries.append(entry)
            boundary = (j + 1) * B
            if not self.snapshot_boundary(boundary):
                continue
            s = pending.pop(boundary, None)
            if s is None and boundary == length and entry.snapshot is None:
                s = take_now = self.pool.new_snapshot()
            if s is not None:
                self.pool.attach_snapshot(entry, s)
        return take_now
