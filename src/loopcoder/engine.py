"""The decode engine: continuous batching over a preallocated `SlotCache`. It schedules; the model computes.

What the engine does:
- admission: a queued request gets a free slot, its prompt is prefilled by the model's own `forward`
  (n samples of one prompt share one prefill) and the `PLTCache` it leaves is loaded into the slot;
- one decode step for every running sequence: `PLTForCausalLM.decode_step` (spec 1.3: all loops of a
  new token in one pass with `mode="parallel"`, one pass per loop with `mode="sequential"`; vanilla
  looped models and the no-offset ablation always take R passes), on fixed shapes when asked, captured
  as a CUDA graph or compiled with `torch.compile`;
- sampling, with each request's parameters and seeded generator (a constrained request's logits masked first
  by its grammar: `constraints.py`), then stop tokens, lengths, and the request's `TextStream`
  (detokenisation, stop strings, streaming);
- slots: running sequences stay packed in slots 0..n-1; a finished one leaves and the last moves in.

The model is called in two places only, `_prefill` and `_decode` (a test double replaces them to script
outputs). Requests are isolated in the shared step: what belongs to one request (its prefill, its logits, its
sampling, its text) can fail that request only, which ends with `finish_reason="error"` and `error` set;
the others go on. Only the decode step itself, which every running sequence shares, fails the step.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from loopcoder.cache import PLTCache, SlotCache
from loopcoder.constraints import GrammarCompiler, GrammarMatcher, mask_logits
from loopcoder.errors import LoopcoderError
from loopcoder.model import PLTForCausalLM
from loopcoder.sampling import SamplingParams, make_generator, sample_next
from loopcoder.textstream import TextStream

log = logging.getLogger("loopcoder.engine")

MODES = ("parallel", "sequential")
# cuDNN's SDPA builds an execution plan on the host for every new shape (~4 ms per call measured on an
# H200), and a decode step's key length changes every step: decode on flash / memory-efficient / math.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stream: TextStream
    stop_ids: frozenset[int]  # token ids that end the completion (not part of it)
    grammar: GrammarMatcher | None = None  # a constrained request's parser (its end tokens also stop it)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (stop token or string, grammar complete), "length", "abort", "error"
    error: str | None = None  # why the request failed (finish_reason "error")
    slot: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.stream.text


@dataclass
class Event:
    """What one step produced for one request: newly final text and tokens, whether it ended, and why it
    failed if it did (`error`, with finish_reason "error")."""

    request: Request
    text: str
    token_ids: list[int]
    finished: bool
    error: str | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    error: str | None = None


class Engine:
    """Continuous-batching generation with single-pass parallel-loop decoding.

    Requests join (`add_request`) and leave (finish or `abort`) between steps; each `step()` admits
    queued requests into free slots (prefill), then decodes one token for every running sequence.
    `num_running`, `num_waiting`, `steps` and `decoded` describe its load.
    """

    def __init__(self, model: PLTForCausalLM, tokenizer: Any = None, *, max_batch: int = 8,
                 max_seq_len: int | None = None, mode: str = "parallel", fuse: bool = True,
                 static_shapes: bool = False, compile: bool = False, cuda_graphs: bool = False) -> None:
        if mode not in MODES:
            raise LoopcoderError(f"mode must be one of {MODES}, got {mode!r}")
        if max_batch < 1:
            raise LoopcoderError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = cfg = model.config
        self.mode = mode
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.cache = SlotCache(cfg, max_batch, self.max_seq_len, self.dtype, self.device)
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        self.eos_ids = {e for e in eos if e is not None}
        # constrained decoding: grammars compiled once per constraint, shared by the requests that use it
        self.grammars = GrammarCompiler(tokenizer, cfg.vocab_size) if tokenizer is not None else None
        if fuse:  # fused projections, oneDNN-prepacked on CPU: all loop rows for the price of ~one
            model.prepare_for_inference(pack=not compile)  # inductor prepacks weights itself
        # compiled steps and CUDA graphs want one shape: every slot, the full cache length
        self.static_shapes = static_shapes or cuda_graphs or compile
        if cuda_graphs and self.device.type != "cuda":
            raise LoopcoderError("cuda_graphs needs a CUDA device")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[str, tuple] = {}  # mode -> (graph, its input tokens, live mask, output logits)
        self._core = torch.compile(self._decode_core, dynamic=False) if compile else self._decode_core
        self._active: list[Request] = []  # slot i holds _active[i]
        self._queue: deque[Request] = deque()
        self._ids = count()
        self.steps = 0  # decode steps taken
        self.decoded = 0  # sequences decoded, summed over decode steps (admission's first token not counted)

    # ------------------------------------------------------------------ public API
    @property
    def max_batch(self) -> int:
        return self.cache.max_batch

    @property
    def num_running(self) -> int:
        """Requests holding a slot."""
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
            raise LoopcoderError(f"the prompt has {len(prompt_ids)} tokens; this model's maximum is "
                                 f"{self.max_seq_len} (prompt plus at least one new token)")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise LoopcoderError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        stop_ids = frozenset() if params.ignore_eos else frozenset(
            self.eos_ids if params.stop_token_ids is None else params.stop_token_ids)
        grammar = None
        if params.constraint is not None:
            if self.grammars is None:
                raise LoopcoderError("constrained decoding needs the engine's tokenizer")
            # where the grammar may end, the request's stop tokens (or the model's end-of-text) end it
            grammar = self.grammars.matcher(params.constraint, stop_ids or self.eos_ids)
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt_ids), params,
                      make_generator(params.seed, self.device), TextStream(self.tokenizer, params.stop), stop_ids,
                      grammar)
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
        """Admit what fits, then decode one token for every running sequence. Raises only if the shared
        decode step fails; a failure that belongs to one request ends that request (an `Event` with `error`)."""
        events: list[Event] = []
        self._admit(events)
        self._release_finished()  # sequences that ended at their first token leave before the step
        if self._active:
            logits = self._decode(self._active)
            self._sample(self._active, logits, events)
            self.steps += 1
            self.decoded += len(logits)
        self._release_finished()
        return events

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 on_event: Callable[[Event], None] | None = None) -> list[Completion]:
        """Run prompts to completion (more prompts than slots queue up). Results in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_work():
            for ev in self.step():
                if on_event is not None:
                    on_event(ev)
        return [Completion(r.text, r.output_ids, r.finish_reason or "stop", len(r.prompt_ids), r.error)
                for r in reqs]

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
        return self.cache.nbytes()

    def decode_step(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """Logits (n, vocab) of the next token of the sequences in slots 0..n-1, whose last tokens are
        `tokens`; advances their caches by one position."""
        with sdpa_kernel(DECODE_ATTENTION):
            if not self.static_shapes:
                return self._core(tokens, n, None)
            # fixed shapes (every slot, the full length) so the step can be captured as a CUDA graph
            c = self.cache
            full = torch.zeros(c.max_batch, dtype=tokens.dtype, device=self.device)
            full[:n] = tokens
            live = torch.zeros(c.max_batch, dtype=torch.bool, device=self.device)
            live[:n] = True
            if self.cuda_graphs:
                return self._graph_step(full, live)[:n]
            return self._core(full, c.max_batch, live)[:n]

    # ------------------------------------------------------------------ admission and prefill
    def _admit(self, events: list[Event]) -> None:
        prefilled: dict[tuple[int, ...], tuple[PLTCache, torch.Tensor]] = {}
        while self._queue and len(self._active) < self.max_batch:
            req = self._queue.popleft()
            req.slot = len(self._active)
            try:
                logits = self._prefill(req, prefilled)
            except Exception as e:  # this request's prefill (e.g. out of memory for its prompt): it alone fails
                req.slot = None
                self._fail(req, e, events)
                continue
            self._active.append(req)
            # n samples of a prompt share its prefill logits: a grammar masks a copy
            self._sample([req], logits[None] if req.grammar is None else logits[None].clone(), events)

    def _prefill(self, req: Request, prefilled: dict) -> torch.Tensor:
        """Prefill `req`'s prompt into its slot; the next-token logits (vocab,). `prefilled` holds this
        admission round's prefills by prompt, so that n samples of one prompt share one forward."""
        key = tuple(req.prompt_ids)
        if key not in prefilled:
            ids = torch.tensor([req.prompt_ids], device=self.device)
            out = self.model(ids, cache=PLTCache(self.config), logits_to_keep=1)
            prefilled[key] = (out.cache, out.logits[0, -1])
        cache, logits = prefilled[key]
        self.cache.load(req.slot, cache)
        return logits

    # ------------------------------------------------------------------ the decode step
    def _decode(self, reqs: list[Request]) -> torch.Tensor:
        """Next-token logits (n, vocab) of the running requests, which hold slots 0..n-1 in order."""
        tokens = torch.tensor([r.output_ids[-1] for r in reqs], device=self.device)
        return self.decode_step(tokens, len(reqs))

    def _decode_core(self, tokens: torch.Tensor, n: int, live: torch.Tensor | None) -> torch.Tensor:
        step = self.cache.begin_step(n, live)
        return self.model.decode_step(tokens, self.cache, step, parallel=self.mode == "parallel")

    def _graph_step(self, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Replay a captured CUDA graph of the fixed-shape step (captured on first use, one per mode)."""
        c = self.cache
        if self.mode not in self._graphs:
            g_tokens, g_live = tokens.clone(), live.clone()
            saved = c.snapshot()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up outside the graph (rewrites this step's K/V, same values)
                self._decode_core(g_tokens, c.max_batch, g_live)
            torch.cuda.current_stream().wait_stream(stream)
            c.restore(saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                g_out = self._decode_core(g_tokens, c.max_batch, g_live)
            self._graphs[self.mode] = (graph, g_tokens, g_live, g_out)
        graph, g_tokens, g_live, g_out = self._graphs[self.mode]
        g_tokens.copy_(tokens)
        g_live.copy_(live)
        graph.replay()
        return g_out

    # ------------------------------------------------------------------ sampling and bookkeeping
    def _sample(self, reqs: list[Request], logits: torch.Tensor, events: list[Event]) -> None:
        """Sample one token per request (row of `logits`, masked in place where the request has a grammar) and
        append it. Per request: a grammar that fails, a row that cannot be sampled, or a failure in its
        bookkeeping, fails that request only."""
        failed = mask_logits(logits, [r.grammar for r in reqs])
        tokens, errors = sample_next(logits, [r.params for r in reqs], [r.generator for r in reqs])
        for i in errors:
            if reqs[i].grammar is not None:
                errors[i] += " among the tokens its grammar allows"
        errors.update(failed)
        for i, (req, token) in enumerate(zip(reqs, tokens)):
            if i in errors:
                self._fail(req, errors[i], events)
                continue
            try:
                self._append(req, token, events)
            except Exception as e:  # e.g. the tokenizer cannot decode this request's text
                self._fail(req, e, events)

    def _append(self, req: Request, token: int, events: list[Event]) -> None:
        now = time.perf_counter()
        req.first_token_at = req.first_token_at or now
        stop_token = token in req.stop_ids or (req.grammar is not None and token in req.grammar.end_ids)
        if stop_token:
            req.finish_reason = "stop"
        else:
            if req.grammar is not None:
                req.grammar.accept(token)  # raises if the token left the grammar (the mask prevents it)
            req.output_ids.append(token)
            if req.stream.push(token) or (req.grammar is not None and req.grammar.done):
                req.finish_reason = "stop"
            elif len(req.output_ids) >= req.params.max_new_tokens \
                    or len(req.prompt_ids) + len(req.output_ids) >= self.max_seq_len:
                req.finish_reason = "length"
        if req.finished:
            req.finished_at = now
        events.append(Event(req, req.stream.take(final=req.finished), [] if stop_token else [token], req.finished))

    def _fail(self, req: Request, why: str | Exception, events: list[Event]) -> None:
        """End one request with an error; the others go on."""
        if isinstance(why, Exception):
            log.exception("request %s failed", req.id, exc_info=why)
            why = f"{type(why).__name__}: {why}"
        else:
            log.warning("request %s failed: %s", req.id, why)
        req.finish_reason, req.error = "error", why
        req.finished_at = time.perf_counter()
        events.append(Event(req, "", [], True, why))

    def _release_finished(self) -> None:
        """Free finished sequences' slots, keeping the running ones packed in slots 0..n-1."""
        keep = [r for r in self._active if not r.finished]
        for dst, req in enumerate(keep):
            if req.slot != dst:
                self.cache.copy_slot(req.slot, dst)
                req.slot = dst
        for r in self._active:
            if r.finished:
                r.slot = None
        self._active = keep
