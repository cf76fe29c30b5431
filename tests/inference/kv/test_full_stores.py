"""The two full-store strategies of `SlotCache` (a row per slot, blocks of a pool) hold and return the same K/V:
written by prefill chunks and decode steps, read back, moved by reorder and fork."""

from __future__ import annotations

import pytest
import torch

from loopcoder.inference.kv.paged import PagedSlotCache, PagedStore
from loopcoder.inference.kv.store import ContiguousStore, SlotCache
from loopcoder.model.cache import KV
from support.models import ARCHS, tiny_config


def caches(arch: str):
    cfg = tiny_config(plt_num_loops=2, **ARCHS[arch])
    flat = SlotCache(cfg, 3, 24, torch.float32, "cpu")
    # 15 blocks of 4 for 3 slots
    paged = PagedSlotCache(cfg, 3, 24, torch.float32, "cpu", block_size=4, num_blocks=15, prefix_caching=False)
    return cfg, flat, paged


def kv(cfg, n: int, seed: int) -> KV:
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.num_key_value_heads, n, cfg.head_dim)
    return KV(torch.randn(shape, generator=g), torch.randn(shape, generator=g))


def test_the_strategies():
    _, flat, paged = caches("plt")
    assert isinstance(flat.full, ContiguousStore) and not flat.paged and flat.capacity() is None
    assert isinstance(paged.full, PagedStore) and paged.paged and paged.capacity() == 15 * 4
    assert paged.k is paged.full.k and paged.table is paged.full.table


@pytest.mark.parametrize("arch", ["plt", "vanilla"])
def test_both_strategies_read_back_what_was_written(arch):
    cfg, flat, paged = caches(arch)
    loops = range(cfg.plt_num_loops if arch == "vanilla" else 1)
    lengths = [9, 5, 13]
    for c in (flat, paged):
        for slot in range(3):  # one block each first: the tables interleave, so reads gather (not one view)
            assert c.reserve(slot, 4)
        for slot, n in enumerate(lengths):  # in two pieces, the second starting inside a block
            assert c.reserve(slot, n)
            for layer in range(cfg.num_hidden_layers):
                for loop in loops:
                    whole = kv(cfg, n, seed=100 * slot + 10 * layer + loop)
                    c._write_positions(layer, loop, slot, 0, KV(whole.k[:, :3], whole.v[:, :3]))
                    c._write_positions(layer, loop, slot, 3, KV(whole.k[:, 3:], whole.v[:, 3:]))
            c.lengths[slot] = n

    def read_all(c):
        return [
            c._read_positions(layer, loop, slot, n)
            for slot, n in enumerate(lengths)
            for layer in range(cfg.num_hidden_layers)
            for loop in loops
        ]

    assert paged.tables[0] == [1, 4, 5] and not paged.manager.is_run(0, 3)
    written = [
        kv(cfg, n, seed=100 * slot + 10 * layer + loop)
        for slot, n in enumerate(lengths)
        for layer in range(cfg.num_hidden_layers)
        for loop in loops
    ]
    for a, b, w in zip(read_all(flat), read_all(paged), written, strict=True):
        assert torch.equal(a.k[0], w.k) and torch.equal(a.v[0], w.v)  # what was written, not only the same
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)

    # a decode step: each slot writes one token; what the step reads (under its mask) is the same
    for c in (flat, paged):
        for slot, n in enumerate(lengths):
            assert c.reserve(slot, n + 1)
    steps = [c.begin_step(3) for c in (flat, paged)]
    new = kv(cfg, 3, seed=7)
    token = KV(new.k.transpose(0, 1)[:, :, None], new.v.transpose(0, 1)[:, :, None])  # (n, kv_heads, 1, hd)
    for c, step in zip((flat, paged), steps):
        for layer in range(cfg.num_hidden_layers):
            for loop in loops:
                c.write_full(layer, loop, step, token)
    for layer in range(cfg.num_hidden_layers):
        for loop in loops:
            (a, b), masks = (
                [c.full_kv(layer, loop, s) for c, s in zip((flat, paged), steps)],
                [s.full_mask for s in steps],
            )
            for slot, n in enumerate(lengths):
                seen_a = a.k[slot][:, masks[0][slot, 0, 0]]
                seen_b = b.k[slot][:, masks[1][slot, 0, 0]]
                assert seen_a.shape[1] == n + 1 and torch.equal(seen_a, seen_b)
    for c, s in zip((flat, paged), steps):
        c.end_step(s)

    # reorder (slot 0 finished) and fork: the sequences move with their K/V
    for c in (flat, paged):
        c.release(0)
        c.reorder([2, 1])
        assert c.fork(0, 2)
        assert c.lengths.tolist() == [14, 6, 14]
    for slot in range(3):
        n = int(flat.lengths[slot])
        a, b = flat._read_positions(0, 0, slot, n), paged._read_positions(0, 0, slot, n)
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
