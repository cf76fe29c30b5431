"""`ModelRunner`: everything that touches the model for a step, as vLLM's model runner does for its scheduler.

The engine decides what runs (admission, the token budget, preemption, slots, sampling); the runner runs it:
a prefill chunk straight into a slot of the cache (`prefill`, also the every-position scoring prefill a
request that wants its prompt's log-probabilities needs), and the decode step of the sequences in slots
0..n-1 (`decode`, `decode_slots`), on fixed shapes when asked (every slot, the whole store), compiled with
`torch.compile` or captured as a CUDA graph (one per mode), under the SDPA backends that suit decoding.
It prepares the weights once (`prepare_for_inference`: fused, prepacked projections).

A test replaces the model by giving the engine another runner (`Engine(..., runner=factory)`, where
`factory(model, cache, config)` makes it): the engine calls only `prefill` and `decode`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from loopcoder.inference.config import EngineConfig
from loopcoder.inference.kv.store import SlotCache
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.utils.errors import LoopcoderError

if TYPE_CHECKING:
    from loopcoder.inference.request import Request

# cuDNN's SDPA builds an execution plan on the host for every new shape (~4 ms per call measured on an
# H200), and a decode step's key length changes every step: decode on flash / memory-efficient / math.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    """Runs `model` over `cache` as `config` says (mode, fused weights, fixed shapes, compile, CUDA graphs)."""

    def __init__(self, model: PLTForCausalLM, cache: SlotCache, config: EngineConfig) -> None:
        self.model = model.eval()
        self.cache = cache
        self.mode = config.mode
        self.device = next(model.parameters()).device
        if config.fuse:  # fused projections, oneDNN-prepacked on CPU: all loop rows for the price of ~one
            model.prepare_for_inference(pack=not config.compile)  # inductor prepacks weights itself
        # compiled steps and CUDA graphs want one shape: every slot, the full cache length
        self.static_shapes = config.static
        if config.cuda_graphs and self.device.type != "cuda":
            raise LoopcoderError("cuda_graphs needs a CUDA device")
        self.cuda_graphs = config.cuda_graphs
        self._graphs: dict[str, tuple] = {}  # mode -> (graph, its input tokens, live mask, output logits)
        self._core = torch.compile(self._decode_core, dynamic=False) if config.compile else self._decode_core

    def prefill(self, req: Request, n: int) -> torch.Tensor:
        """Prefill the next `n` of `req`'s tokens (from `req.cached`) into its slot: the next-token logits
        (vocab,) after them, or, for a request scoring its prompt (`req.scoring`), the logits after every one
        of the `n` positions (n, vocab)."""
        ids = torch.tensor(req.tokens[req.cached : req.cached + n], device=self.device)
        return self.model.prefill_chunk(ids, self.cache.chunk(req.slot), every_position=req.scoring)

    def decode(self, reqs: list[Request]) -> torch.Tensor:
        """Next-token logits (n, vocab) of the decoding requests, which hold slots 0..n-1 in order."""
        tokens = torch.tensor([r.output_ids[-1] for r in reqs], device=self.device)
        return self.decode_slots(tokens, len(reqs))

    def decode_slots(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        """Logits (n, vocab) of the next token of the sequences in slots 0..n-1, whose last tokens are `tokens`."""
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
