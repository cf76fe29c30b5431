"""`SlotCache`: the decode engine's preallocated cache (fixed shapes, ring buffers), `SlotStep` (one decode
step's view of it) and `SlotChunk` (one slot as a prefill chunk sees it). `SlotCache` holds the rings, CLP
states and lengths itself and its full stores through a `FullStore` strategy: `ContiguousStore` here (a row
per slot) or `paged.PagedStore` (blocks). Their methods are the only code that indexes these tensors;
the model reads and writes them through `model.cache.DecodeCache` and `model.cache.SequenceCache`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from loopcoder.model.cache import KV, PLTCache

if TYPE_CHECKING:
    from loopcoder.model.config import PLTConfig


@dataclass
class SlotStep:
    """One decode step's view of a `SlotCache`: which slots decode, at which positions, what they may see.

    Made by `SlotCache.begin_step`, read by every layer of the step (`PLTModel.decode_step`), closed by
    `SlotCache.end_step`. Built once per step, so the layers add no index arithmetic of their own.
    """

    n: int  # slots 0..n-1 take part (with fixed shapes: every slot)
    slots: torch.Tensor  # arange(n)
    live: torch.Tensor | None  # (n,) bool, which of them hold a running sequence; None: all of them
    positions: torch.Tensor  # (n,) position t of each new token (an idle slot's is its length, and ignored)
    length: int  # full-store entries read: max(t) + 1 (rounded up to whole blocks when paged), or all of them
    full_mask: torch.Tensor  # (n, 1, 1, length): entries 0..t of the full store
    ring: torch.Tensor | None = None  # (n,) ring slot t mod (w+1) of the new token (PLT loops >= 2)
    ring_mask: torch.Tensor | None = None  # (n, 1, 1, w+1): ring slots that hold a position
    # paged caches (`PagedSlotCache`): where the new token's K/V go, and how to read the full stores
    blocks: torch.Tensor | None = None  # (n,) block of position t (the null block for idle slots)
    offsets: torch.Tensor | None = None  # (n,) t mod block_size
    gather: torch.Tensor | None = None  # (n * kv_heads * blocks,) rows of the pool that make up the stores read
    run: tuple[int, int] | None = None  # (first block, blocks): one sequence whose blocks are consecutive
    _ring_rows: dict = field(default_factory=dict)

    def ring_rows(self, loops: range) -> tuple:
        """(index of these loops' new entries in a layer's rings, their mask repeated per loop), once per step."""
        key = (loops.start, loops.stop)
        if key not in self._ring_rows:
            sel = torch.arange(loops.start - 1, loops.stop - 1, device=self.positions.device)
            dst = (self.slots[:, None], sel[None], slice(None), self.ring[:, None])
            m = self.ring_mask  # expand: no copy, no host sync, CUDA-graph safe
            self._ring_rows[key] = dst, m.unsqueeze(1).expand(-1, len(loops), *m.shape[1:]).flatten(0, 1)
        return self._ring_rows[key]


class FullStore(Protocol):
    """A strategy of the full stores of a `SlotCache`: `ContiguousStore` or `paged.PagedStore`. Loops are
    given as full-store indices `f`; `step` is the `SlotStep` the cache opened."""

    paged: bool
    k: torch.Tensor
    v: torch.Tensor

    def nbytes(self) -> int: ...
    def stats(self) -> dict: ...
    def reserve(self, slot: int, length: int) -> bool: ...
    def room(self, slot: int) -> int: ...
    def capacity(self) -> int | None: ...
    def release(self, slot: int) -> None: ...
    def clear(self, slot: int) -> None: ...
    def slot_tensors(self) -> tuple[torch.Tensor, ...]: ...
    def reorder(
        self, order: list[int], moves: tuple[torch.Tensor, torch.Tensor] | None, lengths: torch.Tensor
    ) -> None: ...
    def fork(self, src: int, dst: int, n: int) -> bool: ...
    def fill_random(self, generator: torch.Generator | None) -> None: ...
    def read(self, layer: int, f: int, slot: int, n: int) -> KV: ...
    def write(self, layer: int, f: int, slot: int, start: int, kv: KV) -> None: ...
    def span(self, length: int, live: torch.Tensor | None) -> int: ...
    def open_step(self, step: SlotStep) -> None: ...
    def write_step(self, layer: int, f: int, step: SlotStep, kv: KV) -> None: ...
    def read_step(self, layer: int, f: int, step: SlotStep) -> KV: ...


class PrefixStore(Protocol):
    """A prefix cache of a `SlotCache` (`paged.PrefixCache`): the cache passes itself, whose rings and states
    a hit restores and a snapshot copies."""

    prefix_caching: bool

    def nbytes(self) -> int: ...
    def stats(self) -> dict: ...
    def has_uncommitted(self, slot: int, length: int) -> bool: ...
    def attach(self, cache: SlotCache, slot: int, tokens: list[int]) -> int: ...
    def commit(self, cache: SlotCache, slot: int, tokens: list[int]) -> None: ...
    def capture_rings(self, cache: SlotCache, chunk: SlotChunk, layer: int, loop: int, kv: KV, first: int) -> None: ...
    def capture_states(self, cache: SlotCache, chunk: SlotChunk, loop: int, states: torch.Tensor) -> None: ...


class ContiguousStore:
    """The full stores of a `SlotCache` with one row of `max_len` positions per slot: `k`, `v` (L, F, B,
    kv_heads, max_len, hd). F = 1 for PLT (loop 1, the shared global cache); F = R for the vanilla looped
    transformer (every loop keeps all positions). The other strategy is `paged.PagedStore` (blocks)."""

    paged = False

    def __init__(self, shape: tuple[int, ...], max_len: int, kw: dict) -> None:
        self.max_len = max_len
        self.k = torch.zeros(shape, **kw)
        self.v = torch.zeros_like(self.k)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v))

    def stats(self) -> dict:
        return {"paged": False}

    # -- slots --------------------------------------------------------------------------------------------
    def reserve(self, slot: int, length: int) -> bool:
        return length <= self.max_len

    def room(self, slot: int) -> int:
        return self.max_len

    def capacity(self) -> int | None:
        return None

    def release(self, slot: int) -> None:
        """Each slot keeps its own row: nothing to give back."""

    def clear(self, slot: int) -> None:
        """Stale entries of a row are masked: nothing to clear."""

    def slot_tensors(self) -> tuple[torch.Tensor, ...]:
        return ()

    def reorder(self, order: list[int], moves: tuple[torch.Tensor, torch.Tensor] | None, lengths: torch.Tensor) -> None:
        if moves is None:
            return
        dst, src = moves
        n = int(lengths.max())
        for t in (self.k, self.v):
            t[:, :, dst, :, :n] = t[:, :, src, :, :n]

    def fork(self, src: int, dst: int, n: int) -> bool:
        self.k[:, :, dst, :, :n] = self.k[:, :, src, :, :n]
        self.v[:, :, dst, :, :n] = self.v[:, :, src, :, :n]
        return True

    def fill_random(self, generator: torch.Generator | None) -> None:
        for t in (self.k, self.v):
            if t.numel():
                t.normal_(generator=generator if t.device.type == "cpu" else None)

    # -- a prefill chunk -----------------------------------------------------------------------------------
    def read(self, layer: int, f: int, slot: int, n: int) -> KV:
        return KV(self.k[layer, f, slot, :, :n][None], self.v[layer, f, slot, :, :n][None])

    def write(self, layer: int, f: int, slot: int, start: int, kv: KV) -> None:
        end = start + kv.k.shape[1]
        self.k[layer, f, slot, :, start:end] = kv.k
        self.v[layer, f, slot, :, start:end] = kv.v

    # -- a decode step -------------------------------------------------------------------------------------
    def span(self, length: int, live: torch.Tensor | None) -> int:
        """Full-store entries a step reads, given `length` (the longest sequence + 1, or `max_len`)."""
        return length

    def open_step(self, step: SlotStep) -> None:
        """Nothing to add: a slot's row is read as a slice."""

    def write_step(self, layer: int, f: int, step: SlotStep, kv: KV) -> None:
        self.k[layer, f][step.slots, :, step.positions] = kv.k[:, :, 0]
        self.v[layer, f][step.slots, :, step.positions] = kv.v[:, :, 0]

    def read_step(self, layer: int, f: int, step: SlotStep) -> KV:
        return KV(self.k[layer, f, : step.n, :, : step.length], self.v[layer, f, : step.n, :, : step.length])


class SlotCache:
    """Preallocated decode cache for up to `max_batch` sequences ("slots"), fixed shapes throughout.

    - `full`: the full stores (loop 1's K/V for PLT, every loop's for the vanilla looped transformer), one of
      two strategies: `ContiguousStore` (a row of `max_len` per slot, the default) or `paged.PagedStore`
      (blocks of a shared pool, given by `PagedSlotCache`). `k`, `v` are its tensors.
    - `rk`, `rv`: (L, B, R-1, kv_heads, w+1, hd) ring buffers of PLT loops >= 2: position t lives in
      ring slot t mod (w+1), so the ring always holds the window t-w .. t. `ring_pos` (B, w+1) is the
      position each ring slot holds (-1: empty), shared by every layer and loop.
    - `states`: (B, R-1, hidden) the CLP states P(r)_{t-1} the next token's rows r+1 read.
    - `lengths`: (B,) tokens cached per slot = position of the slot's next token.
    Decoding sequences occupy slots 0..n-1 so that a decode step works on plain slices (views).

    Every read and write goes through the methods below: `chunk` (a prefill chunk's view of a slot, written
    by `PLTModel.forward`), `load` (a prefilled `PLTCache`), `reserve`/`release`/`reorder`/`fork` (the
    engine's slot bookkeeping), `begin_step`/`end_step` around a decode step, and, per layer,
    `write_full`/`full_kv` (the full stores) and `write_ring`/`ring_kv` (the rings), `saved_states`/
    `save_states` (CLP). Loops are numbered from 0 (loop 1 of the spec is loop 0 here); rings exist for PLT
    loops 1..R-1. `attach`/`commit` are the prefix cache's (`prefix`, which only the paged cache has).
    """

    def __init__(
        self,
        config: PLTConfig,
        max_batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        full: FullStore | None = None,
        prefix: PrefixStore | None = None,
    ) -> None:
        L, R, hkv, hd = config.num_hidden_layers, config.plt_num_loops, config.num_key_value_heads, config.head_dim
        self.plt = not config.is_vanilla
        self.num_loops, self.max_batch, self.max_len = R, max_batch, max_len
        self.window = config.window
        self.num_stores = 1 if self.plt else R
        ring = R - 1 if self.plt else 0
        w1 = self.window + 1
        kw = dict(dtype=dtype, device=device)
        self.dtype, self.device = dtype, torch.device(device)
        self.full = (
            full
            if full is not None
            else ContiguousStore((L, self.num_stores, max_batch, hkv, max_len, hd), max_len, kw)
        )
        self.prefix = prefix
        self.rk = torch.zeros(L, max_batch, ring, hkv, w1 if ring else 0, hd, **kw)
        self.rv = torch.zeros_like(self.rk)
        self.ring_pos = torch.full((max_batch, w1), -1, dtype=torch.long, device=device)
        self.states = torch.zeros(max_batch, R - 1 if self.plt else 0, config.hidden_size, **kw)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)

    @property
    def prefix_caching(self) -> bool:
        return self.prefix is not None and self.prefix.prefix_caching

    @property
    def paged(self) -> bool:
        return self.full.paged

    @property
    def k(self) -> torch.Tensor:
        return self.full.k

    @property
    def v(self) -> torch.Tensor:
        return self.full.v

    @property
    def has_rings(self) -> bool:
        return self.plt and self.num_loops > 1

    def nbytes(self) -> int:
        """Bytes allocated for K/V (full stores and rings)."""
        rings = sum(t.numel() * t.element_size() for t in (self.rk, self.rv))
        return self.full.nbytes() + rings + (self.prefix.nbytes() if self.prefix is not None else 0)

    # -- slots ------------------------------------------------------------------------------------------
    def load(self, slot: int, cache: PLTCache, row: int = 0) -> None:
        """Copy row `row` of a prefilled `PLTCache` (no padding) into `slot`."""
        T = int(cache.get_seq_length())
        if T > self.max_len or not self.reserve(slot, T):
            raise ValueError(f"prefill of {T} tokens exceeds the cache's {self.max_len}")
        for i, layer in enumerate(cache.layers):
            for r, kv in enumerate(layer.loops):
                if r == 0 or not self.plt:
                    self._write_positions(i, r, slot, 0, KV(kv.k[row], kv.v[row]))
                else:
                    ring = cache.window_positions[row] % (self.window + 1)
                    self.rk[i, slot, r - 1][:, ring] = kv.k[row]
                    self.rv[i, slot, r - 1][:, ring] = kv.v[row]
        self.ring_pos[slot] = -1
        if cache.window_positions is not None:
            self.ring_pos[slot, cache.window_positions[row] % (self.window + 1)] = cache.window_positions[row]
        for r, s in enumerate(cache.states):
            if s is not None and self.states.shape[1]:
                self.states[slot, r] = s[row]
        self.lengths[slot] = T

    def chunk(self, slot: int) -> SlotChunk:
        """The view `PLTModel.forward` continues `slot`'s sequence through (a chunk of its prefill)."""
        return SlotChunk(self, slot)

    def reserve(self, slot: int, length: int) -> bool:
        """Make room for `length` positions in `slot`; False if there is none (the slot keeps what it had)."""
        return self.full.reserve(slot, length)

    def room(self, slot: int) -> int:
        """Positions `slot` could hold now (what `reserve` would grant)."""
        return self.full.room(slot)

    def release(self, slot: int) -> None:
        """Forget `slot`'s sequence (it finished, failed or was preempted)."""
        self.full.release(slot)
        self._clear(slot)

    def reorder(self, order: list[int]) -> None:
        """Slot i takes the sequence of slot order[i] (a permutation of the kept slots; others were released)."""
        moved = [(dst, src) for dst, src in enumerate(order) if dst != src]
        moves = None
        if moved:
            dst = torch.tensor([d for d, _ in moved], device=self.device)
            src = torch.tensor([s for _, s in moved], device=self.device)
            for t in self._slot_tensors():  # the right-hand side is gathered first: a permutation is safe
                t[dst] = t[src]
            for t in (self.rk, self.rv):
                t[:, dst] = t[:, src]
            moves = (dst, src)
        self.full.reorder(order, moves, self.lengths)
        for slot in range(len(order), self.max_batch):  # vacated slots hold nothing
            self._clear(slot)

    def _clear(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.ring_pos[slot] = -1
        self.full.clear(slot)

    def _slot_tensors(self) -> tuple[torch.Tensor, ...]:
        """Per-slot tensors indexed by slot on their first axis."""
        return (self.ring_pos, self.states, self.lengths, *self.full.slot_tensors())

    def fork(self, src: int, dst: int) -> bool:
        """Give `dst` a copy of `src`'s sequence (n samples of one prompt share its prefill); False if the
        full store has no room for it."""
        if not self.full.fork(src, dst, int(self.lengths[src])):
            return False
        self.rk[:, dst] = self.rk[:, src]
        self.rv[:, dst] = self.rv[:, src]
        for t in (self.ring_pos, self.states, self.lengths):
            t[dst] = t[src]
        return True

    def capacity(self) -> int | None:
        """Positions the whole cache holds for all sequences together (None: each slot holds `max_len`)."""
        return self.full.capacity()

    # -- the prefix cache (`prefix`: only a paged cache has one) -------------------------------------------
    def has_uncommitted(self, slot: int, length: int) -> bool:
        """Whether `length` positions of `slot` fill blocks not yet entered in the prefix cache (`commit`)."""
        return self.prefix is not None and self.prefix.has_uncommitted(slot, length)

    def attach(self, slot: int, tokens: list[int]) -> int:
        """Start `slot`'s sequence from the longest cached prefix of `tokens`; the tokens it covers."""
        return 0 if self.prefix is None else self.prefix.attach(self, slot, tokens)

    def commit(self, slot: int, tokens: list[int]) -> None:
        """`tokens` are the sequence in `slot` so far: cache its full blocks for later prompts."""
        if self.prefix is not None:
            self.prefix.commit(self, slot, tokens)

    def stats(self) -> dict:
        prefix = self.prefix.stats() if self.prefix is not None else {}
        return {**self.full.stats(), "allocated_bytes": self.nbytes(), **prefix}

    def fill_random(self, n: int, length: int, generator: torch.Generator | None = None) -> None:
        """Pretend slots 0..n-1 were prefilled with `length` tokens: random K/V and states (benchmarks)."""
        for slot in range(n):
            if not self.reserve(slot, length + 1):
                raise ValueError(f"{n} sequences of {length} tokens do not fit in the cache")
        self.full.fill_random(generator)
        for t in (self.rk, self.rv, self.states):
            if t.numel():  # in place, drawn where they live: caches can be GBs
                t.normal_(generator=generator if t.device.type == "cpu" else None)
        w1 = self.ring_pos.shape[1]
        pos = torch.arange(length - w1, length, device=self.ring_pos.device)
        self.ring_pos[:n, pos % w1] = pos
        self.lengths[:n] = length

    def snapshot(self) -> tuple:
        """The bookkeeping a decode step advances (lengths, ring positions, states), for `restore`."""
        return self.lengths.clone(), self.ring_pos.clone(), self.states.clone()

    def restore(self, snapshot: tuple) -> None:
        for t, saved in zip((self.lengths, self.ring_pos, self.states), snapshot):
            t.copy_(saved)

    # -- the full stores, for a prefill chunk -------------------------------------------------------------
    def _store_index(self, loop: int) -> int:
        return 0 if self.plt else loop

    def _read_positions(self, layer: int, loop: int, slot: int, n: int) -> KV:
        """K/V (1, kv_heads, n, hd) of positions 0..n-1 of `slot`'s full store of `loop`."""
        return self.full.read(layer, self._store_index(loop), slot, n)

    def _write_positions(self, layer: int, loop: int, slot: int, start: int, kv: KV) -> None:
        """Store K/V (kv_heads, S, hd) at positions start..start+S-1 of `slot`'s full store of `loop`."""
        self.full.write(layer, self._store_index(loop), slot, start, kv)

    # -- one decode step -----------------------------------------------------------------------------------
    def begin_step(self, n: int, live: torch.Tensor | None = None) -> SlotStep:
        """Open a decode step of one new token for slots 0..n-1 and record its ring slot.

        `live=None`: every slot 0..n-1 runs and the step reads only the entries in use (one host sync for
        their maximum). With a `live` mask the shapes are fixed (`n` = every slot, the whole store) and no
        value leaves the device: what `torch.compile` and CUDA graphs need. An idle slot (not live) writes at
        its own next position, which holds nothing yet: a slot whose prompt is still being prefilled in
        chunks keeps every entry it has.
        """
        t = self.lengths[:n]
        length = int(t.max()) + 1 if live is None else self.max_len
        step = self._new_step(n, live, t, self.full.span(length, live))
        self.full.open_step(step)
        if self.has_rings:
            step.ring = ring = t % (self.window + 1)
            rows = self.ring_pos[:n]
            new = t[:, None] if live is None else torch.where(live[:, None], t[:, None], rows.gather(1, ring[:, None]))
            rows.scatter_(1, ring[:, None], new)
            step.ring_mask = (rows >= 0)[:, None, None]
        return step

    def _new_step(self, n: int, live: torch.Tensor | None, t: torch.Tensor, length: int) -> SlotStep:
        full_mask = (torch.arange(length, device=t.device)[None] <= t[:, None])[:, None, None]
        return SlotStep(n, torch.arange(n, device=t.device), live, t, length, full_mask)

    def end_step(self, step: SlotStep) -> None:
        """Close a step: each running slot now holds one more token."""
        grow = 1 if step.live is None else step.live.to(self.lengths.dtype)
        self.lengths[: step.n] += grow

    def write_full(self, layer: int, loop: int, step: SlotStep, kv: KV) -> None:
        """Store the new token's K/V (n, kv_heads, 1, hd) of `loop` at its position: loop 0's for PLT (the
        shared global cache), every loop's for the vanilla looped transformer."""
        self.full.write_step(layer, self._store_index(loop), step, kv)

    def full_kv(self, layer: int, loop: int, step: SlotStep) -> KV:
        """The full-store K/V a loop's causal attention reads (mask: `step.full_mask`): loop 0's for PLT (the
        global branch of every loop), the loop's own for the vanilla looped transformer."""
        return self.full.read_step(layer, self._store_index(loop), step)

    def write_ring(self, layer: int, loops: range, step: SlotStep, kv: KV) -> None:
        """Store the new token's K/V (n, kv_heads, len(loops), hd) of PLT loops `loops` (>= 1) in their rings."""
        dst, _ = step.ring_rows(loops)
        self.rk[layer][dst] = kv.k.transpose(1, 2)
        self.rv[layer][dst] = kv.v.transpose(1, 2)

    def ring_kv(self, layer: int, loops: range, step: SlotStep) -> tuple[KV, torch.Tensor]:
        """The rings of PLT loops `loops` as (n * len(loops), kv_heads, w+1, hd), sequence-major, and their mask."""
        a, b = loops.start - 1, loops.stop - 1
        kv = KV(self.rk[layer, : step.n, a:b].flatten(0, 1), self.rv[layer, : step.n, a:b].flatten(0, 1))
        return kv, step.ring_rows(loops)[1]

    def saved_states(self, step: SlotStep) -> torch.Tensor:
        """(n, R-1, hidden): P(r)_{t-1}, r = 1..R-1, saved by the previous step (or the prefill)."""
        return self.states[: step.n]

    def save_states(self, step: SlotStep, states: torch.Tensor) -> None:
        """Keep P(r)_t (n, R-1, hidden) of the new tokens for the next step's CLP rows."""
        if step.live is None:
            self.states[: step.n] = states
        else:
            self.states[: step.n] = torch.where(step.live[:, None, None], states, self.states[: step.n])


class SlotChunk:
    """One slot of a `SlotCache` as `PLTModel.forward` sees a cache (`SequenceCache`), for a prefill chunk.

    The forward continues the slot's sequence by S positions: it reads the cached K/V (the full stores, the
    rings of PLT loops >= 2 in position order) and the CLP states P(r) of the position before the chunk, and
    writes back the chunk's K/V (positions start..start+S-1 of the full stores, the last w+1 of each ring) and
    P(r) of its last position. A prefix cache also takes its boundary snapshots here (`capture_*`).
    """

    def __init__(self, cache: SlotCache, slot: int) -> None:
        self.cache, self.slot = cache, slot
        self.start = start = int(cache.lengths[slot])
        w1 = cache.window + 1
        dev = cache.device
        self.global_positions = torch.arange(start, device=dev)[None] if start else None
        self.window_positions = self._ring_order = None
        if cache.has_rings and start:
            pos = torch.arange(max(0, start - w1), start, device=dev)
            self.window_positions, self._ring_order = pos[None], pos % w1
        R = cache.num_loops
        self.states: list[torch.Tensor | None] = [None] * (R - 1)
        if start and cache.plt:
            self.states = [cache.states[slot, r][None].clone() for r in range(R - 1)]  # overwritten as loops finish

    def get_seq_length(self) -> int:
        return self.start

    def next_positions(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch_size,), self.start, dtype=torch.long, device=device)

    def _is_ring(self, loop: int) -> bool:
        return self.cache.has_rings and loop > 0

    def past(self, layer: int, loop: int) -> KV | None:
        if not self.start:
            return None
        c = self.cache
        if not self._is_ring(loop):
            return c._read_positions(layer, loop, self.slot, self.start)
        ring = self._ring_order
        return KV(c.rk[layer, self.slot, loop - 1][:, ring][None], c.rv[layer, self.slot, loop - 1][:, ring][None])

    def store(self, layer: int, loop: int, kv: KV) -> None:
        """`kv` (1, kv_heads, past + S, hd) is the loop's K/V over the cached entries and the chunk."""
        c = self.cache
        if not self._is_ring(loop):
            c._write_positions(
                layer, loop, self.slot, self.start, KV(kv.k[0, :, self.start :], kv.v[0, :, self.start :])
            )
            return
        w1 = c.window + 1
        first = self.start - (0 if self._ring_order is None else len(self._ring_order))  # position of kv's entry 0
        keep = min(w1, kv.k.shape[2])
        pos = torch.arange(first + kv.k.shape[2] - keep, first + kv.k.shape[2], device=c.device)
        c.rk[layer, self.slot, loop - 1][:, pos % w1] = kv.k[0, :, -keep:]
        c.rv[layer, self.slot, loop - 1][:, pos % w1] = kv.v[0, :, -keep:]
        if c.prefix is not None:
            c.prefix.capture_rings(c, self, layer, loop, kv, first)

    def save_loop_states(self, loop: int, states: torch.Tensor) -> None:
        """P(loop) over the chunk, (1, S, hidden): its last position is what the next position's CLP reads."""
        self.cache.states[self.slot, loop] = states[0, -1]
        if self.cache.prefix is not None:
            self.cache.prefix.capture_states(self.cache, self, loop, states)

    def advance(self, positions: torch.Tensor) -> None:
        c = self.cache
        end = self.start + positions.shape[1]
        c.lengths[self.slot] = end
        if c.has_rings:
            w1 = c.window + 1
            pos = torch.arange(max(0, end - w1), end, device=c.device)
            c.ring_pos[self.slot, pos % w1] = pos
