"""What a model costs to decode, measured through the engine's public API (`Engine.step`).

Each model gets an engine with `batch` sequences of `context` random prompt tokens admitted and
prefilled (not timed; the cost of a decode step does not depend on the values), then the models take
turns for `rounds` rounds of `steps` timed decode steps each, so that drift in the machine's load hits
all of them alike. The engine decodes a single-pass model (PLT with CLP's offset, R = 1) with all loops
in one pass and the others (vanilla loops, PLT without the offset) one loop after another.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams


def decode_latency(
    models: dict[str, Any],
    context: int,
    batch: int = 1,
    steps: int = 16,
    rounds: int = 5,
    warmup: int = 2,
    threads: int | None = 1,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per model: median seconds per decode step (all `batch` sequences), each round's median, the KV
    bytes the engine allocated and the number of passes per token. The models are modified for
    inference (fused weights): pass copies you do not need for anything else."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        engines = {}
        new_tokens = warmup + rounds * steps + 1
        for name, model in models.items():
            engine = Engine(model, max_batch=batch, max_seq_len=context + new_tokens + 1)
            gen = torch.Generator().manual_seed(seed)
            params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            for prompt in torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).tolist():
                engine.add_request(prompt, params)
            for _ in range(1 + warmup):  # admission and prefill, then warm-up steps
                engine.step()
            engines[name] = engine
        times: dict[str, list[float]] = {name: [] for name in models}
        rounds_median: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, engine in engines.items():
                for _ in range(steps):
                    t0 = time.perf_counter()
                    engine.step()
                    times[name].append(time.perf_counter() - t0)
                rounds_median[name].append(statistics.median(times[name][-steps:]))
        return {
            name: {
                "latency_s": statistics.median(times[name]),
                "round_latencies_s": rounds_median[name],
                "kv_allocated_bytes": engine.kv_bytes(),
                "batch": batch,
                "context": context,
                "passes": 1 if engine.config.single_pass else engine.config.plt_num_loops,
                "threads": torch.get_num_threads(),
            }
            for name, engine in engines.items()
        }
    finally:
        torch.set_num_threads(saved)
