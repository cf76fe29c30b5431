"""`decode_step`, the model's single-token schedule (spec 1.3), against its own full-sequence forward.

Each test prefills prompts with `forward` into a `SlotCache` (as the engine does), then feeds the rest of
the sequence one token per step through `decode_step`, in float64, so any difference is a real one.
"""

from __future__ import annotations

import pytest
import torch

from loopcoder.inference.kv.store import SlotCache
from loopcoder.model.cache import PLTCache
from support.models import ARCHS, tiny_model

TOL = dict(rtol=1e-9, atol=1e-9)
SEQS = [[5, 9, 11, 3, 7, 8, 2, 4, 6, 10, 12, 1, 3, 5], [4, 6, 10, 8, 3, 9, 2, 7, 1, 5], [30, 2, 8, 19, 4, 11]]
PREFILL = [5, 1, 3]  # prompt lengths: windows wrap (w = 3) both in the prefill and while decoding


def decode(model, seqs, prefill, parallel=True, fixed=False, max_batch=None):
    """Logits (per sequence: one row per decoded position) of `seqs`, prefilled to `prefill` tokens and then
    decoded together one token per step. `fixed`: every slot and the full store (the CUDA-graph shapes)."""
    n = len(seqs)
    cache = SlotCache(model.config, max_batch or n, 32, torch.float64, "cpu")
    for slot, (seq, p) in enumerate(zip(seqs, prefill)):
        with torch.no_grad():
            cache.load(slot, model(torch.tensor([seq[:p]]), cache=PLTCache(model.config)).cache)
    out = [[] for _ in seqs]
    with torch.no_grad():
        for k in range(max(len(s) - p for s, p in zip(seqs, prefill))):
            # every sequence advances each step; a finished one is fed a dummy token, its logits ignored
            toks = [seq[p + k] if p + k < len(seq) else 0 for seq, p in zip(seqs, prefill)]
            if fixed:
                live = torch.zeros(cache.max_batch, dtype=torch.bool)
                live[:n] = True
                tokens = torch.zeros(cache.max_batch, dtype=torch.long)
                tokens[:n] = torch.tensor(toks)
                logits = model.decode_step(tokens, cache, cache.begin_step(cache.max_batch, live), parallel)[:n]
            else:
                logits = model.decode_step(torch.tensor(toks), cache, cache.begin_step(n), parallel)
            for i, (seq, p) in enumerate(zip(seqs, prefill)):
                if p + k < len(seq):
                    out[i].append(logits[i])
    return [torch.stack(rows) for rows in out]


def full_forward(model, seq, p):
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0, p:]


@pytest.mark.parametrize("loops", [1, 2, 3, 4])
@pytest.mark.parametrize("arch", ["plt", "vanilla", "no-offset"])
def test_decode_step_after_prefill_equals_full_forward(loops, arch):
    model = tiny_model(plt_num_loops=loops, **ARCHS[arch])
    for seq, p, got in zip(SEQS, PREFILL, decode(model, SEQS, PREFILL)):
        torch.testing.assert_close(got, full_forward(model, seq, p), **TOL)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(plt_gate_use_hidden_states=False),
        dict(plt_normalize_per_loop=False),
        dict(plt_window_size=[0, 0]),
        dict(num_key_value_heads=1),
        dict(attention_bias=True, mlp_bias=True),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_decode_step_in_other_settings(overrides):
    model = tiny_model(plt_num_loops=3, **overrides)
    for seq, p, got in zip(SEQS, PREFILL, decode(model, SEQS, PREFILL)):
        torch.testing.assert_close(got, full_forward(model, seq, p), **TOL)


@pytest.mark.parametrize("loops", [2, 3, 4])
def test_parallel_equals_sequential(loops):
    model = tiny_model(plt_num_loops=loops)
    for a, b in zip(decode(model, SEQS, PREFILL), decode(model, SEQS, PREFILL, parallel=False)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("arch", ["plt", "vanilla", "no-offset"])
def test_batch_equals_each_sequence_alone(arch):
    model = tiny_model(plt_num_loops=3, **ARCHS[arch])
    together = decode(model, SEQS, PREFILL)
    for i, (seq, p) in enumerate(zip(SEQS, PREFILL)):
        torch.testing.assert_close(together[i], decode(model, [seq], [p])[0], **TOL)


@pytest.mark.parametrize("arch", ["plt", "vanilla", "no-offset"])
def test_fixed_shapes_with_free_slots_equal_dynamic(arch):
    """The CUDA-graph / compile shapes: every slot (two of five free), the whole store, a live mask."""
    model = tiny_model(plt_num_loops=2, **ARCHS[arch])
    fixed = decode(model, SEQS, PREFILL, fixed=True, max_batch=5)
    for a, b in zip(fixed, decode(model, SEQS, PREFILL)):
        torch.testing.assert_close(a, b, **TOL)


def test_decode_step_advances_the_cache_by_one_position():
    model = tiny_model(plt_num_loops=2)
    cache = SlotCache(model.config, 2, 16, torch.float64, "cpu")
    with torch.no_grad():
        cache.load(0, model(torch.tensor([[1, 2, 3]]), cache=PLTCache(model.config)).cache)
        cache.load(1, model(torch.tensor([[4, 5]]), cache=PLTCache(model.config)).cache)
        step = cache.begin_step(2)
        assert step.positions.tolist() == [3, 2] and step.length == 4
        model.decode_step(torch.tensor([7, 8]), cache, step)
        assert cache.begin_step(2).positions.tolist() == [4, 3]
