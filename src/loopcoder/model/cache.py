"""`PLTCache`: the PLT key/value cache as a transformers `Cache` (spec 1.2 and 1.3).

Per physical layer it keeps loop 1's K/V for every position (the shared global cache), only the
last w+1 K/V of each later PLT loop (their local window), and every position of each loop for the
vanilla looped transformer. Besides K/V it keeps the CLP states P(r)_{t-1}, r = 1..R-1, that the
next position's loop r+1 reads, and the true position of every cached slot (-1 for padding).

This is the growing cache used by `model.generate` and by prefill. The decode engine's preallocated one
(`inference.kv.store.SlotCache`) is seen by the model only through the two protocols at the end of this
module, `SequenceCache` (a prefill chunk) and `DecodeCache` (a decode step), so that the model imports
nothing from the inference package (and an exported checkpoint ships the model alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:
    from loopcoder.model.config import PLTConfig


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

    def save_loop_states(self, loop: int, states: torch.Tensor) -> None:
        """Keep P(loop) (B, S, hidden) of the chunk's last position: the next position's CLP input reads it."""
        self.states[loop] = states[:, -1].detach()

    def advance(self, positions: torch.Tensor) -> None:
        """Record the positions of the chunk just written (after every layer and loop stored it)."""
        g = positions if self.global_positions is None else torch.cat([self.global_positions, positions], 1)
        self.global_positions = g
        if self.window is not None:
            w = positions if self.window_positions is None else torch.cat([self.window_positions, positions], 1)
            self.window_positions = w[:, -(self.window + 1) :]

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


class SequenceCache(Protocol):
    """What `PLTModel.forward` reads and writes of a cache when it continues cached sequences by a chunk of
    positions: `PLTCache`, or one slot of the engine's cache (`SlotCache.chunk`)."""

    states: list[torch.Tensor | None]  # P(r) of the position before the chunk, (B, hidden), or None at position 0
    global_positions: torch.Tensor | None  # (B, T): the position of each cached loop-1 entry, -1 = padding
    window_positions: torch.Tensor | None  # (B, <= w+1): the same for the entries of the local window

    def get_seq_length(self) -> int: ...
    def next_positions(self, batch_size: int, device: torch.device) -> torch.Tensor: ...
    def past(self, layer: int, loop: int) -> KV | None: ...
    def store(self, layer: int, loop: int, kv: KV) -> None: ...
    def save_loop_states(self, loop: int, states: torch.Tensor) -> None: ...
    def advance(self, positions: torch.Tensor) -> None: ...


class DecodeStep(Protocol):
    """What a decode step's layers read of the step the cache opened (`DecodeCache`)."""

    positions: torch.Tensor  # (n,) position t of each new token
    full_mask: torch.Tensor  # (n, 1, 1, length): the full-store entries each row may see


class DecodeCache(Protocol):
    """What `PLTModel.decode_step` reads and writes of the engine's cache in one decode step (loops numbered
    from 0; rings exist for PLT loops 1..R-1): `inference.kv.store.SlotCache` and its paged strategy."""

    def write_full(self, layer: int, loop: int, step: Any, kv: KV) -> None: ...
    def full_kv(self, layer: int, loop: int, step: Any) -> KV: ...
    def write_ring(self, layer: int, loops: range, step: Any, kv: KV) -> None: ...
    def ring_kv(self, layer: int, loops: range, step: Any) -> tuple[KV, torch.Tensor]: ...
    def saved_states(self, step: Any) -> torch.Tensor: ...
    def save_states(self, step: Any, states: torch.Tensor) -> None: ...
    def end_step(self, step: Any) -> None: ...
