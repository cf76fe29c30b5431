"""Tiny random models for the tests: small enough for the explicit-loop reference."""

from __future__ import annotations

import torch

from loopcoder.config import PLTConfig
from loopcoder.model import PLTForCausalLM

# the loop architectures by name: PLT, the vanilla looped transformer, and PLT without CLP's offset
ARCHS = {"plt": {}, "vanilla": {"loop_architecture": "vanilla"}, "no-offset": {"plt_loop_offset": False}}


def tiny_config(**overrides) -> PLTConfig:
    """A model small enough for explicit-loop references: GQA (4 heads over 2), window 3."""
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128, plt_num_loops=2,
                  plt_window_size=[3, 0], rope_theta=10000.0, pad_token_id=0)
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
