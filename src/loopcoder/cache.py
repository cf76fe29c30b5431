"""`PLTCache`: the PLT key/value cache as a transformers `Cache` (spec 1.2 and 1.3).

Per physical layer it keeps loop 1's K/V for every position (the shared global cache), only the
last w+1 K/V of each later PLT loop (their local window), and every position of each loop for the
vanilla looped transformer. Besides K/V it keeps the CLP states P(r)_{t-1}, r = 1..R-1, that the
next position's loop r+1 reads, and the true position of every cached slot (-1 for padding).

This is the growing cache used by `model.generate` and by prefill. `SlotCache` is the decode engine's
preallocated one (fixed shapes, ring buffers); its methods are the only code that indexes its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:
    from loopcoder.config import PLTConfig


class KV(NamedTuple):
    """Keys and values of one attention branch, (batch, kv_heads, positions, head_dim), after RoPE."""

    k: torch.Tensor
    v: torch.Tensor


class PLTCacheLayer(CacheLayerMixin):
    """The K/V of one physical layer, one entry per loop. `keys`/`values` are loop 1's."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, keep: list[int | None]) -> None:
        super().__init__()
        self.keep = keep  # per loop: how many trailing positions to keep (None: all)
        self.loops: list[KV | None] = [None] * len(keep)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def store(self, loop: int, kv: KV) -> None:
        keep = self.keep[loop]
        if keep is not None and kv.k.shape[2] > keep:
            kv = type(kv)(kv.k[:, :, -keep:], kv.v[:, :, -keep:])
        self.loops[loop] = kv
        if loop == 0:
            self.keys, self.values, self.is_initialized = kv.k, kv.v, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple:
        raise NotImplementedError("PLTCache is written by PLTModel.forward, loop by loop (see PLTCache.store)")

    def get_seq_length(self) -> int:
        return 0 if self.loops[0] is None else self.loops[0].k.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.loops if kv is not None for t in kv)

    def map_batch(self, fn) -> None:
        """Apply `fn` (a batch-dimension index/repeat) to every tensor."""
        for r, kv in enumerate(self.loops):
            if kv is not None:
                self.store(r, type(kv)(fn(kv.k), fn(kv.v)))

    def reset(self) -> None:
        self.loops = [None] * len(self.keep)
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_batch(lambda t: t[indices])


class PLTCache(Cache):
    """K/V per (layer, loop), CLP states and slot positions of a PLT (or vanilla looped) model."""

    def __init__(self, config: PLTConfig) -> None:
        R = config.plt_num_loops
        self.window = None if config.is_vanilla or R == 1 else config.window
        keep = [None] + [None if self.window is None else self.window + 1] * (R - 1)
        super().__init__(layers=[PLTCacheLayer(keep) for _ in range(config.num_hidden_layers)])
        self.num_loops = R
        self.states: list[torch.Tensor | None] = [None] * (R - 1)  # P(r) at the last position, (B, hidden)
        self.global_positions: torch.Tensor | None = None  # (B, T): position of each loop-1 slot, -1 = pad
        self.window_positions: torch.Tensor | None = None  # (B, <= w+1): the same for the local window

    # -- written and read by PLTModel.forward -----------------------------------------------------------
    def past(self, layer: int, loop: int) -> KV | None:
        return self.layers[layer].loops[loop]

    def store(self, layer: int, loop: int, kv: KV) -> None:
        self.layers[layer].store(loop, kv)

    def advance(self, positions: torch.Tensor) -> None:
        """Record the positions of the chunk just written (after every layer and loop stored it)."""
        g = positions if self.global_positions is None else torch.cat([self.global_positions, positions], 1)
        self.global_positions = g
        if self.window is not None:
            w = positions if self.window_positions is None else torch.cat([self.window_positions, positions], 1)
            self.window_positions = w[:, -(self.window + 1):]

    def next_positions(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """(B,) position of the next token of each sequence."""
        if self.global_positions is None:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        return self.global_positions.max(-1).values + 1

    # -- transformers Cache API ---------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.global_positions is None else self.global_positions.shape[1]

    def nbytes(self, include_states: bool = False) -> int:
        """Bytes of cached K/V: 2 * L * kv_heads * head_dim * (T + (R-1) * min(w+1, T)) * dtype bytes for
        PLT, R * T entries for the vanilla looped transformer. States (R-1 vectors) only if asked."""
        total = sum(layer.nbytes() for layer in self.layers)
        if include_states:
            total += sum(s.numel() * s.element_size() for s in self.states if s is not None)
        return total

    def _map_batch(self, fn) -> None:
        for layer in self.layers:
            layer.map_batch(fn)
        self.states = [None if s is None else fn(s) for s in self.states]
        if self.global_positions is not None:
            self.global_positions = fn(self.global_positions)
        if self.window_positions is not None:
            self.window_positions = fn(self.window_positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.states = [None] * (self.num_loops - 1)
        self.global_positions = self.window_positions = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a PLT cache holds per-loop states and cannot be cropped")


@dataclass
class SlotStep:
    """One decode step's view of a `SlotCache`: which slots decode, at which positions, what they may see.

    Made by `SlotCache.begin_step`, read by every layer of the step (`PLTModel.decode_step`), closed by
    `SlotCache.end_step`. Built once per step, so the layers add no index arithmetic of their own.
    """

    n: int  # slots 0..n-1 take part (with fixed shapes: every slot)
    slots: torch.Tensor  # arange(n)
    live: torch.Tensor | None  # (n,) bool, which of them hold a running sequence; None: all of them
    positions: torch.Tensor  # (n,) position t of each new token (a free slot's is 0 and ignored)
    length: int  # full-store entries read: max(t) + 1, or the whole store with fixed shapes
    full_mask: torch.Tensor  # (n, 1, 1, length): entries 0..t of the full store
    ring: torch.Tensor | None = None  # (n,) ring slot t mod (w+1) of the new token (PLT loops >= 2)
    ring_mask: torch.Tensor | None = None  # (n, 1, 1, w+1): ring slots that hold a position
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


class SlotCache:
    """Preallocated decode cache for up to `max_batch` sequences ("slots"), fixed shapes throughout.

    - `k`, `v`: (L, F, B, kv_heads, max_len, hd) full-length stores. F = 1 for PLT (loop 1, the shared
      global cache); F = R for the vanilla looped transformer (every loop keeps all positions).
    - `rk`, `rv`: (L, B, R-1, kv_heads, w+1, hd) ring buffers of PLT loops >= 2: position t lives in
      ring slot t mod (w+1), so the ring always holds the window t-w .. t. `ring_pos` (B, w+1) is the
      position each ring slot holds (-1: empty), shared by every layer and loop.
    - `states`: (B, R-1, hidden) the CLP states P(r)_{t-1} the next token's rows r+1 read.
    - `lengths`: (B,) tokens cached per slot = position of the slot's next token.
    Active sequences occupy slots 0..n-1 so that a decode step works on plain slices (views).

    Every read and write goes through the methods below: `load`/`copy_slot` (admission and compaction),
    `begin_step`/`end_step` around a decode step, and, per layer, `write_full`/`full_kv` (the full stores)
    and `write_ring`/`ring_kv` (the rings), `saved_states`/`save_states` (CLP). Loops are numbered from 0
    (loop 1 of the spec is loop 0 here); rings exist for PLT loops 1..R-1.
    """

    def __init__(self, config: PLTConfig, max_batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        L, R, hkv, hd = config.num_hidden_layers, config.plt_num_loops, config.num_key_value_heads, config.head_dim
        self.plt = not config.is_vanilla
        self.num_loops, self.max_batch, self.max_len = R, max_batch, max_len
        self.window = config.window
        full = 1 if self.plt else R
        ring = R - 1 if self.plt else 0
        w1 = self.window + 1
        kw = dict(dtype=dtype, device=device)
        self.k = torch.zeros(L, full, max_batch, hkv, max_len, hd, **kw)
        self.v = torch.zeros_like(self.k)
        self.rk = torch.zeros(L, max_batch, ring, hkv, w1 if ring else 0, hd, **kw)
        self.rv = torch.zeros_like(self.rk)
        self.ring_pos = torch.full((max_batch, w1), -1, dtype=torch.long, device=device)
        self.states = torch.zeros(max_batch, R - 1 if self.plt else 0, config.hidden_size, **kw)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)

    def nbytes(self) -> int:
        """Bytes allocated for K/V (full stores and rings)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.rk, self.rv))

    # -- slots ------------------------------------------------------------------------------------------
    def load(self, slot: int, cache: PLTCache, row: int = 0) -> None:
        """Copy row `row` of a prefilled `PLTCache` (no padding) into `slot`."""
        T = int(cache.get_seq_length())
        if T > self.max_len:
            raise ValueError(f"prefill of {T} tokens exceeds the cache's {self.max_len}")
        for i, layer in enumerate(cache.layers):
            for r, kv in enumerate(layer.loops):
                if r == 0 or not self.plt:
                    self.k[i, r, slot, :, :T] = kv.k[row]
                    self.v[i, r, slot, :, :T] = kv.v[row]
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

    def copy_slot(self, src: int, dst: int) -> None:
        """Move a sequence to another slot (compaction after a sequence finishes)."""
        n = int(self.lengths[src])
        self.k[:, :, dst, :, :n] = self.k[:, :, src, :, :n]
        self.v[:, :, dst, :, :n] = self.v[:, :, src, :, :n]
        self.rk[:, dst] = self.rk[:, src]
        self.rv[:, dst] = self.rv[:, src]
        self.ring_pos[dst] = self.ring_pos[src]
        self.states[dst] = self.states[src]
        self.lengths[dst] = n

    def fill_random(self, n: int, length: int, generator: torch.Generator | None = None) -> None:
        """Pretend slots 0..n-1 were prefilled with `length` tokens: random K/V and states (benchmarks)."""
        for t in (self.k, self.v, self.rk, self.rv, self.states):
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

    # -- one decode step -----------------------------------------------------------------------------------
    def begin_step(self, n: int, live: torch.Tensor | None = None) -> SlotStep:
        """Open a decode step of one new token for slots 0..n-1 and record its ring slot.

        `live=None`: every slot 0..n-1 runs and the step reads only the entries in use (one host sync for
        their maximum). With a `live` mask the shapes are fixed (`n` = every slot, the whole store) and no
        value leaves the device: what `torch.compile` and CUDA graphs need.
        """
        if live is None:
            t = self.lengths[:n]
            length = int(t.max()) + 1
        else:
            t = torch.where(live, self.lengths[:n], 0)
            length = self.max_len
        full_mask = (torch.arange(length, device=t.device)[None] <= t[:, None])[:, None, None]
        step = SlotStep(n, torch.arange(n, device=t.device), live, t, length, full_mask)
        if self.plt and self.num_loops > 1:
            step.ring = ring = t % (self.window + 1)
            rows = self.ring_pos[:n]
            new = t[:, None] if live is None else torch.where(live[:, None], t[:, None], rows.gather(1, ring[:, None]))
            rows.scatter_(1, ring[:, None], new)
            step.ring_mask = (rows >= 0)[:, None, None]
        return step

    def end_step(self, step: SlotStep) -> None:
        """Close a step: each running slot now holds one more token."""
        grow = 1 if step.live is None else step.live.to(self.lengths.dtype)
        self.lengths[:step.n] += grow

    def write_full(self, layer: int, loop: int, step: SlotStep, kv: KV) -> None:
        """Store the new token's K/V (n, kv_heads, 1, hd) of `loop` at its position: loop 0's for PLT (the
        shared global cache), every loop's for the vanilla looped transformer."""
        store = 0 if self.plt else loop
        self.k[layer, store][step.slots, :, step.positions] = kv.k[:, :, 0]
        self.v[layer, store][step.slots, :, step.positions] = kv.v[:, :, 0]

    def full_kv(self, layer: int, loop: int, step: SlotStep) -> KV:
        """The full-store K/V a loop's causal attention reads (mask: `step.full_mask`): loop 0's for PLT (the
        global branch of every loop), the loop's own for the vanilla looped transformer."""
        store = 0 if self.plt else loop
        return KV(self.k[layer, store, :step.n, :, :step.length], self.v[layer, store, :step.n, :, :step.length])

    def write_ring(self, layer: int, loops: range, step: SlotStep, kv: KV) -> None:
        """Store the new token's K/V (n, kv_heads, len(loops), hd) of PLT loops `loops` (>= 1) in their rings."""
        dst, _ = step.ring_rows(loops)
        self.rk[layer][dst] = kv.k.transpose(1, 2)
        self.rv[layer][dst] = kv.v.transpose(1, 2)

    def ring_kv(self, layer: int, loops: range, step: SlotStep) -> tuple[KV, torch.Tensor]:
        """The rings of PLT loops `loops` as (n * len(loops), kv_heads, w+1, hd), sequence-major, and their mask."""
        a, b = loops.start - 1, loops.stop - 1
        kv = KV(self.rk[layer, :step.n, a:b].flatten(0, 1), self.rv[layer, :step.n, a:b].flatten(0, 1))
        return kv, step.ring_rows(loops)[1]

    def saved_states(self, step: SlotStep) -> torch.Tensor:
        """(n, R-1, hidden): P(r)_{t-1}, r = 1..R-1, saved by the previous step (or the prefill)."""
        return self.states[:step.n]

    def save_states(self, step: SlotStep, states: torch.Tensor) -> None:
        """Keep P(r)_t (n, R-1, hidden) of the new tokens for the next step's CLP rows."""
        if step.live is None:
            self.states[:step.n] = states
        else:
            self.states[:step.n] = torch.where(step.live[:, None, None], states, self.states[:step.n])
