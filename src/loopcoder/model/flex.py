"""flex_attention for training on GPU: block-sparse causal and sliding-window masks, no dense mask.

Compiled on CUDA (the fused kernel); on CPU torch runs flex_attention unfused, which is only useful
for testing that this path matches SDPA.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention import flex_attention as _flex


@functools.cache
def _compiled():
    return torch.compile(_flex.flex_attention, dynamic=False)


def flex_attention(q, k, v, block_mask, enable_gqa: bool) -> torch.Tensor:
    if q.is_cuda:
        return _compiled()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _flex.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


@functools.lru_cache(maxsize=16)
def block_masks(seq_len: int, window: int | None, device: torch.device):
    """(causal, window) BlockMasks over a fresh sequence whose keys are its queries (window: None without one)."""

    def causal(b, h, q, kv):
        return q >= kv

    def sliding(b, h, q, kv):
        return (q >= kv) & (q - kv <= window)

    make = functools.partial(_flex.create_block_mask, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)
    return make(causal), None if window is None else make(sliding)
