"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p, per-request seeds).

Each request draws from its own seeded generator, so its tokens do not depend on which other
requests share the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loopcoder.constraints import Constraint
from loopcoder.errors import LoopcoderError


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] | None = None  # None: the model's eos ids
    ignore_eos: bool = False
    constraint: Constraint | None = None  # the output must match this JSON schema, regex or grammar

    def validate(self) -> SamplingParams:
        """Raise `LoopcoderError` naming the first invalid value."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise LoopcoderError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        # Sampling divides by the temperature in float32, where a positive value below float32's smallest
        # normal (1e-300, say) is 0. (A top_p that rounds to 0 is fine: the most likely token is kept.)
        min_temperature = float(torch.finfo(torch.float32).tiny)
        if not (
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and (self.temperature == 0 or self.temperature >= min_temperature)
        ):
            raise LoopcoderError(
                f"temperature must be 0 (greedy) or a finite number >= {min_temperature:.3g} "
                f"(smaller values are 0 in float32), got {self.temperature!r}"
            )
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise LoopcoderError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise LoopcoderError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            raise LoopcoderError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LoopcoderError("stop strings must be non-empty strings")
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                raise LoopcoderError(f"constraint must be a Constraint, got {type(self.constraint).__name__}")
            self.constraint.validate()
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of one row of logits, in fp32.

    The most likely token always survives: a top_p that rounds to 0 in fp32 (1e-300) keeps it alone, and
    the logits are shifted to a maximum of 0 before the division, so a tiny temperature cannot overflow.
    """
    logits = logits.float()
    logits = (logits - logits.max()) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> tuple[list[int], dict[int, str]]:
    """One next token per row of `logits` (n, vocab), each row with its own params and generator.

    Returns the tokens and {row: why} for rows that cannot be sampled (their token is -1): logits that
    are NaN, +inf, or all -inf. Such a row fails alone; the other rows are sampled as usual.
    """
    out = logits.argmax(-1)
    ok = torch.isfinite(logits.gather(-1, out[:, None])[:, 0])  # argmax finds a NaN or +inf if there is one
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    errors: dict[int, str] = {}
    if sampled:
        finite = ok.tolist()
        for i in sampled:
            if not finite[i]:
                continue
            p = params[i]
            try:
                probs = filter_logits(logits[i], p.temperature, p.top_k, p.top_p).softmax(-1)
                out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
            except RuntimeError as e:  # should not happen with finite logits; if it does, it is this row's
                errors[i] = f"sampling failed ({e})"
    tokens = torch.where(ok, out, -1).tolist()
    for i, t in enumerate(tokens):
        if t < 0:
            errors[i] = "the model's next-token logits are not finite (NaN or infinite)"
        elif i in errors:
            tokens[i] = -1
    return tokens, errors
