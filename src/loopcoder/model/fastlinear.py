"""Inference matmuls for decoding: fused projections and, on CPU, oneDNN prepacked weights.

`FastLinear` stands in for one or more `nn.Linear` that read the same input (q/k/v, gate/up, or a
single projection). Their weights are concatenated once and the parameters become views of the result,
so the fused and unfused paths share memory. On CPU in fp32 it also keeps a oneDNN ("mkldnn")
prepacked copy of the weight. The reason: MKL's sgemm costs about M times the M = 1 time for small M,
so a decode step with R loop rows per token would pay for every row. oneDNN's small-batch kernel
reads the weight once for all rows (measured in docs/benchmarks.md).

It is used only while gradients are off, so training never sees it. Pack after the model is on its
device and its weights are final: the packed copy does not follow later changes to the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


ROW_ALIGN = 16  # elements: 32 bytes in bf16


class FastLinear:
    """`extra` rows (no bias, not parameters) may ride along in the same matmul: G-SWA's gate logits."""

    def __init__(self, linears: list[nn.Linear], pack: bool = True, extra: torch.Tensor | None = None) -> None:
        self.sizes = [m.out_features for m in linears] + ([] if extra is None else [extra.shape[0]])
        # Split outputs are strided views: keep every row a multiple of ROW_ALIGN elements wide, else a view
        # (v, which no op copies before attention) can start off a 16-byte boundary, and CUDA's flash and
        # memory-efficient attention kernels fault on it ("misaligned address"; e.g. 28 gate rows in bf16).
        self.pad = (-sum(self.sizes)) % ROW_ALIGN if len(self.sizes) > 1 else 0
        tail = self.pad + (0 if extra is None else extra.shape[0])  # rows after the parameters' rows
        weight = linears[0].weight
        tail_weight = weight.new_zeros(self.pad, weight.shape[1])
        if extra is not None:
            tail_weight = torch.cat([extra.detach().to(weight.dtype), tail_weight])
        self.weight = _fuse([m.weight for m in linears], tail_weight)
        has_bias = linears[0].bias is not None
        self.bias = _fuse([m.bias for m in linears], weight.new_zeros(tail)) if has_bias else None
        self.packed = None
        if pack and can_pack(self.weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 4)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs of the fused linears (and the extra rows), in order; the padding is dropped."""
        parts = self(x).split([*self.sizes, self.pad] if self.pad else self.sizes, -1)
        return parts[: len(self.sizes)]


def active(fast: FastLinear | None) -> bool:
    """Use the fast path: it exists and no gradient is being recorded."""
    return fast is not None and not torch.is_grad_enabled()


def _fuse(params: list[nn.Parameter], tail: torch.Tensor) -> torch.Tensor:
    """Concatenate parameters (then `tail`, rows that are not parameters) along their rows and make each
    parameter a view of its rows, so that the fused and unfused paths share memory."""
    if len(params) == 1 and not len(tail):
        return params[0].detach()
    fused = torch.cat([p.detach() for p in params] + [tail])
    start = 0
    for p in params:
        p.data = fused[start : start + p.shape[0]]
        start += p.shape[0]
    return fused
