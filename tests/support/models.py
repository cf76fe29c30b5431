"""Tiny random models for the tests: small enough for the explicit-loop reference."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from loopcoder.model.config import PLTConfig
from loopcoder.model.modeling import PLTForCausalLM

# the loop architectures by name: PLT, the vanilla looped transformer, and PLT without CLP's offset
ARCHS = {"plt": {}, "vanilla": {"loop_architecture": "vanilla"}, "no-offset": {"plt_loop_offset": False}}


def tiny_config(**overrides) -> PLTConfig:
    """A model small enough for explicit-loop references: GQA (4 heads over 2), window 3."""
    fields = dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        plt_num_loops=2,
        plt_window_size=[3, 0],
        rope_theta=10000.0,
        pad_token_id=0,
    )
    fields.update(overrides)
    return PLTConfig(**fields)


def randomized(model: PLTForCausalLM, seed: int = 0) -> PLTForCausalLM:
    """Every parameter random, gates and norms included, so that no term can hide behind an init value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif "plt_gate" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.3 * noise)
    return model


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> PLTForCausalLM:
    torch.manual_seed(seed)
    return randomized(PLTForCausalLM(tiny_config(**overrides)), seed).to(dtype).eval()


def released_style_dir(tmp_path, **overrides):
    """A directory laid out like the LoopCoder-V2 release (config.json written by hand, released keys)."""
    model = tiny_model(dtype=torch.float32, **overrides)
    cfg = model.config
    config = {
        "architectures": ["IQuestPLTCoderForCausalLM"],
        "model_type": "iquestpltcoder",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "plt_num_loops": cfg.plt_num_loops,
        "plt_window_size": [3, 0],
        "plt_emb_scale": 0.707,
        "plt_hidden_scale": 0.053,
        "plt_normalize_per_loop": True,
        "plt_gate_use_hidden_states": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    return model


def full_recompute_greedy(model: PLTForCausalLM, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `prompt`, the whole sequence recomputed for each (no cache at all)."""
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(prompt) :].tolist()
