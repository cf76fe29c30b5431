"""The parallel-loop decode engine against generate, full recompute, single prompts and sequential mode."""

from __future__ import annotations

import pytest
import torch

from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams, filter_logits
from loopcoder.utils.errors import LoopcoderError
from support.models import ARCHS, full_recompute_greedy, tiny_model

PROMPTS = [[5, 9, 11, 3, 7, 8, 2], [4, 6, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [30]]


class LetterTokenizer:
    """Token i decodes to one letter: enough for the engine's text handling (stops, streaming)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.mark.parametrize("loops", [1, 2, 3, 4])
@pytest.mark.parametrize("arch", ["plt", "vanilla", "no-offset"])
def test_engine_greedy_equals_generate_and_full_recompute(loops, arch):
    model = tiny_model(dtype=torch.float32, plt_num_loops=loops, **ARCHS[arch], eos_token_id=None)
    engine = Engine(model, max_batch=4)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=9))
    for prompt, completion in zip(PROMPTS, out):
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False, pad_token_id=0)
        assert completion.token_ids == hf[0, len(prompt) :].tolist()
        assert completion.token_ids == full_recompute_greedy(model, prompt, 9)
        assert completion.finish_reason == "length"


@pytest.mark.parametrize("loops", [2, 4])
def test_batch_of_different_lengths_equals_each_prompt_alone(loops):
    model = tiny_model(dtype=torch.float32, plt_num_loops=loops, eos_token_id=None)
    batch = Engine(model, max_batch=4).generate(PROMPTS, SamplingParams(max_new_tokens=8))
    for prompt, together in zip(PROMPTS, batch):
        alone = Engine(model, max_batch=1).generate([prompt], SamplingParams(max_new_tokens=8))[0]
        assert together.token_ids == alone.token_ids


def test_slots_are_freed_and_reused():
    """More requests than slots, with different lengths: finished sequences leave, queued ones join."""
    model = tiny_model(dtype=torch.float32, plt_num_loops=3, eos_token_id=None)
    params = [SamplingParams(max_new_tokens=n) for n in (3, 11, 5, 7)]
    engine = Engine(model, max_batch=2)
    out = engine.generate(PROMPTS, params)
    for prompt, p, got in zip(PROMPTS, params, out):
        assert got.token_ids == full_recompute_greedy(model, prompt, p.max_new_tokens)
    assert engine.num_running == 0 and engine.num_waiting == 0


@pytest.mark.parametrize("loops", [2, 3, 4])
def test_single_pass_and_sequential_modes_give_identical_logits(loops):
    model = tiny_model(dtype=torch.float32, plt_num_loops=loops)
    engines = [Engine(model, max_batch=4, mode=m) for m in ("parallel", "sequential")]
    for e in engines:
        for p in PROMPTS:
            e.add_request(p, SamplingParams(max_new_tokens=8))
        e.step()  # prefill, and one step with the engine's own tokens
    tokens = torch.tensor([5, 7, 9, 11])
    for _ in range(6):  # feed both the same tokens, compare every step's logits
        a, b = (e.decode_step(tokens, 4) for e in engines)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)  # fp32: same math, different row batching
        tokens = a.argmax(-1)


def test_static_shapes_mode_matches_dynamic():
    model = tiny_model(dtype=torch.float32, plt_num_loops=3, eos_token_id=None)
    params = [SamplingParams(max_new_tokens=n) for n in (4, 9, 6, 2)]
    dyn = Engine(model, max_batch=3, max_seq_len=40).generate(PROMPTS, params)
    static = Engine(model, max_batch=3, max_seq_len=40, static_shapes=True).generate(PROMPTS, params)
    assert [c.token_ids for c in dyn] == [c.token_ids for c in static]


def test_unfused_projections_give_the_same_tokens():
    model = tiny_model(dtype=torch.float32, plt_num_loops=2, eos_token_id=None)
    unfused = Engine(tiny_model(dtype=torch.float32, plt_num_loops=2, eos_token_id=None), fuse=False)
    fused = Engine(model, fuse=True)
    sp = SamplingParams(max_new_tokens=8)
    assert [c.token_ids for c in fused.generate(PROMPTS, sp)] == [c.token_ids for c in unfused.generate(PROMPTS, sp)]


def test_fused_projection_outputs_start_on_aligned_offsets():
    """G-SWA's gate rows ride in the q/k/v matmul; the fused output is padded so that every split view (v is
    used uncopied) starts a multiple of 16 elements in: CUDA's attention kernels fault on unaligned rows."""
    model = tiny_model(dtype=torch.float32, plt_num_loops=2)  # 4 heads: 32 + 16 + 16 + 4 gate rows
    model.model.prepare_for_inference(pack=False)
    attn, norm = model.model.layers[0].self_attn, model.model.layers[0].input_layernorm
    x = torch.randn(3, 2, 32)
    with torch.no_grad():
        xn = norm(x)  # the fused matmul reads the layer's normalised input
        q, k, v, gate = attn.fast_qkv.split(xn)
        full = attn.fast_qkv(xn)
        want_gate = attn.plt_gate.gate_norm(x) @ attn.plt_gate.weight.T
        want_q, want_v = attn.q_proj(xn), attn.v_proj(xn)
    assert full.shape[-1] % 16 == 0 and full.shape[-1] >= 68
    assert all(p.storage_offset() % 8 == 0 for p in (q, k, v))
    assert attn.q_proj.weight.data_ptr() == attn.fast_qkv.weight.data_ptr()  # parameters stay views of it
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(v, want_v)
    torch.testing.assert_close(gate, want_gate, rtol=1e-4, atol=1e-5)


def test_kv_bytes_follow_the_formula():
    for arch, per_slot_entries in (("plt", 50 + 3 * 4), ("vanilla", 4 * 50)):
        model = tiny_model(dtype=torch.float32, plt_num_loops=4, loop_architecture=arch)
        engine = Engine(model, max_batch=2, max_seq_len=50, paged=False)
        c = model.config
        assert (
            engine.kv_bytes() == 2 * 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * per_slot_entries
        )


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    model = tiny_model(dtype=torch.float32, plt_num_loops=2, eos_token_id=None)
    sp = SamplingParams(max_new_tokens=10, temperature=1.2, top_p=0.9, top_k=20, seed=123)
    alone = Engine(model).generate([PROMPTS[0]], sp)[0].token_ids
    mixed = Engine(model, max_batch=4).generate(
        PROMPTS, [sp, SamplingParams(max_new_tokens=5, temperature=0.7, seed=1), SamplingParams(), sp]
    )
    assert mixed[0].token_ids == alone
    other_seed = Engine(model).generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=1.2, top_p=0.9, top_k=20, seed=124)
    )[0]
    assert other_seed.token_ids != alone


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)[2:]).all()
    assert torch.isfinite(filter_logits(logits, 1.0, 2, 1.0)[:2]).all()
    probs = logits.softmax(-1)  # 0.644, 0.237, 0.087, 0.032
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.85))
    assert kept.tolist() == [True, True, False, False] and probs[:2].sum() >= 0.85
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.5)).tolist() == [True, False, False, False]


def test_eos_stop_strings_and_streaming():
    model = tiny_model(dtype=torch.float32, plt_num_loops=2, eos_token_id=None)
    engine = Engine(model, LetterTokenizer())
    free = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12))[0]
    assert len(free.text) == 12
    # a stop string taken from the middle of the free-running text: output ends right before it
    stop = free.text[5:7]
    cut = free.text.index(stop)
    stopped = Engine(model, LetterTokenizer()).generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, stop=[stop]))[0]
    assert stopped.text == free.text[:cut] and stopped.finish_reason == "stop"
    # streaming yields exactly the final text
    pieces = list(Engine(model, LetterTokenizer()).stream(PROMPTS[0], SamplingParams(max_new_tokens=12, stop=[stop])))
    assert "".join(pieces) == stopped.text
    # an eos id: generation ends before it, the eos token is not part of the output
    eos_tok = free.token_ids[4]
    first = free.token_ids.index(eos_tok)
    ended = Engine(model).generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, stop_token_ids=[eos_tok]))[0]
    assert ended.token_ids == free.token_ids[:first] and ended.finish_reason == "stop"


def test_abort_frees_the_slot():
    model = tiny_model(dtype=torch.float32, plt_num_loops=2, eos_token_id=None)
    engine = Engine(model, max_batch=1)
    a = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=50))
    b = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=3))
    engine.step()
    assert a.slot == 0 and b.slot is None
    engine.abort(a.id)
    assert a.finish_reason == "abort" and engine.num_running == 0
    while engine.has_work():
        engine.step()
    assert b.output_ids == full_recompute_greedy(model, PROMPTS[1], 3)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=0),
        SamplingParams(temperature=-1),
        SamplingParams(top_p=0),
        SamplingParams(top_p=1.5),
        SamplingParams(top_k=-2),
        SamplingParams(seed=-1),
    ],
)
def test_invalid_sampling_values_are_clear_errors(params):
    engine = Engine(tiny_model(dtype=torch.float32))
    with pytest.raises(LoopcoderError):
        engine.add_request([1, 2], params)


def test_prompt_longer_than_the_model_is_an_error():
    engine = Engine(tiny_model(dtype=torch.float32), max_seq_len=16)
    with pytest.raises(LoopcoderError, match="maximum is 16"):
        engine.add_request(list(range(1, 20)), SamplingParams())


def test_generation_stops_at_the_cache_length():
    model = tiny_model(dtype=torch.float32, plt_num_loops=2, eos_token_id=None)
    out = Engine(model, max_seq_len=10).generate([[1, 2, 3, 4, 5, 6]], SamplingParams(max_new_tokens=50))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """`compile=True` traces the fixed-shape step with torch.compile (inductor on CPU here)."""
    model = tiny_model(dtype=torch.float32, plt_num_loops=2, eos_token_id=None)
    sp = SamplingParams(max_new_tokens=6)
    eager = Engine(model, max_batch=2, max_seq_len=32).generate(PROMPTS[:2], sp)
    compiled = Engine(model, max_batch=2, max_seq_len=32, compile=True).generate(PROMPTS[:2], sp)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
