"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p, per-request seeds), the
adjustments a request makes to its logits first (logit bias, repetition/frequency/presence penalties), and the
log-probabilities it may ask for.

Each request draws from its own seeded generator, so its tokens do not depend on which other requests share
the batch. The order of one step follows vLLM's sampler: the model's logits (a constrained request's masked by
its grammar first) give the reported log-probabilities; then `logit_bias` is added, then the penalties are
applied, then temperature, top-k and top-p, then the token is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loopcoder.inference.constraints import Constraint
from loopcoder.utils.errors import LoopcoderError

MAX_LOGPROBS = 20  # most likely tokens reported per position (vLLM's default cap; OpenAI allows 20 in chat)
NOT_FINITE = "the model's next-token logits are not finite (NaN or infinite)"
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit bias: larger values are clamped (as vLLM does)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128  # 0 only with prompt_logprobs: score the prompt, generate nothing
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] | None = None  # None: the model's eos ids
    ignore_eos: bool = False
    constraint: Constraint | None = None  # the output must match this JSON schema, regex or grammar
    # vLLM's definitions (OpenAI's for presence and frequency): before temperature, over this request's tokens
    presence_penalty: float = 0.0  # minus this for every token already generated
    frequency_penalty: float = 0.0  # minus this times the number of times a token was generated
    repetition_penalty: float = 1.0  # tokens of the prompt or the output: logit / p if positive, logit * p if not
    logit_bias: dict[int, float] | None = None  # added to the logits of these token ids
    logprobs: int | None = None  # report each generated token's log-probability and this many most likely ones
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (no prefix cache reuse)

    def validate(self) -> SamplingParams:
        """Raise `LoopcoderError` naming the first invalid value."""
        minimum = 0 if self.prompt_logprobs is not None else 1
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < minimum:
            raise LoopcoderError(
                f"max_new_tokens must be an integer >= 1 (0 only with prompt_logprobs), got {self.max_new_tokens!r}"
            )
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -2 <= value <= 2):
                raise LoopcoderError(f"{name} must be in [-2, 2], got {value!r}")
        rp = self.repetition_penalty
        if not (isinstance(rp, (int, float)) and math.isfinite(rp) and rp > 0):
            raise LoopcoderError(f"repetition_penalty must be a finite number > 0, got {rp!r}")
        if self.logit_bias is not None:
            for token, bias in self.logit_bias.items():
                if not isinstance(token, int) or token < 0:
                    raise LoopcoderError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
                if not (isinstance(bias, (int, float)) and math.isfinite(bias)):
                    raise LoopcoderError(f"logit_bias values must be finite numbers, got {bias!r} for token {token}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS):
                raise LoopcoderError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                raise LoopcoderError(f"constraint must be a Constraint, got {type(self.constraint).__name__}")
            self.constraint.validate()
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """The request changes its logits before sampling (a bias or a penalty that is not neutral)."""
        return bool(
            self.logit_bias or self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )


# ---------------------------------------------------------------------------------------------- adjustments
class LogitAdjustments:
    """What one request does to its logits before sampling, and the per-token counts it needs.

    `logit_bias` is added first (clamped to +-100, as vLLM does), then vLLM's penalties
    (vllm/model_executor/layers/utils.py, `apply_penalties`): the repetition penalty divides a positive logit
    (multiplies a negative one) of every token seen in the prompt or the output; the frequency penalty subtracts
    penalty x (times the token was generated), the presence penalty subtracts penalty once for every token
    generated at least once. Counts are over the generated tokens (stop tokens are not generated tokens).
    """

    def __init__(
        self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device | str = "cpu"
    ) -> None:
        self.params = params
        bias = params.logit_bias or {}
        if any(t >= vocab_size for t in bias):
            raise LoopcoderError(f"logit_bias names token {max(bias)}, outside the vocabulary (size {vocab_size})")
        self.bias_ids = torch.tensor(sorted(bias), dtype=torch.long, device=device) if bias else None
        self.bias = (
            torch.tensor(
                [max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(bias[t]))) for t in sorted(bias)],
                dtype=torch.float32,
                device=device,
            )
            if bias
            else None
        )
        counting = params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device) if counting else None
        self.in_prompt = None
        if params.repetition_penalty != 1.0:
            self.in_prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = [t for t in prompt_ids if 0 <= t < vocab_size]
            if ids:
                self.in_prompt[torch.tensor(ids, device=device)] = True

    @classmethod
    def for_request(
        cls, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device | str = "cpu"
    ) -> LogitAdjustments | None:
        """None when the request leaves its logits as they are (no work at all per step)."""
        return cls(params, prompt_ids, vocab_size, device) if params.adjusts_logits else None

    def record(self, token: int) -> None:
        """A token was generated."""
        if self.counts is not None:
            self.counts[token] += 1

    def apply(self, row: torch.Tensor) -> None:
        """Adjust one row of float32 logits (vocab,) in place."""
        p = self.params
        if self.bias is not None:
            row.index_add_(0, self.bias_ids, self.bias)
        if self.counts is None:
            return
        generated = self.counts > 0
        if p.repetition_penalty != 1.0:
            seen = generated | self.in_prompt
            scale = torch.where(row > 0, 1.0 / p.repetition_penalty, p.repetition_penalty)
            row.mul_(torch.where(seen, scale, 1.0))
        if p.frequency_penalty:
            row.sub_(p.frequency_penalty * self.counts)
        if p.presence_penalty:
            row.sub_(p.presence_penalty * generated)


def adjust_logits(logits: torch.Tensor, adjustments: list[LogitAdjustments | None]) -> torch.Tensor:
    """The logits (n, vocab) with each row's adjustments applied: `logits` itself when no row has any, else a
    float32 copy (the penalties are computed in float32, as vLLM does)."""
    rows = [i for i, a in enumerate(adjustments) if a is not None]
    if not rows:
        return logits
    out = logits.float() if logits.dtype != torch.float32 else logits.clone()
    for i in rows:
        adjustments[i].apply(out[i])
    return out


# ---------------------------------------------------------------------------------------------- logprobs
@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the `top` most likely tokens there (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 (the distribution the log-probabilities report)."""
    return torch.log_softmax(logits.float(), dim=-1)


def pick_logprobs(logprobs: torch.Tensor, tokens: list[int], k: list[int]) -> list[TokenLogprob]:
    """Row i's log-probability of tokens[i] and its k[i] most likely tokens (`logprobs` (n, vocab))."""
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    kmax = max(k, default=0)
    top_values = top_ids = None
    if kmax:
        top = torch.topk(logprobs, min(kmax, logprobs.shape[-1]), dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    out = []
    for i, token in enumerate(tokens):
        top_i = tuple(zip(top_ids[i][: k[i]], top_values[i][: k[i]])) if kmax else ()
        out.append(TokenLogprob(token, chosen[i], top_i))
    return out


# ---------------------------------------------------------------------------------------------- sampling
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
            errors[i] = NOT_FINITE
        elif i in errors:
            tokens[i] = -1
    return tokens, errors
