"""The parallel-loop decode engine (spec 1.3): continuous batching over a preallocated `SlotCache`.

The decode step is where PLT pays off. In `mode="parallel"`, for the n running sequences, the
n x R rows of their new tokens go through every layer together: row 1 is the token embedding E_t,
row r is `a * E_t + b * P(r-1)_{t-1}` from the state saved at the previous step (CLP). Inside each
layer, row 1 appends its K/V to the shared global cache before attention, so rows r >= 2 see position
t in their global branch; rows >= 2 also write and read their own ring of the last w+1 K/V (G-SWA).
Every weight is read once per step for all loops, so at decode (memory-bound) the step costs about
what the non-looped model's does.

`mode="sequential"` runs the same rows one loop per pass, R passes per step, as the authors' released
vLLM path does: identical numbers, R weight reads. A vanilla looped model (`loop_architecture=
"vanilla"`) is always R passes, loop r reading loop r-1's output of the same token, with a full
K/V store per loop; so is PLT without CLP's offset (`plt_loop_offset=False`, the ablation), which keeps
PLT's caches. Prefill is the model's own full forward, copied into the slot.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from loopcoder.cache import PLTCache, SlotCache
from loopcoder.errors import LoopcoderError
from loopcoder.model import KV, PLTForCausalLM, attend, rope_cos_sin
from loopcoder.sampling import SamplingParams, make_generator, sample_next

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
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None  # "stop" (eos or stop string), "length", "abort"
    slot: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    """What one step produced for one request: newly final text and tokens, and whether it ended."""

    request: Request
    text: str
    token_ids: list[int]
    finished: bool


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


class Engine:
    """Continuous-batching generation with single-pass parallel-loop decoding.

    Requests join (`add_request`) and leave (finish or `abort`) between steps; each `step()` admits
    queued requests into free slots (prefill), then decodes one token for every running sequence.
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
        self.plt = not cfg.is_vanilla
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        self.eos_ids = {e for e in eos if e is not None}
        if fuse:  # fused projections, oneDNN-prepacked on CPU: all loop rows for the price of ~one
            model.prepare_for_inference(pack=not compile)  # inductor prepacks weights itself
        # compiled steps and CUDA graphs want one shape: every slot, the full cache length
        self.static_shapes = static_shapes or cuda_graphs or compile
        if cuda_graphs and self.device.type != "cuda":
            raise LoopcoderError("cuda_graphs needs a CUDA device")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[str, tuple] = {}  # mode -> (graph, its input tokens, live mask, output logits)
        self._core = torch.compile(self._decode_core, dynamic=False) if compile else self._decode_core
        self.active: list[Request] = []  # slot i holds active[i]
        self.queue: deque[Request] = deque()
        self._ids = count()
        self.steps = 0  # decode steps taken
        self.decoded = 0  # sequences decoded, summed over decode steps (admission's first token not counted)

    # ------------------------------------------------------------------ public API
    @property
    def max_batch(self) -> int:
        return self.cache.max_batch

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
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt_ids), params,
                      make_generator(params.seed, self.device))
        self.queue.append(req)
        return req

    def abort(self, request_id: str) -> None:
        """Stop a request now (a client went away); its slot is free for the next step."""
        for req in list(self.queue):
            if req.id == request_id:
                self.queue.remove(req)
                req.finish_reason = "abort"
        for req in self.active:
            if req.id == request_id and not req.finished:
                req.finish_reason = "abort"
        self._release_finished()

    def has_work(self) -> bool:
        return bool(self.queue or self.active)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        events: list[Event] = []
        self._admit(events)
        running = [r for r in self.active if not r.finished]
        if running:
            n = len(self.active)
            tokens = torch.tensor([r.output_ids[-1] for r in self.active], device=self.device)
            logits = self.decode_step(tokens, n)
            live = [i for i, r in enumerate(self.active) if not r.finished]
            nxt = sample_next(logits[live], [self.active[i].params for i in live],
                              [self.active[i].generator for i in live]).tolist()
            for i, tok in zip(live, nxt):
                self._append(self.active[i], tok, events)
            self.steps += 1
            self.decoded += len(live)
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
        return [Completion(r.text, r.output_ids, r.finish_reason or "stop", len(r.prompt_ids)) for r in reqs]

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield text pieces of one completion as they become final."""
        req = self.add_request(prompt_ids, params)
        while not req.finished:
            for ev in self.step():
                if ev.request is req and ev.text:
                    yield ev.text

    def kv_bytes(self) -> int:
        return self.cache.nbytes()

    # ------------------------------------------------------------------ admission and prefill
    def _admit(self, events: list[Event]) -> None:
        prefilled: dict[tuple[int, ...], tuple[PLTCache, torch.Tensor]] = {}
        while self.queue and len(self.active) < self.max_batch:
            req = self.queue.popleft()
            key = tuple(req.prompt_ids)
            if key not in prefilled:  # n samples of one prompt share a single prefill
                ids = torch.tensor([req.prompt_ids], device=self.device)
                out = self.model(ids, cache=PLTCache(self.config), logits_to_keep=1)
                prefilled[key] = (out.cache, out.logits[0, -1])
            cache, logits = prefilled[key]
            req.slot = len(self.active)
            self.cache.load(req.slot, cache)
            self.active.append(req)
            tok = sample_next(logits[None].clone(), [req.params], [req.generator])[0].item()
            self._append(req, tok, events)

    # ------------------------------------------------------------------ the decode step
    def decode_step(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """Logits (n, vocab) of the next token of the sequences in slots 0..n-1, whose last tokens are
        `tokens`; advances their caches by one position."""
        with sdpa_kernel(DECODE_ATTENTION):
            c = self.cache
            if not self.static_shapes:
                t_cur = int(c.lengths[:n].max()) + 1
                return self._core(tokens, n, t_cur, torch.ones(n, dtype=torch.bool, device=self.device))
            # fixed shapes (every slot, the full length) so the step can be captured as a CUDA graph
            full = torch.zeros(c.max_batch, dtype=tokens.dtype, device=self.device)
            full[:n] = tokens
            live = torch.zeros(c.max_batch, dtype=torch.bool, device=self.device)
            live[:n] = True
            if self.cuda_graphs:
                return self._graph_step(full, live)[:n]
            return self._core(full, c.max_batch, c.max_len, live)[:n]

    def _decode_core(self, tokens: torch.Tensor, n: int, t_cur: int, live: torch.Tensor) -> torch.Tensor:
        cfg, c, model = self.config, self.cache, self.model.model
        R = cfg.plt_num_loops
        t = torch.where(live, c.lengths[:n], 0)  # position of each new token (free slots: 0, ignored)
        ctx = _StepContext(
            t=t,
            slots=torch.arange(n, device=self.device),
            cos_sin=rope_cos_sin(t[:, None], cfg.head_dim, cfg.rope_theta, self.dtype),
            global_mask=(torch.arange(t_cur, device=self.device)[None] <= t[:, None])[:, None, None],
            t_cur=t_cur,
        )
        if self.plt and R > 1:
            ring = t % (cfg.window + 1)
            c.ring_pos[ctx.slots, ring] = torch.where(live, t, c.ring_pos[ctx.slots, ring])
            ctx.ring = ring
            ctx.local_mask = (c.ring_pos[:n] >= 0)[:, None, None]
        emb = model.embed_tokens(tokens)
        if cfg.single_pass:
            # the R rows of each new token (CLP): row 1 = E_t, row r = a * E_t + b * P(r-1)_{t-1}
            rows = [emb] + [cfg.emb_scale * emb + cfg.hidden_scale * c.states[r, :n] for r in range(R - 1)]
            x = torch.stack(rows, 1)
            if self.mode == "parallel":
                h = self._layers(x, range(R), ctx)  # all loops in one pass
            else:
                h = torch.cat([self._layers(x[:, r:r + 1], range(r, r + 1), ctx) for r in range(R)], 1)
            for r in range(R - 1):
                c.states[r, :n] = torch.where(live[:, None], model.loop_state(h[:, r]), c.states[r, :n])
        else:  # vanilla, or PLT without CLP's offset: loop r reads loop r-1 of the same token, one pass per loop
            x, outs = emb[:, None], []
            for r in range(R):
                if r and self.plt:
                    x = model.loop_input(emb[:, None], model.loop_state(outs[-1]), None, t[:, None])
                elif r:
                    x = outs[-1]
                outs.append(self._layers(x, range(r, r + 1), ctx))
            h = torch.cat(outs, 1)
        c.lengths[:n] += live.to(c.lengths.dtype)
        return self.model.logits(h[:, R - 1])

    def _layers(self, x: torch.Tensor, loops: range, ctx: _StepContext) -> torch.Tensor:
        """Rows x (n, len(loops), hidden) of loops `loops` of the new tokens through every layer."""
        for i, layer in enumerate(self.model.model.layers):
            x = self._layer(i, layer, x, loops, ctx)
        return x

    def _layer(self, i: int, layer: Any, x: torch.Tensor, loops: range, ctx: _StepContext) -> torch.Tensor:
        c, attn = self.cache, layer.self_attn
        n, k = x.shape[:2]
        cos, sin = (z.expand(n, k, -1) for z in ctx.cos_sin)
        # q (n, H, k, hd), K/V (n, kv_heads, k, hd); gate logits (n, k, H) from the same matmul when fused
        q, new, gate_logits = attn.project(layer.input_layernorm(x), cos, sin)
        # 1) write this step's K/V: loop 1 (or a vanilla loop) into its full store, loops >= 2 into rings
        store = 0 if self.plt else loops.start
        if loops.start == 0 or not self.plt:
            c.k[i, store][ctx.slots, :, ctx.t] = new.k[:, :, 0]
            c.v[i, store][ctx.slots, :, ctx.t] = new.v[:, :, 0]
        first = 1 if loops.start == 0 else 0  # offset of the first ring row (loop >= 2) in x
        ring_loops = range(loops.start + first - 1, loops.stop - 1) if self.plt else range(0)
        if len(ring_loops):
            dst, local_mask = ctx.ring_rows(ring_loops)
            c.rk[i][dst] = new.k[:, :, first:].transpose(1, 2)
            c.rv[i][dst] = new.v[:, :, first:].transpose(1, 2)
        # 2) attention. Every row queries the full store (loop 1's K/V: the global branch of G-SWA; for
        #    a vanilla loop its own K/V), in one call for all rows of the step.
        full = KV(c.k[i, store, :n, :, :ctx.t_cur], c.v[i, store, :n, :, :ctx.t_cur])
        y = attend(q, full, ctx.global_mask)
        if len(ring_loops):  # G-SWA's local branch over each loop's ring, then the gate
            m = len(ring_loops)
            rk = c.rk[i, :n, ring_loops.start:ring_loops.stop].flatten(0, 1)
            rv = c.rv[i, :n, ring_loops.start:ring_loops.stop].flatten(0, 1)
            q_local = q[:, :, first:].transpose(1, 2).flatten(0, 1).unsqueeze(2)  # (n*m, H, 1, hd)
            y_local = attend(q_local, KV(rk, rv), local_mask)
            y_local = y_local.reshape(n, m, attn.num_heads, -1).transpose(1, 2)
            logits = None if gate_logits is None else gate_logits[:, first:]
            y[:, :, first:] = attn.mix(x[:, first:], q[:, :, first:], y[:, :, first:], y_local, logits)[0]
        x = x + attn.output(y)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _graph_step(self, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Replay a captured CUDA graph of the fixed-shape step (captured on first use, one per mode)."""
        c = self.cache
        if self.mode not in self._graphs:
            g_tokens, g_live = tokens.clone(), live.clone()
            saved = (c.lengths.clone(), c.ring_pos.clone(), c.states.clone())
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up outside the graph (rewrites this step's K/V, same values)
                self._decode_core(g_tokens, c.max_batch, c.max_len, g_live)
            torch.cuda.current_stream().wait_stream(stream)
            c.lengths.copy_(saved[0])
            c.ring_pos.copy_(saved[1])
            c.states.copy_(saved[2])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                g_out = self._decode_core(g_tokens, c.max_batch, c.max_len, g_live)
            self._graphs[self.mode] = (graph, g_tokens, g_live, g_out)
        graph, g_tokens, g_live, g_out = self._graphs[self.mode]
        g_tokens.copy_(tokens)
        g_live.copy_(live)
        graph.replay()
        return g_out

    # ------------------------------------------------------------------ bookkeeping
    def _append(self, req: Request, token: int, events: list[Event]) -> None:
        now = time.perf_counter()
        req.first_token_at = req.first_token_at or now
        p = req.params
        stop_ids = self.eos_ids if p.stop_token_ids is None else set(p.stop_token_ids)
        if token in stop_ids and not p.ignore_eos:
            req.finish_reason = "stop"
        else:
            req.output_ids.append(token)
            self._update_text(req)
            if req.finish_reason is None and (len(req.output_ids) >= p.max_new_tokens
                                              or len(req.prompt_ids) + len(req.output_ids) >= self.max_seq_len):
                req.finish_reason = "length"
        if req.finished:
            req.finished_at = now
        new_text = self._final_text(req)
        new_ids = [] if token in stop_ids and not p.ignore_eos else [token]
        events.append(Event(req, new_text, new_ids, req.finished))

    def _update_text(self, req: Request) -> None:
        if self.tokenizer is None:
            return
        text = self.tokenizer.decode(req.output_ids, skip_special_tokens=False)
        stops = req.params.stop
        if stops:
            start = max(0, len(req.text) - max(map(len, stops)))
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                text, req.finish_reason = text[:min(hits)], "stop"
        req.text = text

    def _final_text(self, req: Request) -> str:
        """Text that can no longer change: hold back a possible stop-string prefix and a split UTF-8 char."""
        end = len(req.text)
        if not req.finished:
            if req.text.endswith("\ufffd"):
                end -= 1
            if req.params.stop:
                end = max(req.emitted, end - (max(map(len, req.params.stop)) - 1))
        piece = req.text[req.emitted:end]
        req.emitted = max(req.emitted, end)
        return piece

    def _release_finished(self) -> None:
        """Free finished sequences' slots, keeping the running ones packed in slots 0..n-1."""
        keep = [r for r in self.active if not r.finished]
        for dst, req in enumerate(keep):
            if req.slot != dst:
                self.cache.copy_slot(req.slot, dst)
                req.slot = dst
        for r in self.active:
            if r.finished:
                r.slot = None
        self.active = keep


@dataclass
class _StepContext:
    """What every layer of one decode step shares: positions, RoPE, masks, ring slots."""

    t: torch.Tensor
    slots: torch.Tensor
    cos_sin: tuple
    global_mask: torch.Tensor
    t_cur: int
    ring: torch.Tensor | None = None
    local_mask: torch.Tensor | None = None
    _rows: dict = field(default_factory=dict)

    def ring_rows(self, loops: range) -> tuple:
        """(index into a layer's rings for these loops' rows, their local mask), built once per step."""
        key = (loops.start, loops.stop)
        if key not in self._rows:
            sel = torch.arange(loops.start, loops.stop, device=self.t.device)
            dst = (self.slots[:, None], sel[None], slice(None), self.ring[:, None])
            m = self.local_mask  # each sequence's mask once per loop row (expand: no host sync, graph-safe)
            self._rows[key] = dst, m.unsqueeze(1).expand(-1, len(loops), *m.shape[1:]).flatten(0, 1)
        return self._rows[key]
