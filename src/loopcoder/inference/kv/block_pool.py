"""Bookkeeping of the paged K/V cache, without tensors: a pool of fixed-size blocks with reference counts, the
prefix index of automatic prefix caching (as vLLM's), and the slots of PLT's boundary snapshots.

- Blocks. Block 0 is the null block: unused block-table entries point at it, and idle slots of a fixed-shape
  decode step write into it; it is never handed out. Every other block is *free* (no owner, no content worth
  keeping), *held* (reference count > 0: in the block table of one or more sequences, several when they share a
  prefix) or *cached* (count 0, but its content is in the index: reusable by a later prompt, and evicted least
  recently used first when blocks run out). Free blocks are handed out lowest id first, so the touched part of
  the pool, and with it the resident memory of a lazily committed pool on CPU, follows the peak in use.
- The index. A full block is keyed by a hash chained over the token ids of the prefix it ends:
  key_j = hash((key_{j-1}, tokens of block j)), as vLLM does. A lookup walks a prompt block by block and also
  compares each entry's tokens and parent entry, so a hash collision can never hand out a wrong block.
- Snapshots. For PLT, resuming a sequence at a block boundary b needs, besides loop 1's K/V of positions < b,
  the rings of loops >= 2 (their K/V at b-w-1 .. b-1) and the CLP states P(r)_{b-1} (`paged.py` holds them).
  Their slots are numbered here: a slot is *pending* while a prefill chunk fills it before its block is
  registered, then *attached* to the entry of the block that ends at b, and evicted least recently used.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

NULL_BLOCK = 0


@dataclass(eq=False)
class Entry:
    """A cached full block: the chained hash of its prefix, its tokens, the entry of the block before it."""

    key: int
    tokens: tuple[int, ...]
    parent: Entry | None
    block: int
    snapshot: int | None = None  # slot of the state at this block's end (PLT), if one is kept


@dataclass
class PoolStats:
    """Counters of the prefix cache (tokens of prompts looked up and found)."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    registered_blocks: int = 0
    evicted_blocks: int = 0
    snapshots_taken: int = 0
    snapshots_evicted: int = 0
    peak_held: int = 0


def chain_key(parent: Entry | None, tokens: tuple[int, ...]) -> int:
    """key_j = hash((key_{j-1}, tokens_j)); the first block's parent key is None."""
    return hash((None if parent is None else parent.key, tokens))


class BlockPool:
    """`num_blocks` blocks (block 0 is the null block) and `num_snapshots` snapshot slots."""

    def __init__(self, num_blocks: int, num_snapshots: int = 0) -> None:
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.num_snapshots = num_snapshots
        self.refs = [0] * num_blocks
        self.held = 0  # blocks with a reference count > 0
        self._free = list(range(1, num_blocks))  # a heap: lowest id first
        self._cached: OrderedDict[int, Entry] = OrderedDict()  # count-0 blocks with content, least recent first
        self._entry_of: dict[int, Entry] = {}  # block -> its index entry (held or cached)
        self._index: dict[int, list[Entry]] = {}  # chained key -> entries (a list: hash collisions stay apart)
        self._snap_free = list(range(num_snapshots))
        self._snap_lru: OrderedDict[int, Entry] = OrderedDict()  # attached snapshot slot -> entry, least recent first
        self.stats = PoolStats()

    # -- blocks ------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Blocks that sequences can use (all but the null block)."""
        return self.num_blocks - 1

    def available(self) -> int:
        """Blocks that `allocate` can hand out now: free ones and cached ones (evicted on demand)."""
        return len(self._free) + len(self._cached)

    @property
    def cached(self) -> int:
        return len(self._cached)

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks, each held once, or None (and nothing taken) when fewer are available."""
        if n > self.available():
            return None
        out = []
        for _ in range(n):
            if self._free:
                block = heapq.heappop(self._free)
            else:  # evict the least recently used cached block
                block, entry = self._cached.popitem(last=False)
                self._forget(entry)
                self.stats.evicted_blocks += 1
            out.append(block)
        for block in out:
            self.refs[block] = 1
        self.held += n
        self.stats.peak_held = max(self.stats.peak_held, self.held)
        return out

    def hold(self, block: int) -> None:
        """One more reference to a block (a sequence shares it); a cached block leaves the eviction order."""
        if self.refs[block] == 0:
            self._cached.pop(block, None)
            self.held += 1
            self.stats.peak_held = max(self.stats.peak_held, self.held)
        self.refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block. Tail first: a sequence's last blocks are evicted before its first."""
        for block in reversed(blocks):
            if block == NULL_BLOCK:
                continue
            if self.refs[block] <= 0:
                raise ValueError(f"block {block} released more often than held")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.held -= 1
                entry = self._entry_of.get(block)
                if entry is not None:
                    self._cached[block] = entry
                else:
                    heapq.heappush(self._free, block)

    # -- the prefix index -------------------------------------------------------------------------------
    def find(self, parent: Entry | None, tokens: tuple[int, ...]) -> Entry | None:
        for entry in self._index.get(chain_key(parent, tokens), ()):
            if entry.parent is parent and entry.tokens == tokens:
                return entry
        return None

    def register(self, parent: Entry | None, tokens: tuple[int, ...], block: int) -> Entry:
        """Index a full block (held by the caller) as following `parent` with `tokens`. If that content is
        already indexed (another sequence computed it), the existing entry is returned and `block` stays out of
        the index: it is freed, not cached, when released."""
        found = self.find(parent, tokens)
        if found is not None:
            return found
        entry = Entry(chain_key(parent, tokens), tokens, parent, block)
        self._index.setdefault(entry.key, []).append(entry)
        self._entry_of[block] = entry
        self.stats.registered_blocks += 1
        return entry

    def match(self, tokens: Sequence[int], block_size: int, max_blocks: int) -> list[Entry]:
        """The index entries of the longest cached prefix of `tokens`, at most `max_blocks` full blocks."""
        out: list[Entry] = []
        parent = None
        for j in range(min(max_blocks, len(tokens) // block_size)):
            entry = self.find(parent, tuple(tokens[j * block_size : (j + 1) * block_size]))
            if entry is None:
                break
            out.append(entry)
            parent = entry
        return out

    def _forget(self, entry: Entry) -> None:
        """Remove an evicted block's entry (its children become unreachable: their parent is gone)."""
        entries = self._index.get(entry.key, [])
        entries.remove(entry)
        if not entries:
            del self._index[entry.key]
        del self._entry_of[entry.block]
        if entry.snapshot is not None:
            self._snap_lru.pop(entry.snapshot, None)
            heapq.heappush(self._snap_free, entry.snapshot)
            entry.snapshot = None

    # -- snapshot slots --------------------------------------------------------------------------------
    def new_snapshot(self) -> int | None:
        """A pending snapshot slot (not evictable until attached or freed), evicting the least recently used
        attached one if none is free; None when every slot is pending."""
        if self._snap_free:
            return heapq.heappop(self._snap_free)
        if not self._snap_lru:
            return None
        slot, entry = self._snap_lru.popitem(last=False)
        entry.snapshot = None
        self.stats.snapshots_evicted += 1
        return slot

    def attach_snapshot(self, entry: Entry, slot: int) -> bool:
        """Keep a pending slot as `entry`'s snapshot; False (and the slot freed) if it already has one."""
        if entry.snapshot is not None or self._entry_of.get(entry.block) is not entry:
            self.free_snapshot(slot)
            return False
        entry.snapshot = slot
        self._snap_lru[slot] = entry
        self.stats.snapshots_taken += 1
        return True

    def free_snapshot(self, slot: int) -> None:
        heapq.heappush(self._snap_free, slot)

    def touch_snapshot(self, slot: int) -> None:
        """A hit used this snapshot: it becomes the most recently used."""
        self._snap_lru.move_to_end(slot)

    @property
    def snapshots_in_use(self) -> int:
        return self.num_snapshots - len(self._snap_free)
