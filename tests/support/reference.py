"""A slow, obviously-correct PLT written straight from the spec (section 1), for the tests.

Explicit loops over loops, positions, layers and heads, in float64, on plain tensors taken from a
model's state dict. Nothing is shared with `loopcoder.model.modeling`: if both agree, the fast model computes
what the spec says.
"""

from __future__ import annotations

import math

import torch


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / math.sqrt(float((x * x).mean()) + eps))


def _rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of one head vector at position `pos`: pair (i, i + d/2) turns by pos * theta^(-2i/d)."""
    d = x.shape[0]
    out = x.clone()
    for i in range(d // 2):
        angle = pos * theta ** (-2.0 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + d // 2] * s
        out[i + d // 2] = x[i + d // 2] * c + x[i] * s
    return out


def _attend(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    scores = torch.stack([q @ k for k in keys]) / math.sqrt(q.shape[0])
    p = torch.softmax(scores, 0)
    return sum(p[j] * values[j] for j in range(len(values)))


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def reference_logits(cfg, state: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Logits (S, vocab) of one sequence for a PLT or vanilla looped model with these weights."""
    W = {k: v.detach().double() for k, v in state.items()}
    L, R, H, Hkv, hd = (
        cfg.num_hidden_layers,
        cfg.plt_num_loops,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    group = H // Hkv
    eps, theta, w = cfg.rms_norm_eps, cfg.rope_theta, cfg.plt_window_size[0]
    a = 1.0 if cfg.plt_emb_scale is None else cfg.plt_emb_scale
    b = 1.0 if cfg.plt_hidden_scale is None else cfg.plt_hidden_scale
    vanilla = cfg.loop_architecture == "vanilla"
    S = len(ids)

    def lin(name: str, x: torch.Tensor) -> torch.Tensor:
        y = W[name + ".weight"] @ x
        return y + W[name + ".bias"] if name + ".bias" in W else y

    E = [W["model.embed_tokens.weight"][i] for i in ids]
    K = [[[None] * S for _ in range(L)] for _ in range(R)]  # K[r][layer][t], after RoPE
    V = [[[None] * S for _ in range(L)] for _ in range(R)]
    h = [[None] * S for _ in range(R)]  # h[r][t]: output of loop r at position t

    def P(r: int, t: int) -> torch.Tensor:
        x = h[r][t]
        return _rms(x, W["model.norm.weight"], eps) if cfg.plt_normalize_per_loop else x

    for r in range(R):
        for t in range(S):
            if r == 0:
                x = E[t].clone()
            elif vanilla:
                x = h[r - 1][t].clone()
            elif not cfg.plt_loop_offset:  # the ablation: a * E_t + b * P(r-1)_t, same position
                x = a * E[t] + b * P(r - 1, t)
            else:  # CLP: a * E_t + b * P(r-1)_{t-1}, zero predecessor at position 0
                x = a * E[t] + (b * P(r - 1, t - 1) if t > 0 else 0.0)
            for layer in range(L):
                p = f"model.layers.{layer}."
                xn = _rms(x, W[p + "input_layernorm.weight"], eps)
                q = lin(p + "self_attn.q_proj", xn).view(H, hd)
                k = lin(p + "self_attn.k_proj", xn).view(Hkv, hd)
                v = lin(p + "self_attn.v_proj", xn).view(Hkv, hd)
                q = torch.stack([_rope(q[i], t, theta) for i in range(H)])
                k = torch.stack([_rope(k[i], t, theta) for i in range(Hkv)])
                K[r][layer][t], V[r][layer][t] = k, v
                heads = []
                for i in range(H):
                    j = i // group
                    if r == 0 or vanilla:  # causal over this loop's own keys 0..t
                        y = _attend(
                            q[i], [K[r][layer][s][j] for s in range(t + 1)], [V[r][layer][s][j] for s in range(t + 1)]
                        )
                    else:
                        y_g = _attend(
                            q[i], [K[0][layer][s][j] for s in range(t + 1)], [V[0][layer][s][j] for s in range(t + 1)]
                        )
                        lo = max(0, t - w)
                        y_l = _attend(
                            q[i],
                            [K[r][layer][s][j] for s in range(lo, t + 1)],
                            [V[r][layer][s][j] for s in range(lo, t + 1)],
                        )
                        gw, gb = W[p + "self_attn.plt_gate.weight"], W[p + "self_attn.plt_gate.bias"]
                        if cfg.plt_gate_use_hidden_states:
                            gx = _rms(x, W[p + "self_attn.plt_gate.gate_norm.weight"], eps)
                            g = torch.sigmoid(gw[i] @ gx + gb[i])
                        else:
                            g = torch.sigmoid(q[i] @ gw[i] + gb[i])
                        y = g * y_g + (1 - g) * y_l
                    heads.append(y)
                x = x + lin(p + "self_attn.o_proj", torch.cat(heads))
                xn = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
                m = _silu(lin(p + "mlp.gate_proj", xn)) * lin(p + "mlp.up_proj", xn)
                x = x + lin(p + "mlp.down_proj", m)
            h[r][t] = x
    head = W["lm_head.weight"] if "lm_head.weight" in W else W["model.embed_tokens.weight"]
    return torch.stack([head @ _rms(h[R - 1][t], W["model.norm.weight"], eps) for t in range(S)])
