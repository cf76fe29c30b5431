"""The diagnostics of spec section 3 as pure functions on tensors (one sample, one loop at a time).

Every function here is the exact formula written down in `docs/diagnostics.md`; the probe
(`probe.py`) only decides which tensors to feed them. Inputs are cast to fp32 (fp64 where a
decomposition needs it) so that bf16 models give the same figures as fp32 ones.

Conventions: hidden states are (S, d) for one sample (position-major), attention probabilities are
(H, S, T) for one layer and one branch, logits / log-probabilities are (S, V).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# Probabilities below this are treated as this when a logarithm of a *reference* distribution is
# taken (KL's q): fp32 softmax underflows to exactly 0 for very unlikely keys / tokens, which would
# make the KL infinite although the model assigns a finite score.
PROB_FLOOR = 1e-30


# ----------------------------------------------------------------------------- hidden states
def rms_normalize(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """h / sqrt(mean(h^2) + eps) per row: RMSNorm without the learned gain."""
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def step_size(h: torch.Tensor, h_prev: torch.Tensor) -> float:
    """delta = (1/S) sum_t ||h_t - h_prev_t||_2: the mean per-token L2 length of a loop's update."""
    return (h.float() - h_prev.float()).norm(dim=-1).mean().item()


def update_cosine(h: torch.Tensor, h_prev: torch.Tensor, h_prev2: torch.Tensor) -> float:
    """cos theta = (1/S) sum_t cos(h_t - h_prev_t, h_prev_t - h_prev2_t); a zero update counts as cos 0."""
    u = h.float() - h_prev.float()
    v = h_prev.float() - h_prev2.float()
    denom = u.norm(dim=-1) * v.norm(dim=-1)
    cos = (u * v).sum(-1) / denom.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(denom > 0, cos, torch.zeros_like(cos)).mean().item()


def fixed_point_gap(h: torch.Tensor, f_h: torch.Tensor) -> float:
    """(1/S) sum_t ||h_t - f(h)_t||_2, where f(h) is one more application of the loop block."""
    return step_size(f_h, h)


def offset_cost(h_prev: torch.Tensor) -> float:
    """Omega = mean over the S-1 adjacent pairs of ||h_prev_i - h_prev_{i-1}||_2 (NaN if S < 2): how far
    the state a token receives (its left neighbour's) is from its own."""
    if h_prev.shape[0] < 2:
        return math.nan
    h_prev = h_prev.float()
    return (h_prev[1:] - h_prev[:-1]).norm(dim=-1).mean().item()


def singular_value_entropy_rank(singular_values: torch.Tensor) -> float:
    """erank = exp(-sum_i s_i log s_i), s = singular values / their sum (Roy & Vetterli 2007).
    Between 1 (one direction) and the number of non-zero singular values (all equal)."""
    sv = singular_values.double().clamp_min(0)
    total = sv.sum()
    if total <= 0:
        return 0.0
    s = sv / total
    return math.exp(-torch.special.xlogy(s, s).sum().item())


def effective_rank(x: torch.Tensor) -> float:
    """Effective rank of a matrix (rows = observations): `singular_value_entropy_rank` of its SVD."""
    return singular_value_entropy_rank(torch.linalg.svdvals(x.float()))


def hidden_effective_rank(h: torch.Tensor, eps: float = 1e-6) -> float:
    """erank of the S x d matrix of RMS-normalised states of one loop."""
    return effective_rank(rms_normalize(h, eps))


# ----------------------------------------------------------------------------- attention
def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-head entropy (nats) of attention rows, averaged over query positions: (H, S, T) -> (H,)."""
    p = probs.float()
    return -torch.special.xlogy(p, p).sum(-1).mean(-1)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) (nats) along the last axis; p = 0 terms are 0, q is floored at PROB_FLOOR."""
    p, q = p.float(), q.float()
    log_ratio = p.clamp_min(PROB_FLOOR).log() - q.clamp_min(PROB_FLOOR).log()  # exactly 0 where p == q
    return torch.where(p > 0, p * log_ratio, torch.zeros_like(p)).sum(-1)


def attention_kl(probs: torch.Tensor, probs_prev: torch.Tensor) -> float:
    """Inter-loop attention KL of one layer: (1/(H S)) sum_{h,t} KL(A(r)_{h,t} || A(r-1)_{h,t})."""
    if probs.shape != probs_prev.shape:
        raise ValueError(f"attention KL needs the same keys: {tuple(probs.shape)} vs {tuple(probs_prev.shape)}")
    return kl_rows(probs, probs_prev).mean().item()


def head_gram(probs: torch.Tensor) -> torch.Tensor:
    """Gram matrix G_ij = <A_i, A_j> of the heads' flattened attention maps (H, S*T), in fp64 (H, H)."""
    a = probs.double().flatten(1)  # fp64: the singular values are square roots of G's eigenvalues,
    return a @ a.T  # which would amplify fp32 rounding of near-zero ones


def head_similarity(probs: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Head diversity of one layer from the heads' attention vectors (each head's whole S x T map
    flattened): returns (H x H cosine matrix, mean pairwise cosine over i < j, effective rank of the
    H x (S T) matrix). One head: cosine NaN, erank 1."""
    g = head_gram(probs)
    norms = g.diagonal().clamp_min(0).sqrt()
    cos = g / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    n = g.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    mean_cos = cos[iu[0], iu[1]].mean().item() if n > 1 else math.nan
    sv = torch.linalg.eigvalsh(g).clamp_min(0).sqrt()  # singular values of the H x (S T) matrix
    return cos.float(), mean_cos, singular_value_entropy_rank(sv)


# ----------------------------------------------------------------------------- output (logit lens)
def output_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each position's next-token distribution: (S, V) log-probs -> (S,)."""
    p = logprobs.float().exp()
    return -torch.where(p > 0, p * logprobs.float(), torch.zeros_like(p)).sum(-1)


def output_kl(logprobs: torch.Tensor, logprobs_prev: torch.Tensor) -> torch.Tensor:
    """Delta p per position: KL(p(r) || p(r-1)) in nats, (S, V) log-probs each -> (S,)."""
    logprobs, logprobs_prev = logprobs.float(), logprobs_prev.float()
    p = logprobs.exp()
    return torch.where(p > 0, p * (logprobs - logprobs_prev), torch.zeros_like(p)).sum(-1)


def gold_rank(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """1-based rank of the gold token in each row: 1 + number of tokens with a strictly higher score.
    logits (N, V), gold (N,) -> (N,) long."""
    gold_score = logits.gather(-1, gold[:, None])
    return (logits > gold_score).sum(-1) + 1


def peak_loop(delta_p: torch.Tensor, first_loop: int = 2) -> torch.Tensor:
    """r* per token: the loop whose Delta p is largest. delta_p is (loops, S) with row 0 = loop
    `first_loop`; ties go to the earliest loop. Returns loop numbers (S,)."""
    return delta_p.argmax(0) + first_loop


def shares(values: Sequence[float]) -> list[float]:
    """Each entry's share of the total (NaN everywhere if the total is not positive)."""
    total = float(np.nansum(values))
    if not total > 0:
        return [math.nan] * len(values)
    return [float(v) / total for v in values]
