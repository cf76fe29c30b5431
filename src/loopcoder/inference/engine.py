"""The decode engine: continuous batching over the engine's cache. It schedules; the model computes.

What the engine does, every `step()`:
- admission: a queued request gets a free slot. With a paged cache and prefix caching it starts from the
  longest cached prefix of its prompt (`PagedSlotCache.attach`); a request whose prompt equals one being
  prefilled follows it and forks its cache when it is done (n samples of one prompt share one prefill);
- decode blocks: every decoding sequence gets room for its next position (a new block every `block_size`
  tokens); when the pool has none, the latest admitted request is preempted (its blocks freed, recomputed
  later from its prompt and output so far, largely from the prefix cache);
- chunked prefill: prompts are prefilled in chunks under a per-step token budget (`max_step_tokens`, the
  decoding sequences' tokens included), each chunk written straight into the engine's cache by the model
  (`PLTForCausalLM.prefill_chunk`), so a long prompt no longer stalls the running streams;
- one decode step for every decoding sequence: `PLTForCausalLM.decode_step` (spec 1.3: all loops of a
  new token in one pass with `mode="parallel"`, one pass per loop with `mode="sequential"`; vanilla
  looped models and the no-offset ablation always take R passes), on fixed shapes when asked, captured
  as a CUDA graph or compiled with `torch.compile`;
- sampling, with each request's parameters and seeded generator (a constrained request's logits masked first
  by its grammar: `constraints.py`; then its logit bias and penalties over its own tokens, and the
  log-probabilities it asked for: `sampling.py`), then stop tokens, lengths, and the request's `TextStream`
  (detokenisation, stop strings, streaming);
- slots: decoding sequences stay packed in slots 0..n-1 (the decode step works on slices), prefilling ones
  after them; a finished one leaves and the others move up.

The model is run by a `ModelRunner` (runner.py: prefill chunks, the decode step, fixed shapes, CUDA graphs,
`torch.compile`, fused weights), called in two places only, `_prefill` and the decode step in `step` (a test
gives the engine another runner to script outputs). Requests are isolated in the shared step: what belongs to
one request (its prefill, its logits, its sampling, its text) can fail that request only, which ends with
`finish_reason="error"` and `error` set; the others go on. Only the decode step itself, which every running
sequence shares, fails the step.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from itertools import count
from typing import Any

import torch

from loopcoder.inference.config import MODES, EngineConfig
from loopcoder.inference.constraints import GrammarCompiler, mask_logits
from loopcoder.inference.kv.paged import PagedSlotCache
from loopcoder.inference.kv.store import SlotCache
from loopcoder.inference.request import Completion, Event, FinishReason, Request, RequestState
from loopcoder.inference.runner import DECODE_ATTENTION, ModelRunner
from loopcoder.inference.sampling import (
    NOT_FINITE,
    LogitAdjustments,
    SamplingParams,
    TokenLogprob,
    adjust_logits,
    log_probs,
    make_generator,
    pick_logprobs,
    sample_next,
)
from loopcoder.inference.textstream import TextStream
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.utils.errors import LoopcoderError

__all__ = [
    "DECODE_ATTENTION",
    "MODES",
    "Completion",
    "Engine",
    "EngineConfig",
    "Event",
    "FinishReason",
    "ModelRunner",
    "Request",
    "RequestState",
]

log = logging.getLogger("loopcoder.inference.engine")

SCORING_CHUNK = 512  # positions per prefill chunk of a request that wants its prompt's log-probabilities
RunnerFactory = Callable[[PLTForCausalLM, SlotCache, EngineConfig], ModelRunner]


class Engine:
    """Continuous-batching generation with single-pass parallel-loop decoding.

    Requests join (`add_request`) and leave (finish or `abort`) between steps; each `step()` admits
    queued requests into free slots, prefills prompts in chunks, then decodes one token for every
    decoding sequence. `num_running`, `num_waiting`, `steps`, `decoded` and `cache_stats()` describe its load.

    What it runs with is an `EngineConfig` (cache and scheduling options, validated in one place):
    `Engine(model, tokenizer, EngineConfig(max_batch=8))`, or the same options as keywords,
    `Engine(model, tokenizer, max_batch=8)` (they replace the fields of `config`, or of the defaults).
    `runner` makes the `ModelRunner` that runs the model (`runner(model, cache, config)`; a test's fake one
    scripts outputs).
    """

    def __init__(
        self,
        model: PLTForCausalLM,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        *,
        runner: RunnerFactory = ModelRunner,
        **options: Any,
    ) -> None:
        self.engine_config = opts = (
            EngineConfig.from_options(config, **options) if options else config or EngineConfig()
        )
        self.tokenizer = tokenizer
        self.config = cfg = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_seq_len = min(opts.max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_step_tokens = opts.max_step_tokens
        if opts.paged:
            blocks = None if opts.kv_cache_tokens is None else -(-opts.kv_cache_tokens // opts.block_size)
            self.cache: SlotCache = PagedSlotCache(
                cfg,
                opts.max_batch,
                self.max_seq_len,
                self.dtype,
                self.device,
                block_size=opts.block_size,
                num_blocks=blocks,
                prefix_caching=opts.prefix_caching is not False,
            )
        else:
            self.cache = SlotCache(cfg, opts.max_batch, self.max_seq_len, self.dtype, self.device)
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        self.eos_ids = {e for e in eos if e is not None}
        # constrained decoding: grammars compiled once per constraint, shared by the requests that use it
        self.grammars = GrammarCompiler(tokenizer, cfg.vocab_size) if tokenizer is not None else None
        self.runner = runner(model, self.cache, opts)
        self._active: list[Request] = []  # slot i holds _active[i]: decoding requests first
        self._queue: deque[Request] = deque()
        self._leaders: dict[tuple[int, ...], Request] = {}  # tokens being prefilled -> the request doing it
        self._ids = count()
        self._admissions = count()
        self.steps = 0  # decode steps taken
        self.decoded = 0  # sequences decoded, summed over decode steps (a prefill's first token not counted)
        self.counters = dict.fromkeys(("prefill_chunks", "prefill_tokens", "preemptions", "forks"), 0)

    # ------------------------------------------------------------------ public API
    @property
    def model(self) -> PLTForCausalLM:
        return self.runner.model

    @property
    def mode(self) -> str:
        """ "parallel" or "sequential" (see `EngineConfig`); may be changed between steps."""
        return self.runner.mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise LoopcoderError(f"mode must be one of {MODES}, got {mode!r}")
        self.runner.mode = mode

    @property
    def max_batch(self) -> int:
        return self.cache.max_batch

    @property
    def num_running(self) -> int:
        """Requests holding a slot (decoding or being prefilled)."""
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._queue)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        params.validate()
        if not prompt_ids:
            raise LoopcoderError("the prompt is empty")
        if len(prompt_ids) >= self.max_seq_len:
            raise LoopcoderError(
                f"the prompt has {len(prompt_ids)} tokens; this model's maximum is "
                f"{self.max_seq_len} (prompt plus at least one new token)"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise LoopcoderError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        capacity = self.cache.capacity()
        if capacity is not None and len(prompt_ids) + 1 > capacity:
            raise LoopcoderError(
                f"the prompt has {len(prompt_ids)} tokens; the KV cache holds {capacity} "
                f"(prompt plus at least one new token)"
            )
        stop_ids = (
            frozenset()
            if params.ignore_eos
            else frozenset(self.eos_ids if params.stop_token_ids is None else params.stop_token_ids)
        )
        grammar = None
        if params.constraint is not None:
            if self.grammars is None:
                raise LoopcoderError("constrained decoding needs the engine's tokenizer")
            # where the grammar may end, the request's stop tokens (or the model's end-of-text) end it
            grammar = self.grammars.matcher(params.constraint, stop_ids or self.eos_ids)
        req = Request(
            request_id or f"req-{next(self._ids)}",
            list(prompt_ids),
            params,
            make_generator(params.seed, self.device),
            TextStream(self.tokenizer, params.stop),
            stop_ids,
            grammar,
            LogitAdjustments.for_request(params, prompt_ids, self.config.vocab_size, self.device),
            [None] if params.prompt_logprobs is not None else None,  # the first token has no context
        )
        self._queue.append(req)
        return req

    def abort(self, request_id: str) -> None:
        """Stop a request now (a client went away); its slot is free for the next step."""
        for req in list(self._queue):
            if req.id == request_id:
                self._queue.remove(req)
                req.finish_reason = "abort"
        for req in self._active:
            if req.id == request_id and not req.finished:
                req.finish_reason = "abort"
        self._release_finished()

    def has_work(self) -> bool:
        return bool(self._queue or self._active)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit what fits, prefill the next chunks within the token budget, then decode one token for every
        decoding sequence. Raises only if the shared decode step fails; a failure that belongs to one request
        ends that request (an `Event` with `error`)."""
        events: list[Event] = []
        self._admit()
        decoding = self._reserve_decode(events)
        budget = None if self.max_step_tokens is None else self.max_step_tokens - len(decoding)
        self._prefill_chunks(budget, events, progress=bool(decoding))
        self._release_finished()  # sequences that ended at their first token leave before the step
        decoding = self._reserve_decode(events)  # again: a prompt just prefilled decodes its next position now
        if decoding:
            logits = self.runner.decode(decoding)
            self._sample(decoding, logits, events)
            self.steps += 1
            self.decoded += len(logits)
            for req in decoding:
                self._advance(req, 1)
        self._release_finished()
        return events

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        on_event: Callable[[Event], None] | None = None,
    ) -> list[Completion]:
        """Run prompts to completion (more prompts than slots queue up). Results in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_work():
            for ev in self.step():
                if on_event is not None:
                    on_event(ev)
        return [Completion(r.text, r.output_ids, r.finish_reason or "stop", len(r.prompt_ids), r.error) for r in reqs]

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield text pieces of one completion as they become final; a failed request raises `LoopcoderError`."""
        req = self.add_request(prompt_ids, params)
        while not req.finished:
            for ev in self.step():
                if ev.request is req and ev.text:
                    yield ev.text
        if req.error is not None:
            raise LoopcoderError(f"generation failed: {req.error}")

    def kv_bytes(self) -> int:
        """Bytes allocated for K/V (for a paged cache: the pool, the rings and the snapshot store)."""
        return self.cache.nbytes()

    def cache_stats(self) -> dict[str, Any]:
        """The cache's figures (blocks held, cached and free, prefix hits) and the scheduler's counters."""
        return {**self.cache.stats(), **self.counters}

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """Logits (n, vocab) of the next token of the sequences in slots 0..n-1, whose last tokens are
        `tokens`; advances their caches by one position (taking blocks as needed)."""
        for slot, length in enumerate(self.cache.lengths[:n].tolist()):
            if not self.cache.reserve(slot, length + 1):
                raise LoopcoderError(f"the KV cache has no room for slot {slot}'s next token")
        return self.runner.decode_slots(tokens, n)

    # ------------------------------------------------------------------ admission
    def _admit(self) -> None:
        while self._queue and len(self._active) < self.max_batch:
            req = self._queue.popleft()
            req.slot = len(self._active)
            req.admitted = next(self._admissions)
            if not req.tokens:
                req.tokens = list(req.prompt_ids)
            self._active.append(req)
            leader = None if req.scoring else self._leaders.get(tuple(req.tokens))
            if leader is not None:  # the same tokens are being prefilled: fork that cache when it is done
                req.state, req.leader, req.cached = RequestState.FOLLOW, leader, 0
                leader.followers.append(req)
            else:
                self._start_prefill(req)

    def _start_prefill(self, req: Request) -> None:
        """Start `req`'s prefill in its (empty) slot, from the longest cached prefix of its tokens."""
        req.state, req.leader = RequestState.PREFILL, None
        req.cached = 0 if req.scoring else self.cache.attach(req.slot, req.tokens)
        if req.preemptions == 0 and not req.output_ids:
            req.cached_tokens = req.cached
        self._leaders.setdefault(tuple(req.tokens), req)

    # ------------------------------------------------------------------ blocks and preemption
    def _decoding(self) -> list[Request]:
        n = 0
        while n < len(self._active) and self._active[n].state == RequestState.DECODE:
            n += 1
        return self._active[:n]

    def _reserve_decode(self, events: list[Event]) -> list[Request]:
        """Room for the next position of every decoding sequence, oldest first; a sequence that cannot get it
        preempts the latest admitted request (possibly itself), or ends at this length when it is alone and the
        whole pool is its own. Returns the decoding requests."""
        for req in list(self._decoding()):
            if req.slot is None:  # preempted while making room for an older one
                continue
            while not self.cache.reserve(req.slot, req.cached + 1):
                victim = max(self._active, key=lambda r: r.admitted)
                if victim is req and len(self._active) == 1:  # alone and the pool is full: it cannot grow
                    req.finish_reason, req.finished_at = "length", time.perf_counter()
                    events.append(Event(req, req.stream.take(final=True), [], True))
                    break
                self._preempt(victim)
                if victim is req:
                    break
        self._release_finished()
        return self._decoding()

    def _preempt(self, req: Request) -> None:
        """Free a request's slot and blocks; it goes back to the front of the queue and will be recomputed from
        its prompt and output so far (largely from the prefix cache, where its full blocks stay)."""
        group, req.followers = [req, *req.followers], []  # its followers go too: none starts a prefill of its own
        for f in group:
            self._drop(f)
            f.state, f.slot, f.cached, f.leader, f.followers = RequestState.WAITING, None, 0, None, []
            f.tokens = f.prompt_ids + f.output_ids
            f.preemptions += 1
            self.counters["preemptions"] += 1
            self._queue.appendleft(f)
        self._pack()

    def _drop(self, req: Request) -> None:
        """Take a request out of its slot (finished, failed or preempted): free the slot, hand over or undo
        what depended on it."""
        if req.slot is not None:
            self.cache.release(req.slot)
        if self._leaders.get(tuple(req.tokens)) is req:
            del self._leaders[tuple(req.tokens)]
        if req.leader is not None and req in req.leader.followers:
            req.leader.followers.remove(req)
        for f in req.followers:  # they prefill themselves
            if not f.finished and f.slot is not None:
                self._start_prefill(f)
        req.followers = []
        if req in self._active:
            self._active.remove(req)

    def _pack(self) -> None:
        """Slots follow `_active`: decoding requests first, in order, then the others."""
        order = [r for r in self._active if r.state == RequestState.DECODE] + [
            r for r in self._active if r.state != RequestState.DECODE
        ]
        self.cache.reorder([r.slot for r in order])
        for i, r in enumerate(order):
            r.slot = i
        self._active = order

    # ------------------------------------------------------------------ chunked prefill
    def _prefill_chunks(self, budget: int | None, events: list[Event], progress: bool) -> None:
        """Prefill chunks in admission order while the budget lasts (None: whole prompts). If nothing at all can
        run (no decoding, no room for any chunk), the latest prefilling request is preempted to make room."""
        for req in [r for r in self._active if r.state == RequestState.PREFILL]:
            if req.finished or req.slot is None:
                continue
            n = len(req.tokens) - req.cached
            if budget is not None:
                n = min(n, budget)
            if req.scoring:  # its logits at every position are kept: bound them
                n = min(n, SCORING_CHUNK)
            if n <= 0:
                break
            if not self.cache.reserve(req.slot, req.cached + n):
                n = self.cache.room(req.slot) - req.cached
                if n <= 0 or not self.cache.reserve(req.slot, req.cached + n):
                    break
            self._prefill_chunk(req, n, events)
            progress = True
            if budget is not None:
                budget -= n
        if not progress:
            prefilling = [r for r in self._active if r.state == RequestState.PREFILL]
            if len(prefilling) > 1:
                self._preempt(max(prefilling, key=lambda r: r.admitted))

    def _prefill_chunk(self, req: Request, n: int, events: list[Event]) -> None:
        try:
            logits = self._prefill(req, n)
        except Exception as e:  # this request's prefill (e.g. out of memory for its prompt): it alone fails
            self._fail(req, e, events, "its prefill failed")
            return
        self.counters["prefill_chunks"] += 1
        self.counters["prefill_tokens"] += n
        self._advance(req, n)
        if req.cached < len(req.tokens):
            return
        req.state = RequestState.DECODE
        if self._leaders.get(tuple(req.tokens)) is req:
            del self._leaders[tuple(req.tokens)]
        followers, req.followers = req.followers, []
        for f in followers:
            f.leader = None
            if self.cache.fork(req.slot, f.slot):
                f.state, f.cached = RequestState.DECODE, req.cached
                self.counters["forks"] += 1
            else:
                self._start_prefill(f)
        self._pack()
        ready = []
        for r in [req] + [f for f in followers if f.state == RequestState.DECODE]:
            if r.params.max_new_tokens == 0:  # a prompt scored, nothing to generate
                self._finish_unsampled(r, events)
            else:
                ready.append(r)
        if not ready:
            return
        # n samples of a prompt share its prefill logits: a grammar masks its own copy
        rows = logits[None].expand(len(ready), -1)
        self._sample(ready, rows.clone() if any(r.grammar is not None for r in ready) else rows, events)

    def _finish_unsampled(self, req: Request, events: list[Event]) -> None:
        req.finish_reason, req.finished_at = "length", time.perf_counter()
        req.first_token_at = req.first_token_at or req.finished_at
        events.append(Event(req, "", [], True, prompt_logprobs=req.prompt_logprobs))

    def _advance(self, req: Request, n: int) -> None:
        """`req`'s cache holds `n` more positions: enter its newly full blocks in the prefix cache."""
        req.cached += n
        if req.slot is not None and self.cache.has_uncommitted(req.slot, req.cached):
            self.cache.commit(req.slot, req.prompt_ids + req.output_ids)

    def _prefill(self, req: Request, n: int) -> torch.Tensor:
        """Prefill the next `n` of `req`'s tokens into its slot; the next-token logits (vocab,) after them. A
        scoring request also records the log-probabilities of the prompt tokens these positions predict."""
        logits = self.runner.prefill(req, n)
        if not req.scoring:
            return logits
        self._record_prompt_logprobs(req, logits)
        return logits[-1]

    def _record_prompt_logprobs(self, req: Request, logits: torch.Tensor) -> None:
        """`logits` (n, vocab) after positions cached..cached+n-1: position p predicts prompt token p + 1. Tokens
        already scored (before a preemption, whose recomputation may chunk the prompt differently) are skipped."""
        have = len(req.prompt_logprobs)  # prompt tokens scored so far (the first has no score: its entry is None)
        skip = have - (req.cached + 1)  # rows of this chunk that predict tokens already scored
        targets = req.prompt_ids[have : req.cached + 1 + len(logits)]
        if skip < 0 or not targets:
            return
        k = req.params.prompt_logprobs
        rows = logits[skip : skip + len(targets)]
        req.prompt_logprobs += pick_logprobs(log_probs(rows), targets, [k] * len(targets))

    # ------------------------------------------------------------------ sampling and bookkeeping
    def _sample(self, reqs: list[Request], logits: torch.Tensor, events: list[Event]) -> None:
        """Sample one token per request (row of `logits`, masked in place where the request has a grammar) and
        append it. The log-probabilities are the model's (after the grammar's mask, before a bias or penalty, as
        vLLM reports them). Per request: a grammar that fails, a row that cannot be sampled, or a failure in its
        bookkeeping, fails that request only."""
        failed = mask_logits(logits, [r.grammar for r in reqs])
        wanted = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        logprobs = log_probs(logits[wanted]) if wanted else None
        adjusted = adjust_logits(logits, [r.adjust for r in reqs])
        tokens, errors = sample_next(adjusted, [r.params for r in reqs], [r.generator for r in reqs])
        failures = {i: why if why == NOT_FINITE else "sampling failed" for i, why in errors.items()}
        for i in errors:
            if reqs[i].grammar is not None:
                errors[i] += " among the tokens its grammar allows"
                failures[i] += " among the tokens its grammar allows"
        errors.update(failed)
        failures.update({i: "its grammar allows no next token" for i in failed})
        picked: dict[int, TokenLogprob] = {}
        ok = [i for i in wanted if i not in errors]
        if ok:
            rows = [wanted.index(i) for i in ok]
            found = pick_logprobs(logprobs[rows], [tokens[i] for i in ok], [reqs[i].params.logprobs for i in ok])
            picked = dict(zip(ok, found))
        for i, (req, token) in enumerate(zip(reqs, tokens)):
            if i in errors:
                self._fail(req, errors[i], events, failures[i])
                continue
            try:
                self._append(req, token, events, picked.get(i))
            except Exception as e:  # e.g. the tokenizer cannot decode this request's text
                self._fail(req, e, events, "its output could not be processed")

    def _append(self, req: Request, token: int, events: list[Event], logprob: TokenLogprob | None = None) -> None:
        now = time.perf_counter()
        first = req.first_token_at is None
        req.first_token_at = req.first_token_at or now
        stop_token = token in req.stop_ids or (req.grammar is not None and token in req.grammar.end_ids)
        if stop_token:
            req.finish_reason = "stop"
        else:
            if req.grammar is not None:
                req.grammar.accept(token)  # raises if the token left the grammar (the mask prevents it)
            req.output_ids.append(token)
            if req.adjust is not None:
                req.adjust.record(token)
            if req.stream.push(token) or (req.grammar is not None and req.grammar.done):
                req.finish_reason = "stop"
            elif (
                len(req.output_ids) >= req.params.max_new_tokens
                or len(req.prompt_ids) + len(req.output_ids) >= self.max_seq_len
            ):
                req.finish_reason = "length"
        if req.finished:
            req.finished_at = now
        token_ids = [] if stop_token else [token]
        events.append(
            Event(
                req,
                req.stream.take(final=req.finished),
                token_ids,
                req.finished,
                logprobs=None if logprob is None else [logprob][: len(token_ids)],
                prompt_logprobs=req.prompt_logprobs if first else None,
            )
        )

    def _fail(self, req: Request, why: str | Exception, events: list[Event], failure: str) -> None:
        """End one request with an error (`why` in detail, logged; `failure` a fixed phrase for clients); the
        others go on."""
        if isinstance(why, Exception):
            log.exception("request %s failed", req.id, exc_info=why)
            why = f"{type(why).__name__}: {why}"
        else:
            log.warning("request %s failed: %s", req.id, why)
        req.finish_reason, req.error, req.failure = "error", why, failure
        req.finished_at = time.perf_counter()
        events.append(Event(req, "", [], True, why))

    def _release_finished(self) -> None:
        """Free finished sequences' slots, keeping the others packed (decoding ones first)."""
        done = [r for r in self._active if r.finished]
        if not done:
            return
        for r in done:
            self._drop(r)
            r.slot = None
        self._pack()
