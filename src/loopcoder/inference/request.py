"""A request as the engine schedules it (`Request`, its `RequestState`), what a step produced for it
(`Event`) and its result (`Completion`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import torch

from loopcoder.inference.constraints import GrammarMatcher
from loopcoder.inference.sampling import LogitAdjustments, SamplingParams, TokenLogprob
from loopcoder.inference.textstream import TextStream

# "stop": a stop token or string, or the grammar complete; "length": max_new_tokens, the context or the cache
# full; "abort": cancelled (a client went away); "error": this request failed (`Request.error` says why)
FinishReason = Literal["stop", "length", "abort", "error"]


class RequestState(StrEnum):
    """Where a request is in the scheduler (a `StrEnum`: each state equals its name as a string)."""

    WAITING = "waiting"  # queued for a slot (new, or preempted)
    PREFILL = "prefill"  # holds a slot; its tokens are being prefilled in chunks
    FOLLOW = "follow"  # holds a slot; waits for `leader`'s prefill of the same tokens, then forks its cache
    DECODE = "decode"  # its cache holds its tokens; one new token per step


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stream: TextStream
    stop_ids: frozenset[int]  # token ids that end the completion (not part of it)
    grammar: GrammarMatcher | None = None  # a constrained request's parser (its end tokens also stop it)
    adjust: LogitAdjustments | None = None  # its logit bias and penalties (with its token counts), if any
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs: one per prompt token
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None  # why the request failed (finish_reason "error"), in detail (for logs)
    failure: str | None = None  # the same in one fixed phrase, safe to show a client (no internal state)
    slot: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    state: RequestState = RequestState.WAITING
    tokens: list[int] = field(default_factory=list)  # what the cache must hold before decoding: the prompt (and,
    cached: int = 0  # after a preemption, the output so far); positions the cache holds of prompt + output
    cached_tokens: int = 0  # prompt tokens the prefix cache served at the first admission
    leader: Request | None = None
    followers: list[Request] = field(default_factory=list)
    admitted: int = -1  # admission order (the latest is preempted first); -1 until first admitted
    preemptions: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def scoring(self) -> bool:
        """Its prompt's log-probabilities are still to be computed: every prompt position must be run (no prefix
        cache, no shared prefill), and the logits after each one are kept."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)


@dataclass
class Event:
    """What one step produced for one request: newly final text and tokens, whether it ended, and why it
    failed if it did (`error`, with finish_reason "error"). With `params.logprobs`, `logprobs` has one entry per
    token of `token_ids`; with `params.prompt_logprobs`, the request's first event carries `prompt_logprobs`."""

    request: Request
    text: str
    token_ids: list[int]
    finished: bool
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    error: str | None = None
