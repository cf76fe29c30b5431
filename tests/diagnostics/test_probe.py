"""The probe on real (tiny) models: it changes nothing, reads each loop where the docs say, and
identical loops give zero steps and zero KL."""

import math

import numpy as np
import pytest
import torch

from loopcoder.diagnostics import MEASURES, LoopProbe, diagnose, extra_loop
from loopcoder.diagnostics import measures as M
from loopcoder.model.config import PLTConfig
from loopcoder.model.modeling import PLTForCausalLM

VOCAB = 96


def tiny(R, arch="plt", seed=0, **kw):
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        plt_num_loops=R,
        plt_window_size=[3, 0],
        max_position_embeddings=256,
        loop_architecture=arch,
        initializer_range=0.2,
    )
    fields.update(kw)
    torch.manual_seed(seed)
    model = PLTForCausalLM(PLTConfig(**fields)).eval()
    with torch.no_grad():  # trained gates are not 0.5: give them weights so the gate path is exercised
        for layer in model.model.layers:
            if layer.self_attn.plt_gate is not None:
                layer.self_attn.plt_gate.weight.normal_(0, 0.5)
                layer.self_attn.plt_gate.bias.normal_(0, 0.5)
    return model


def samples(n=3, length=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g) for _ in range(n)]


@pytest.mark.parametrize("arch,R", [("plt", 1), ("plt", 2), ("plt", 3), ("plt", 4), ("vanilla", 3)])
def test_probe_and_extra_loop_leave_the_logits_bit_exact(arch, R):
    model = tiny(R, arch)
    ids = samples(1)[0][None]
    with torch.no_grad():
        plain = model(ids).logits
        probe = LoopProbe(model)
        probe.begin(ids)
        with model.model.probed(probe):
            probed = model(ids).logits
        probe.end()
        assert torch.equal(plain, probed)
        # the diagnostics' own forward (R + 1 loops) reproduces the model's logits from h(R) exactly
        probe.begin(ids)
        with extra_loop(model), model.model.probed(probe):
            model.model(input_ids=ids)
        probe.end()
    assert torch.equal(probe.final_logits, plain[0].float())
    assert model.config.plt_num_loops == R
    assert model.model.loop_probe is None
    assert all(layer.self_attn.probe is None for layer in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)


def test_extra_loop_restores_the_config_on_error():
    model = tiny(2)
    with pytest.raises(RuntimeError), extra_loop(model):
        assert model.config.plt_num_loops == 3
        raise RuntimeError("boom")
    assert model.config.plt_num_loops == 2


def test_probe_reads_each_loop_where_documented():
    """Feed the probe hand-made states and attention, as the model would for R = 2."""
    model = tiny(2)
    ids = torch.arange(6)[None]
    g = torch.Generator().manual_seed(3)
    h1, h2, h3 = (torch.randn(1, 6, 32, generator=g) for _ in range(3))
    probe = LoopProbe(model)
    probe.begin(ids)
    causal = torch.tril(torch.ones(6, 6)) / torch.arange(1, 7)[:, None]
    a1 = causal.expand(1, 4, 6, 6)
    a2 = torch.softmax(torch.randn(1, 4, 6, 6, generator=g).masked_fill(causal == 0, -torch.inf), -1)
    gate = torch.full((1, 4, 6, 1), 0.8)
    for layer in range(2):
        probe.attention(layer, 0, "causal", a1, None)
    probe.loop_output(0, h1)
    for layer in range(2):
        probe.attention(layer, 1, "global", a2, None)
        probe.attention(layer, 1, "local", a1, gate)
    probe.loop_output(1, h2)
    for layer in range(2):  # the extra loop's attention is ignored
        probe.attention(layer, 2, "global", a1, None)
    probe.loop_output(2, h3)
    s = probe.end()
    emb = model.model.embed_tokens(ids)[0].detach()
    assert math.isnan(s["step_size"][0])
    assert s["step_size"][1] == pytest.approx(M.step_size(h2[0], h1[0]))
    assert s["update_cosine"][1] == pytest.approx(M.update_cosine(h2[0], h1[0], emb))  # h(0) = E
    assert s["offset_cost"][1] == pytest.approx(M.offset_cost(h1[0]))  # Omega(2) uses h(1)
    gaps = [M.step_size(h2[0], h1[0]), M.step_size(h3[0], h2[0])]  # f(h(1)) = h(2); f(h(2)) = extra loop
    assert s["fixed_point_gap"].tolist() == pytest.approx(gaps)
    assert s["effective_rank"][0] == pytest.approx(M.hidden_effective_rank(h1[0], model.config.rms_norm_eps))
    assert s["attention_kl"][:, 1] == pytest.approx([M.attention_kl(a2[0], a1[0])] * 2)
    assert np.isnan(s["attention_kl"][:, 0]).all()
    assert s["attention_entropy"][0, :, 0] == pytest.approx(M.attention_entropy(a1[0]).numpy())
    assert s["gate"][:, :, 1] == pytest.approx(np.full((2, 4), 0.8))
    assert np.isnan(s["gate"][:, :, 0]).all()
    with torch.no_grad():
        lp = [torch.log_softmax(model.lm_head(model.model.norm(h))[0], -1) for h in (h1, h2)]
    assert s["delta_p"][1] == pytest.approx(M.output_kl(lp[1], lp[0]).mean().item(), rel=1e-5)
    assert s["gold_nll"][0] == pytest.approx(-lp[0][:-1].gather(-1, ids[0, 1:, None]).mean().item(), rel=1e-5)
    for key in ("delta_p_share", "peak_loop_fraction", "attention_kl_share"):
        assert s[key][1] == 1.0 and math.isnan(s[key][0])
    assert probe.gate_hist[:, 1].sum() == 2 * 4 * 6  # layers x heads x tokens


def test_identical_loops_give_zero_step_and_zero_kl():
    """a = 1, b = 0 and a window covering the sequence: every loop reads E and its local branch equals
    its global one, so all loops compute the same states and the same attention."""
    model = tiny(3, plt_emb_scale=1.0, plt_hidden_scale=0.0, plt_window_size=[64, 0])
    res = diagnose(model, samples(2), progress=False)
    for key in ("step_size", "attention_kl", "delta_p", "fixed_point_gap"):
        means = [s.mean for s in res.stats(key)]
        assert np.nanmax(np.abs(means)) < 1e-5, (key, means)
    # layer 0 reads E in every loop: its global branch is loop 1's causal attention, bit for bit
    assert (res.per_sample["attention_kl"][:, 0, 1:] == 0.0).all()
    e = [s.mean for s in res.stats("effective_rank")]
    assert e == pytest.approx([e[0]] * 3, rel=1e-4)
    # vanilla with identity layers (no attention / MLP output): h(r) = E for every loop, exactly
    van = tiny(3, "vanilla")
    with torch.no_grad():
        for layer in van.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    res = diagnose(van, samples(2), progress=False)
    for key in ("step_size", "attention_kl", "delta_p", "fixed_point_gap", "update_cosine"):
        assert all(s.mean == 0.0 for s in res.stats(key)[1:]), key


@pytest.mark.parametrize("arch,R", [("plt", 1), ("plt", 2), ("plt", 4), ("vanilla", 2)])
def test_diagnose_fills_every_applicable_measure(arch, R):
    res = diagnose(tiny(R, arch), samples(4), 3, name="m", progress=False)
    assert res.num_samples == 3 and res.num_tokens == 60 and res.num_loops == R
    for key in MEASURES:
        for r, s in enumerate(res.stats(key), 1):
            expect_na = res.not_applicable(key, r) is not None
            assert (s.na is not None) == expect_na, (key, r, s)
            if not expect_na:
                assert s.n == 3 and math.isfinite(s.mean) and s.low <= s.mean <= s.high, (key, r, s)
    if R > 1:
        assert sum(s.mean for s in res.stats("delta_p_share")[1:]) == pytest.approx(1.0)
        assert sum(s.mean for s in res.stats("peak_loop_fraction")[1:]) == pytest.approx(1.0)
    if arch == "plt" and R > 1:
        gates = [s.mean for s in res.stats("gate")[1:]]
        assert all(0.0 < g < 1.0 and g != 0.5 for g in gates)
    assert res.stats("effective_rank")[0].mean > 1.0
    assert all(1 <= s.mean <= VOCAB for s in res.stats("gold_rank"))


def test_probe_memory_does_not_grow_with_samples():
    model = tiny(2)
    probe = LoopProbe(model)
    ids = samples(1)[0][None]
    with torch.no_grad():
        probe.begin(ids)
        with extra_loop(model), model.model.probed(probe):
            model.model(input_ids=ids)
        probe.end()
    assert probe._prev_attn == {} and probe._hidden == {} and probe._prev_logprobs is None


def test_bfloat16_model_gives_the_fp32_figures_approximately():
    model = tiny(2)
    seqs = samples(2)
    r32 = diagnose(model, seqs, progress=False)
    r16 = diagnose(model.to(torch.bfloat16), seqs, progress=False)
    for key in ("effective_rank", "step_size", "attention_entropy", "gold_nll"):
        a, b = r32.stats(key)[-1].mean, r16.stats(key)[-1].mean
        assert b == pytest.approx(a, rel=0.1), key


def test_flex_attention_models_are_diagnosed_through_sdpa():
    """flex block masks cannot be turned into probabilities: the diagnostics forward uses SDPA instead."""
    model = tiny(3)
    seqs = samples(2)
    ref = diagnose(model, seqs, progress=False)
    model.config._attn_implementation = "flex_attention"
    res = diagnose(model, seqs, progress=False)
    assert model.config._attn_implementation == "flex_attention"
    for key in ("local_attention_entropy", "attention_kl", "step_size"):
        np.testing.assert_allclose(res.values(key), ref.values(key), rtol=1e-5, equal_nan=True)
