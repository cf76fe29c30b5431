"""The PLT model against the spec: a slow reference, Llama, cached decoding, generate, gradients."""

from __future__ import annotations

import pytest
import torch

from loopcoder.model.cache import PLTCache
from loopcoder.model.modeling import PLTForCausalLM
from support.models import ARCHS, tiny_config, tiny_model
from support.reference import reference_logits


@pytest.mark.parametrize(
    "overrides",
    [
        dict(plt_num_loops=1),
        dict(plt_num_loops=2),
        dict(plt_num_loops=3),
        dict(plt_num_loops=4),
        dict(plt_num_loops=3, plt_gate_use_hidden_states=False),
        dict(plt_num_loops=3, plt_normalize_per_loop=False),
        dict(plt_num_loops=2, plt_gate_use_hidden_states=False, plt_normalize_per_loop=False),
        dict(plt_num_loops=2, plt_window_size=[0, 0]),
        dict(plt_num_loops=2, plt_hidden_scale=None, plt_emb_scale=None),
        dict(plt_num_loops=2, attention_bias=True, mlp_bias=True),
        dict(plt_num_loops=2, tie_word_embeddings=True),
        dict(plt_num_loops=3, loop_architecture="vanilla"),
        dict(plt_num_loops=2, plt_loop_offset=False),
        dict(plt_num_loops=3, plt_loop_offset=False, plt_window_size=[2, 0]),
        dict(plt_num_loops=2, num_key_value_heads=1),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_fast_forward_matches_reference(overrides):
    model = tiny_model(**overrides)
    ids = torch.randint(1, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = model(ids).logits
    state = model.state_dict()
    for b in range(ids.shape[0]):
        ref = reference_logits(model.config, state, ids[b].tolist())
        torch.testing.assert_close(fast[b], ref, rtol=1e-9, atol=1e-9)


def test_window_shorter_than_sequence_changes_the_result():
    """Guard against a window that is silently ignored: w=1 and w=8 must differ on 9 tokens."""
    ids = torch.arange(1, 10)[None]
    a = tiny_model(plt_num_loops=2, plt_window_size=[1, 0])
    b = tiny_model(plt_num_loops=2, plt_window_size=[8, 0])
    with torch.no_grad():
        assert not torch.allclose(a(ids).logits, b(ids).logits)
        # ... but the first two positions see the same keys under both windows
        torch.testing.assert_close(a(ids).logits[:, :2], b(ids).logits[:, :2])


def test_r1_equals_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_model(dtype=torch.float32, plt_num_loops=1)
    c = model.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            rms_norm_eps=c.rms_norm_eps,
            max_position_embeddings=c.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
            tie_word_embeddings=False,
        )
    ).eval()
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected
    ids = torch.randint(0, c.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loops", [1, 2, 3, 4])
@pytest.mark.parametrize("arch", ["plt", "vanilla", "no-offset"])
def test_full_sequence_equals_token_by_token_decoding(loops, arch):
    model = tiny_model(dtype=torch.float32, plt_num_loops=loops, **ARCHS[arch])
    ids = torch.randint(1, model.config.vocab_size, (3, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = PLTCache(model.config)
        steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])]
        # a prefill chunk then single tokens: the same cache, mixed chunk sizes
        cache2 = PLTCache(model.config)
        mixed = [model(ids[:, :6], cache=cache2).logits] + [
            model(ids[:, t : t + 1], cache=cache2).logits for t in range(6, ids.shape[1])
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(torch.cat(mixed, 1), full, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("arch", ["plt", "vanilla"])
def test_cache_holds_what_the_spec_says(arch):
    cfg = tiny_config(plt_num_loops=3, plt_window_size=[3, 0], loop_architecture=arch)
    model = PLTForCausalLM(cfg).eval()
    T = 11
    with torch.no_grad():
        out = model(torch.randint(0, cfg.vocab_size, (2, T)), use_cache=True)
    cache = out.cache
    layer = cache.layers[0]
    assert layer.loops[0].k.shape[2] == T  # loop 1: every position
    for r in (1, 2):
        assert layer.loops[r].k.shape[2] == (T if arch == "vanilla" else 3 + 1)
    if arch == "plt":
        assert len(cache.states) == 2 and cache.states[0].shape == (2, cfg.hidden_size)
    # bytes follow the spec's formula: 2 * L * kv_heads * head_dim * (T + (R-1)(w+1)) * dtype_bytes
    assert cache.nbytes() == cfg.kv_cache_bytes(T, batch_size=2, dtype_bytes=4)
    expected_entries = T + 2 * 4 if arch == "plt" else 3 * T
    assert (
        cache.nbytes() == 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * expected_entries * 4
    )


def test_released_shape_kv_overhead_matches_spec():
    from loopcoder.model.config import PLTConfig

    base = PLTConfig(plt_num_loops=1).kv_cache_bytes(4096)
    plt2 = PLTConfig(plt_num_loops=2).kv_cache_bytes(4096)
    assert plt2 / base == pytest.approx(1 + 65 / 4096)  # +1.6 % at T=4096, w=64 (spec 1.2)
    assert PLTConfig(plt_num_loops=2, loop_architecture="vanilla").kv_cache_bytes(4096) == 2 * base


@pytest.mark.parametrize("loops", [1, 2, 3, 4])
def test_generate_greedy_equals_argmax_of_full_recompute(loops):
    model = tiny_model(dtype=torch.float32, plt_num_loops=loops)
    prompt = torch.randint(1, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(12):  # no cache at all: recompute the whole sequence for every token
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            if nxt.item() == model.config.eos_token_id:
                break
    assert torch.equal(out, seq)


def test_generate_batch_with_left_padding_equals_each_prompt_alone():
    model = tiny_model(dtype=torch.float32, plt_num_loops=3)
    prompts = [[5, 9, 11, 3, 7, 8, 2], [4, 6, 10]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        for i, p in enumerate(prompts):
            alone = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0)
            assert batch[i, width:].tolist() == alone[0, len(p) :].tolist()


def test_generate_sampling_is_seeded():
    model = tiny_model(dtype=torch.float32, plt_num_loops=2)
    prompt = torch.tensor([[3, 4, 5]])
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(
                model.generate(prompt, max_new_tokens=8, do_sample=True, top_p=0.9, temperature=1.3, pad_token_id=0)
            )
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "overrides",
    [
        dict(plt_num_loops=2),
        dict(plt_num_loops=3, plt_gate_use_hidden_states=False),
        dict(plt_num_loops=2, tie_word_embeddings=True),
        dict(plt_num_loops=3, loop_architecture="vanilla"),
    ],
)
def test_gradients_reach_every_parameter(overrides):
    model = tiny_model(dtype=torch.float32, **overrides).train()
    ids = torch.randint(1, model.config.vocab_size, (2, 10))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if model.config.loop_architecture == "plt":
        assert any("plt_gate" in n for n, _ in model.named_parameters())


def test_r1_and_vanilla_have_no_gate_parameters():
    assert not any("plt_gate" in n for n, _ in tiny_model(plt_num_loops=1).named_parameters())
    assert not any("plt_gate" in n for n, _ in tiny_model(loop_architecture="vanilla").named_parameters())


def test_gate_is_zero_initialised():
    model = PLTForCausalLM(tiny_config(plt_num_loops=2))
    gate = model.model.layers[0].self_attn.plt_gate
    assert torch.count_nonzero(gate.weight) == 0 and torch.count_nonzero(gate.bias) == 0
    x = torch.randn(1, 3, model.config.hidden_size)
    assert torch.allclose(gate(x, None), torch.full((1, 4, 3, 1), 0.5))


def test_loss_is_on_the_last_loop_only():
    model = tiny_model(dtype=torch.float32, plt_num_loops=3)
    ids = torch.randint(1, model.config.vocab_size, (2, 8))
    out = model(ids, labels=ids, output_loop_states=True)
    h_last = out.loop_hidden_states[-1]
    logits = model.lm_head(model.model.norm(h_last))
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert len(out.loop_hidden_states) == 3


@pytest.mark.parametrize("impl", ["eager", "flex_attention"])
def test_attention_implementations_agree_with_sdpa(impl):
    model = tiny_model(dtype=torch.float32, plt_num_loops=3)
    ids = torch.randint(1, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        model.config._attn_implementation = impl
        other = model(ids).logits
    torch.testing.assert_close(other, ref, rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(1, 61, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = tiny_model(dtype=torch.float32, plt_num_loops=3).train()
        if ckpt:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_forward_and_backward_run():
    model = tiny_model(dtype=torch.float32, plt_num_loops=2).train()
    ids = torch.randint(1, 61, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
