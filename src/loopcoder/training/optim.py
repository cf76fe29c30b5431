"""The published optimiser recipe: AdamW with decoupled weight decay on matrices, and the LR schedule
(linear warm-up, then cosine, linear or constant decay to `min_lr_ratio * lr`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from loopcoder.training.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, embeddings, lm_head, gate weights); none on vectors
    (norm weights, biases), the usual practice: decaying a norm's gain only fights the norm."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    fused = o.fused if o.fused is not None else device.type == "cuda"
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kwargs)


def lr_factor(step: int, total: int, warmup: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak LR for the update with index `step` (0-based) out of `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup + 1:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup - 1))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    total, warmup = cfg.train.steps, cfg.warmup_steps()
    decay, min_ratio = cfg.schedule.decay, cfg.schedule.min_lr_ratio
    fn: Callable[[int], float] = lambda step: lr_factor(step, total, warmup, decay, min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
