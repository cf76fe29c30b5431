"""`PagedSlotCache`: the engine's cache with its full stores in fixed-size blocks, and PLT's prefix cache.

The split is vLLM v1's: `manager.KVCacheManager` (no tensors) decides which blocks a slot holds, what a prompt
resumes from and which snapshot ids are filled; this class holds the tensors and does the copies it is told to
(zeroing first-used blocks, a fork's partial block, restoring or taking a snapshot, a step's gather).

The full stores (loop 1's K/V for PLT, every loop's for the vanilla looped transformer) live in one pool of
blocks of `block_size` positions, shared by every sequence: a sequence's block table lists its blocks in
order, and blocks are taken as it grows (`reserve`), so memory follows real lengths. The small per-slot parts
stay as in `SlotCache`: the rings of PLT loops >= 2 (w+1 entries), the CLP states, the lengths.

A decode step reads each sequence's store through its block table (`SlotStep.gather`): one `index_select`
of the pool per layer, or a plain view when a single sequence's blocks are consecutive (`SlotStep.run`).
With fixed shapes (CUDA graphs, `torch.compile`) the step reads every slot's whole table; the tables are a
device tensor updated in place, so a captured graph reads the current ones.

Prefix caching (`prefix_caching=True`): every full block is entered in the index of `block_pool.BlockPool` under
a hash chained over the token ids of its prefix, and kept when its sequences end, until it is evicted (least
recently used first). A new prompt starts from the longest cached prefix it can resume from (`attach`):

- loop 1's K/V of positions < b are the cached blocks (shared, never written again: a sequence writes only
  positions >= b, into its own blocks);
- PLT loops >= 2 need, at the first new position b, their own K/V at b-w .. b-1 (G-SWA's local branch; the
  ring keeps b-w-1 .. b-1, what the decode step's ring layout holds) and the CLP states P(r)_{b-1} (loop r+1 at
  b reads a*E_b + b*P(r)_{b-1}). Neither can be recomputed from loop 1's K/V, so they are kept as a
  *snapshot* at the block boundary: `sk`, `sv` (L, R-1, kv_heads, w+1, hd) in ring order and `s_states`
  (R-1, hidden). Snapshots are taken every `snapshot_every` blocks (by default one ring's worth of positions,
  ceil((w+1)/block_size) blocks), so a hit resumes at most that many blocks before the end of its match. The
  store holds `snapshots` of them (by default a quarter of what a full pool has boundaries for, plus two per
  slot), evicted least recently used: a hit whose deepest snapshot was evicted resumes at an earlier one;
- the vanilla looped transformer (every loop's K/V in the blocks, no CLP state) and R = 1 resume at any block.

With the blocks and the snapshot the continuation computes exactly what one forward over the whole prompt
computes (tested against full recomputation): every query at a position >= b sees the same keys and values,
and every CLP input the same state. A hit covers at most len(prompt) - 1 tokens: the last prompt position is
always computed, because its logits give the first new token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loopcoder.inference.kv.block_pool import NULL_BLOCK, BlockPool
from loopcoder.inference.kv.manager import KVCacheManager
from loopcoder.inference.kv.store import SlotCache, SlotChunk, SlotStep
from loopcoder.model.cache import KV

if TYPE_CHECKING:
    from loopcoder.model.config import PLTConfig


class PagedStore:
    """The full stores in one pool of blocks shared by every slot, and the device copy of the block tables; the
    `SlotCache` strategy of `PagedSlotCache`. Which blocks a slot holds is its `KVCacheManager`'s; this class
    does the copies (zeroing first-used blocks, a fork's partial block) and the reads and writes.

    - `k`, `v`: (L, F, kv_heads, num_blocks, block_size, hd); block 0 is the null block.
    - `table`: (max_batch, max_blocks) block ids of each slot (the null block past its end), a device tensor
      updated in place, so a captured graph reads the current ones.
    """

    paged = True

    def __init__(self, manager: KVCacheManager, num_stores: int, kv_shape: tuple[int, int, int], kw: dict) -> None:
        L, hkv, hd = kv_shape
        self.manager = manager
        self.block_size, self.max_blocks, self.num_blocks = (
            manager.block_size,
            manager.max_blocks,
            manager.pool.num_blocks,
        )
        device = kw["device"]
        # torch.empty: on CPU the pages of blocks never handed out are never touched, so never resident
        shape = (L, num_stores, hkv, self.num_blocks, self.block_size, hd)
        self.k, self.v = torch.empty(shape, **kw), torch.empty(shape, **kw)
        self.k[:, :, :, NULL_BLOCK] = 0
        self.v[:, :, :, NULL_BLOCK] = 0
        self.table = torch.full((manager.max_batch, self.max_blocks), NULL_BLOCK, dtype=torch.long, device=device)
        self._scratch = [torch.empty(0, dtype=kw["dtype"]), torch.empty(0, dtype=kw["dtype"])]  # `_gather`'s K, V
        # first pool row of each kv head, (1, kv_heads, 1): a step's gather rows are these plus its block tables
        self._head_rows = torch.arange(hkv, device=device)[None, :, None] * self.num_blocks
        self._zeroed = 1  # blocks below this id have been written (or zeroed) once: their contents are finite

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v))

    def block_bytes(self) -> int:
        """Bytes of one block (every layer and full store, K and V)."""
        return 2 * self.k[:, :, :, 0].numel() * self.k.element_size()

    def stats(self) -> dict:
        p, s = self.manager.pool, self.manager.pool.stats
        return {
            "paged": True,
            "block_size": self.block_size,
            "blocks": p.capacity,
            "blocks_held": p.held,
            "blocks_cached": p.cached,
            "blocks_free": p.available() - p.cached,
            "peak_blocks_held": s.peak_held,
            "block_bytes": self.block_bytes(),
        }

    # -- blocks of a slot (the manager decides, the store zeroes and copies) ----------------------------------
    def _first_use(self, blocks: list[int]) -> None:
        """Zero blocks never handed out before (masked entries must be finite)."""
        top = max(blocks) + 1
        if top > self._zeroed:
            self.k[:, :, :, self._zeroed : top] = 0
            self.v[:, :, :, self._zeroed : top] = 0
            self._zeroed = top

    def reserve(self, slot: int, length: int) -> bool:
        have = len(self.manager.tables[slot])
        blocks = self.manager.reserve(slot, length)
        if blocks is None:
            return False
        if blocks:
            self._first_use(blocks)
            self.table[slot, have : have + len(blocks)] = torch.tensor(blocks, device=self.table.device)
        return True

    def room(self, slot: int) -> int:
        return self.manager.room(slot)

    def capacity(self) -> int:
        return self.manager.capacity()

    def release(self, slot: int) -> None:
        self.manager.free(slot)

    def clear(self, slot: int) -> None:
        self.table[slot] = NULL_BLOCK

    def slot_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.table,)

    def reorder(self, order: list[int], moves: tuple[torch.Tensor, torch.Tensor] | None, lengths: torch.Tensor) -> None:
        self.manager.reorder(order)  # the table rows moved with the other per-slot tensors

    def fork(self, src: int, dst: int, n: int) -> bool:
        """`dst` (empty) shares `src`'s full blocks and gets a copy of its partly filled last block."""
        fork = self.manager.fork(src, dst, n)
        if fork is None:
            return False
        if fork.copy is not None:
            old, new = fork.copy
            self.k[:, :, :, new] = self.k[:, :, :, old]
            self.v[:, :, :, new] = self.v[:, :, :, old]
            self._zeroed = max(self._zeroed, new + 1)
        self.write_table(dst)
        return True

    def write_table(self, slot: int) -> None:
        """The device row of `slot`'s block table from the manager's list (the null block past its end)."""
        blocks = self.manager.tables[slot]
        self.table[slot] = NULL_BLOCK
        self.table[slot, : len(blocks)] = torch.tensor(blocks, dtype=torch.long, device=self.table.device)

    def fill_random(self, generator: torch.Generator | None) -> None:
        for t in (self.k, self.v):
            if t.numel():
                t.normal_(generator=generator if t.device.type == "cpu" else None)
            t[:, :, :, NULL_BLOCK] = 0
        self._zeroed = self.num_blocks

    # -- a prefill chunk -----------------------------------------------------------------------------------
    def read(self, layer: int, f: int, slot: int, n: int) -> KV:
        nb = -(-n // self.block_size)
        k, v = self.k[layer, f], self.v[layer, f]
        if self.manager.is_run(slot, nb):
            s = self.manager.tables[slot][0]
            k, v = k[:, s : s + nb], v[:, s : s + nb]
        else:
            idx = self.table[slot, :nb]
            k, v = k[:, idx], v[:, idx]
        return KV(k.flatten(1, 2)[None, :, :n], v.flatten(1, 2)[None, :, :n])

    def write(self, layer: int, f: int, slot: int, start: int, kv: KV) -> None:
        pos = torch.arange(start, start + kv.k.shape[1], device=self.table.device)
        blocks, offsets = self.table[slot, pos // self.block_size], pos % self.block_size
        self.k[layer, f][:, blocks, offsets] = kv.k
        self.v[layer, f][:, blocks, offsets] = kv.v

    # -- a decode step -------------------------------------------------------------------------------------
    def span(self, length: int, live: torch.Tensor | None) -> int:
        """Whole blocks: those of the longest sequence, or (fixed shapes) every table entry."""
        nb = -(-length // self.block_size) if live is None else self.max_blocks
        return nb * self.block_size

    def open_step(self, step: SlotStep) -> None:
        """Where the new tokens' K/V go (block, offset) and how the step reads the stores: one view when a
        single sequence's blocks are consecutive, else one gather of the pool per layer."""
        B, n, t = self.block_size, step.n, step.positions
        nb = step.length // B
        block_of = t // B
        step.blocks = self.table[:n].gather(1, block_of[:, None])[:, 0]
        step.offsets = t - block_of * B
        if step.live is None and n == 1 and self.manager.is_run(0, nb):
            step.run = (self.manager.tables[0][0], nb)
        else:
            step.gather = (self._head_rows + self.table[:n, None, :nb]).flatten()

    def write_step(self, layer: int, f: int, step: SlotStep, kv: KV) -> None:
        self.k[layer, f][:, step.blocks, step.offsets] = kv.k[:, :, 0].transpose(0, 1)
        self.v[layer, f][:, step.blocks, step.offsets] = kv.v[:, :, 0].transpose(0, 1)

    def read_step(self, layer: int, f: int, step: SlotStep) -> KV:
        k, v = self.k[layer, f], self.v[layer, f]  # (kv_heads, blocks, block_size, hd)
        hkv, hd = k.shape[0], k.shape[-1]
        if step.run is not None:
            s, nb = step.run
            return KV(k[:, s : s + nb].flatten(1, 2)[None], v[:, s : s + nb].flatten(1, 2)[None])
        shape = (step.n, hkv, step.length, hd)
        return KV(self._gather(k, step, shape, 0), self._gather(v, step, shape, 1))

    def _gather(self, store: torch.Tensor, step: SlotStep, shape: tuple, which: int) -> torch.Tensor:
        """The step's blocks of one store, as rows of block_size * hd elements (torch's CPU index_select copies
        2-D rows about 6x faster than 3-D ones). On CPU with dynamic shapes into a reused buffer: a fresh
        output of megabytes is a fresh mmap whose page faults cost more than the copy (3x the step at batch 8,
        context 1024). The buffer is read by this layer's attention before the next call overwrites it."""
        rows = store.view(-1, store.shape[-2] * store.shape[-1])
        if store.device.type != "cpu" or step.live is not None:
            return rows.index_select(0, step.gather).view(shape)
        need = step.gather.numel() * rows.shape[1]
        buf = self._scratch[which]
        if buf.numel() < need:
            buf = self._scratch[which] = torch.empty(need + need // 4, dtype=store.dtype)
        out = buf[:need].view(-1, rows.shape[1])
        torch.index_select(rows, 0, step.gather, out=out)
        return out.view(shape)


class PrefixCache:
    """The prefix cache's tensors and copies: the snapshot store of PLT's rings and CLP states at block
    boundaries, `sk`, `sv` (snapshots, L, R-1, kv_heads, w+1, hd) in ring order and `s_states` (snapshots,
    R-1, hidden), restored into a slot on a hit (`attach`) and taken on `commit` or while a prefill chunk
    passes a boundary (`capture_*`). Which blocks and snapshot ids is the `KVCacheManager`'s; the slot's rings
    and states are the `SlotCache`'s, passed in."""

    def __init__(self, manager: KVCacheManager, store: PagedStore, config: PLTConfig, kw: dict) -> None:
        self.manager, self.store = manager, store
        n = manager.pool.num_snapshots
        L, R, hkv, hd = config.num_hidden_layers, config.plt_num_loops, config.num_key_value_heads, config.head_dim
        # lazily committed on CPU (never-touched pages take no memory): snapshots are written before they are read
        self.sk = torch.empty(n, L, R - 1, hkv, config.window + 1, hd, **kw) if n else torch.empty(0, **kw)
        self.sv = torch.empty_like(self.sk)
        self.s_states = torch.empty(n, R - 1 if not config.is_vanilla else 0, config.hidden_size, **kw)

    @property
    def prefix_caching(self) -> bool:
        return self.manager.prefix_caching

    def snapshot_bytes(self) -> int:
        """Bytes of one boundary snapshot (rings and states)."""
        per = (2 * self.sk[0].numel() + self.s_states[0].numel()) if self.manager.pool.num_snapshots else 0
        return per * self.sk.element_size()

    def nbytes(self) -> int:
        """Bytes of the snapshot store's K/V."""
        return sum(t.numel() * t.element_size() for t in (self.sk, self.sv))

    def stats(self) -> dict:
        p, s = self.manager.pool, self.manager.pool.stats
        return {
            "prefix_caching": self.manager.prefix_caching,
            "prefix_queried_tokens": s.queried_tokens,
            "prefix_hit_tokens": s.hit_tokens,
            "prefix_hit_rate": s.hit_tokens / s.queried_tokens if s.queried_tokens else 0.0,
            "evicted_blocks": s.evicted_blocks,
            "snapshots": p.num_snapshots,
            "snapshots_in_use": p.snapshots_in_use,
            "snapshot_bytes": self.snapshot_bytes(),
        }

    def has_uncommitted(self, slot: int, length: int) -> bool:
        return self.manager.has_uncommitted(slot, length)

    def attach(self, cache: SlotCache, slot: int, tokens: list[int]) -> int:
        """Start `slot` from the longest cached prefix of `tokens`: its blocks, and for PLT the snapshot's rings
        and states; the tokens it covers."""
        hit = self.manager.resume(slot, tokens)
        if hit is None:
            return 0
        self.store.write_table(slot)
        b = hit.length
        cache.lengths[slot] = b
        cache.ring_pos[slot] = -1
        if hit.snapshot is not None:
            s = hit.snapshot
            cache.rk[:, slot] = self.sk[s]
            cache.rv[:, slot] = self.sv[s]
            cache.states[slot] = self.s_states[s]
            w1 = cache.window + 1
            pos = torch.arange(max(0, b - w1), b, device=cache.device)
            cache.ring_pos[slot, pos % w1] = pos
        return b

    def commit(self, cache: SlotCache, slot: int, tokens: list[int]) -> None:
        """Enter `slot`'s newly full blocks in the index (`tokens`: its token ids, at least its length), and
        attach the snapshots at their boundaries: taken during the prefill chunk, or now from the slot's rings
        when the boundary is where the sequence stands (after a decode step)."""
        s = self.manager.commit(slot, tokens, int(cache.lengths[slot]))
        if s is not None:
            self.sk[s], self.sv[s] = cache.rk[:, slot], cache.rv[:, slot]
            self.s_states[s] = cache.states[slot]

    def capture_rings(self, cache: SlotCache, chunk: SlotChunk, layer: int, loop: int, kv: KV, first: int) -> None:
        """A prefill chunk wrote `loop`'s K/V (entry 0 at position `first`): fill its boundaries' snapshots."""
        if not (self.manager.prefix_caching and self.manager.has_rings):
            return
        w1 = cache.window + 1
        for b in self.manager.chunk_boundaries(chunk.start, first + kv.k.shape[2]):
            s = self.manager.pending_snapshot(chunk.slot, b)
            if s is None:
                continue
            pos = torch.arange(max(0, b - w1), b, device=cache.device)
            self.sk[s, layer, loop - 1][:, pos % w1] = kv.k[0, :, pos - first]
            self.sv[s, layer, loop - 1][:, pos % w1] = kv.v[0, :, pos - first]

    def capture_states(self, cache: SlotCache, chunk: SlotChunk, loop: int, states: torch.Tensor) -> None:
        """A prefill chunk computed P(loop) over its positions: keep it at its boundaries' snapshots."""
        if not (self.manager.prefix_caching and self.manager.has_rings):
            return
        for b in self.manager.chunk_boundaries(chunk.start, chunk.start + states.shape[1]):
            s = self.manager.pending_snapshot(chunk.slot, b)
            if s is not None:
                self.s_states[s, loop] = states[0, b - 1 - chunk.start]


class PagedSlotCache(SlotCache):
    """`SlotCache` over a `PagedStore` (its full stores in a shared pool of blocks, block tables) with a
    `PrefixCache`, both asking one `KVCacheManager`. It only builds them: every method is `SlotCache`'s."""

    def __init__(
        self,
        config: PLTConfig,
        max_batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        prefix_caching: bool = True,
        snapshot_every: int | None = None,
        snapshots: int | None = None,
    ) -> None:
        max_blocks = -(-max_len // max(block_size, 1))
        self.manager = KVCacheManager(  # checks the sizes first: nothing is allocated for bad ones
            max_batch,
            max_len,
            block_size,
            (num_blocks if num_blocks is not None else max_batch * max_blocks) + 1,
            has_rings=not config.is_vanilla and config.plt_num_loops > 1,
            window=config.window,
            prefix_caching=prefix_caching,
            snapshot_every=snapshot_every,
            snapshots=snapshots,
        )
        kw = dict(dtype=dtype, device=torch.device(device))
        kv_shape = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
        store = PagedStore(self.manager, 1 if not config.is_vanilla else config.plt_num_loops, kv_shape, kw)
        prefix = PrefixCache(self.manager, store, config, kw)
        super().__init__(config, max_batch, max_len, dtype, device, full=store, prefix=prefix)
        self.block_size, self.max_blocks, self.num_blocks = block_size, self.manager.max_blocks, store.num_blocks

    @property
    def pool(self) -> BlockPool:
        return self.manager.pool

    @property
    def tables(self) -> list[list[int]]:
        """Each slot's block ids (the manager's)."""
        return self.manager.tables

    @property
    def table(self) -> torch.Tensor:
        """(max_batch, max_blocks) the block tables on the device (the paged store's)."""
        return self.full.table
