"""Decode benchmark: per-token latency and KV bytes of every way to run loops, in one run.

Configurations, all at one model shape (the layers are shared, so every R has the same weights'
size): the non-looped model (R = 1), PLT single-pass R = 2..4, PLT sequential R = 2..4 (one pass
per loop, as the authors' vLLM path), the vanilla looped transformer R = 2..4, and transformers'
`LlamaForCausalLM.generate` at the R = 1 shape. Caches are filled with random K/V at the context
length (a decode step's cost does not depend on the values), so no prefill is timed. Latency is the
median over steps after warm-up; the roofline (measured matmul rate and memory bandwidth) says what
each configuration could reach.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any

import torch
from torch.nn.attention import sdpa_kernel
from transformers import DynamicCache, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from loopcoder.bench.common import llama_config, machine_info, sync
from loopcoder.bench.settings import DecodeBenchSettings
from loopcoder.inference.engine import DECODE_ATTENTION, Engine
from loopcoder.model.config import PLTConfig
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.utils.runtime import pick_device, pick_dtype


def _free(device: torch.device) -> None:
    """Drop the last group's caches before the next group allocates its own (GPU caches can be 10s of GB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_machine(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Peak-ish matmul rate (FLOP/s) and memory read bandwidth (bytes/s) of this device."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(4):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3 / min(times[1:])
    del a, b
    big = torch.ones(256 * 2**20 // 4 if device.type == "cpu" else 2**30 // 4, device=device)
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        big.sum()
        sync(device)
        times.append(time.perf_counter() - t0)
    bandwidth = big.numel() * 4 / min(times[1:])
    return {"matmul_flops": flops, "read_bandwidth": bandwidth}


def build_model(cls: Any, cfg: Any, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """`cls(cfg)` seeded, initialised where it runs (a large model on CPU takes a while), in `dtype`, eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        return cls(cfg).to(dtype=dtype).eval()


def _step_cost(cfg: PLTConfig, mode: str, batch: int, context: int, dtype_bytes: int) -> dict[str, float]:
    """FLOPs and bytes one decode step must move (weights once per pass, K/V read, lm_head once)."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    R = cfg.plt_num_loops
    hq, hkv, hd, m = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    layer_params = d * hd * (hq + 2 * hkv) + hq * hd * d + 3 * d * m
    if not cfg.is_vanilla and R > 1:
        layer_params += hq * (d + 1) + d
    passes = 1 if (R == 1 or mode == "parallel") else R
    rows = batch * R
    kv_entry = 2 * hkv * hd * dtype_bytes
    if cfg.is_vanilla or R == 1:
        kv_read = L * batch * R * context * kv_entry
    elif mode == "parallel":
        kv_read = L * batch * (context + (R - 1) * (cfg.window + 1)) * kv_entry
    else:
        kv_read = L * batch * (R * context + (R - 1) * (cfg.window + 1)) * kv_entry
    weight_bytes = (passes * L * layer_params + d * V) * dtype_bytes
    flops = 2 * L * layer_params * rows + 2 * d * V * batch + 4 * L * hq * hd * context * rows
    return {"weight_bytes": weight_bytes, "kv_read_bytes": kv_read, "bytes": weight_bytes + kv_read, "flops": flops}


class EngineTimer:
    """One engine with its cache filled to `context` for `batch` sequences, timed a few steps at a time."""

    def __init__(
        self, model: Any, mode: str, batch: int, context: int, s: DecodeBenchSettings, share: EngineTimer | None = None
    ) -> None:
        self.device = next(model.parameters()).device
        self.batch, self.mode = batch, mode
        if share is not None:  # another mode of the same model: same engine and cache, switched per run
            self.engine = share.engine
        else:
            # the preallocated cache, as the recorded figures: the paged one gathers each layer's blocks per step
            # (docs/benchmarks.md, "Agentic serving")
            self.engine = Engine(
                model,
                max_batch=batch,
                max_seq_len=context + s.steps_per_engine(),
                mode=mode,
                cuda_graphs=s.cuda_graphs and self.device.type == "cuda",
                paged=False,
            )
            self.engine.cache.fill_random(batch, context, torch.Generator().manual_seed(s.seed))
        self.tokens = torch.randint(0, model.config.vocab_size, (batch,), device=self.device)
        self.times: list[float] = []
        self.rounds: list[float] = []  # median of each round: rounds pair up across configurations
        self.run(s.warmup, keep=False)
        self.kv_bytes = model.config.kv_cache_bytes(context, batch, dtype_bytes=next(model.parameters()).element_size())

    @torch.inference_mode()
    def run(self, steps: int, keep: bool = True) -> None:
        self.engine.mode = self.mode
        for _ in range(steps):
            sync(self.device)
            t0 = time.perf_counter()
            self.tokens = self.engine.decode_step(self.tokens, self.batch).argmax(-1)
            sync(self.device)
            if keep:
                self.times.append(time.perf_counter() - t0)
        if keep:
            self.rounds.append(statistics.median(self.times[-steps:]))

    def result(self) -> dict[str, Any]:
        return {
            "latency_s": statistics.median(self.times),
            "latency_min_s": min(self.times),
            "round_latencies_s": self.rounds,
            "steps_timed": len(self.times),
            "kv_bytes": self.kv_bytes,
            "kv_allocated_bytes": self.engine.kv_bytes(),
        }


class TransformersTimer:
    """`LlamaForCausalLM.generate` at the R = 1 shape from a cache prefilled with random K/V; per-token
    latency read off a logits processor's clock (one `generate` call per round)."""

    def __init__(self, model: Any, s: DecodeBenchSettings, batch: int, context: int) -> None:
        self.model, self.s, self.batch = model, s, batch
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        torch.manual_seed(s.seed)
        self.cache = DynamicCache(config=model.config)
        shape = (batch, s.num_kv_heads, context, s.head_dim)
        for layer in range(s.num_layers):  # drawn where they live: GPU caches can be 10s of GB
            k, v = (torch.randn(shape, device=self.device, dtype=dtype) for _ in range(2))
            self.cache.update(k, v, layer)
        self.times: list[float] = []
        self.rounds: list[float] = []
        self.kv_bytes = s.model_config(1).kv_cache_bytes(context, batch, torch.tensor([], dtype=dtype).element_size())
        self.run(s.warmup, keep=False)

    @torch.inference_mode()
    def run(self, steps: int, keep: bool = True) -> None:
        stamps: list[float] = []
        device = self.device

        class Clock(LogitsProcessor):
            def __call__(self, input_ids, scores):
                sync(device)
                stamps.append(time.perf_counter())
                return scores

        length = self.cache.get_seq_length()
        ids = torch.randint(0, self.s.vocab_size, (self.batch, length + 1), device=device)
        with sdpa_kernel(DECODE_ATTENTION):  # the engine's attention kernels, so that only the rest differs
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=self.cache,
                max_new_tokens=steps + 1,
                min_new_tokens=steps + 1,
                do_sample=False,
                logits_processor=LogitsProcessorList([Clock()]),
                pad_token_id=0,
            )
        self.cache.crop(length - self.cache.get_seq_length())  # back to the context length for the next round
        if keep:
            diffs = [b - a for a, b in itertools.pairwise(stamps)]
            self.times += diffs
            self.rounds.append(statistics.median(diffs))

    def result(self) -> dict[str, Any]:
        return {
            "latency_s": statistics.median(self.times),
            "latency_min_s": min(self.times),
            "round_latencies_s": self.rounds,
            "steps_timed": len(self.times),
            "kv_bytes": self.kv_bytes,
        }


def configurations(s: DecodeBenchSettings) -> list[tuple[str, str, int, str]]:
    """(name, architecture, R, mode) of every engine configuration, in table order."""
    rows = [("R=1", "plt", 1, "parallel")]
    rows += [(f"PLT-{r} single-pass", "plt", r, "parallel") for r in s.loops]
    rows += [(f"PLT-{r} sequential", "plt", r, "sequential") for r in s.loops]
    rows += [(f"vanilla-{r}", "vanilla", r, "sequential") for r in s.loops]
    return rows


def run_decode_bench(s: DecodeBenchSettings, log: Any = sys.stderr) -> dict[str, Any]:
    """Every configuration at every (batch, context). Configurations that are compared take turns in
    `rounds` (R = 1, PLT-R single-pass, PLT-R sequential, vanilla-R; R = 1 and transformers), so slow
    drift of a shared machine affects both sides of each ratio alike."""
    device = pick_device(s.device)
    dtype = pick_dtype(s.dtype, device)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    machine = measure_machine(device, dtype)
    groups = len(s.loops) * len(s.batches) * len(s.contexts) + (
        len(s.batches) * len(s.contexts) if s.include_transformers else 0
    )
    done, start = 0, time.perf_counter()

    def progress(text: str) -> None:
        nonlocal done
        done += 1
        el = time.perf_counter() - start
        print(
            f"  [{done}/{groups}] {text}  elapsed {el:.0f}s  eta {el / done * (groups - done):.0f}s",
            file=log,
            flush=True,
        )

    def measure(timers: dict[str, Any]) -> dict[str, dict[str, Any]]:
        for _ in range(s.rounds):
            for t in timers.values():
                t.run(s.steps)
        return {name: t.result() for name, t in timers.items()}

    base_cfg = s.model_config(1)
    base = build_model(PLTForCausalLM, base_cfg, device, dtype, s.seed)
    groups_seen: dict[tuple[Any, int, int], dict[str, dict[str, Any]]] = {}  # each measured together
    for R in s.loops:
        plt_cfg, van_cfg = s.model_config(R), s.model_config(R, "vanilla")
        plt = build_model(PLTForCausalLM, plt_cfg, device, dtype, s.seed)
        van = build_model(PLTForCausalLM, van_cfg, device, dtype, s.seed)
        for batch in s.batches:
            for context in s.contexts:
                single = EngineTimer(plt, "parallel", batch, context, s)
                timers = {
                    "R=1": EngineTimer(base, "parallel", batch, context, s),
                    f"PLT-{R} single-pass": single,
                    f"PLT-{R} sequential": EngineTimer(plt, "sequential", batch, context, s, share=single),
                    f"vanilla-{R}": EngineTimer(van, "sequential", batch, context, s),
                }
                group = measure(timers)
                groups_seen[(R, batch, context)] = group
                del timers, single
                _free(device)
                got = {n: r["latency_s"] for n, r in group.items()}
                progress(
                    f"R={R} batch={batch} context={context}: "
                    + ", ".join(f"{n} {got[n] * 1e3:.1f} ms" for n in ("R=1", f"PLT-{R} single-pass", f"vanilla-{R}"))
                )
        del plt, van
        _free(device)
    if s.include_transformers:
        llama = build_model(LlamaForCausalLM, llama_config(base_cfg), device, dtype, s.seed)
        for batch in s.batches:
            for context in s.contexts:
                timers = {
                    "R=1": EngineTimer(base, "parallel", batch, context, s),
                    HF_NAME: TransformersTimer(llama, s, batch, context),
                }
                group = measure(timers)
                groups_seen[("hf", batch, context)] = group
                del timers
                _free(device)
                progress(
                    f"transformers batch={batch} context={context}: R=1 {group['R=1']['latency_s'] * 1e3:.1f} "
                    f"ms, transformers {group[HF_NAME]['latency_s'] * 1e3:.1f} ms"
                )
        del llama
    results = []
    rows = configurations(s) + ([(HF_NAME, "llama", 1, "hf")] if s.include_transformers else [])
    for name, arch, R, mode in rows:
        for batch in s.batches:
            for context in s.contexts:
                # every group that measured this configuration here (R=1 is in each), in measuring order
                runs = [g[name] for (_, b, c), g in groups_seen.items() if (b, c) == (batch, context) and name in g]
                row = {
                    "config": name,
                    "architecture": arch,
                    "loops": R,
                    "mode": mode,
                    "batch": batch,
                    "context": context,
                    "latency_s": statistics.median(r["latency_s"] for r in runs),
                    "latency_min_s": min(r["latency_min_s"] for r in runs),
                    "steps_timed": sum(r["steps_timed"] for r in runs),
                    "kv_bytes": runs[0]["kv_bytes"],
                }
                cfg = s.model_config(R, "vanilla" if arch == "vanilla" else "plt")
                row.update(
                    _step_cost(
                        cfg, "parallel" if mode in ("parallel", "hf") else "sequential", batch, context, dtype_bytes
                    )
                )
                floor = row["bytes"] / machine["read_bandwidth"]
                row.update(
                    bandwidth_floor_s=floor,
                    fraction_of_bandwidth_floor=floor / row["latency_s"],
                    compute_floor_s=row["flops"] / machine["matmul_flops"],
                    tokens_per_s=batch / row["latency_s"],
                )
                results.append(row)
    return {
        "settings": asdict(s),
        "machine": {**machine, **machine_info(device)},
        "results": results,
        "ratios": ratios(groups_seen, s),
    }


HF_NAME = "transformers generate (R=1 shape)"


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """a / b as the median over rounds of the ratio of the two configurations' round medians: each round
    timed both within seconds, so the machine's slow drift cancels in every ratio."""
    return statistics.median(x / y for x, y in zip(a["round_latencies_s"], b["round_latencies_s"]))


def ratios(groups: dict[tuple[Any, int, int], dict[str, dict[str, Any]]], s: DecodeBenchSettings) -> list[dict]:
    """Per (batch, context): latency ratios between configurations measured in the same interleaved
    group (so each ratio's two sides saw the same machine), and KV-byte ratios."""
    out = []
    for batch in s.batches:
        for context in s.contexts:
            entry: dict[str, Any] = {"batch": batch, "context": context}
            hf = groups.get(("hf", batch, context))
            if hf is not None:
                entry["R1_engine_speedup_over_transformers"] = paired_ratio(hf[HF_NAME], hf["R=1"])
            for r in s.loops:
                g = groups[(r, batch, context)]
                base, plt = g["R=1"], g[f"PLT-{r} single-pass"]
                seq, van = g[f"PLT-{r} sequential"], g[f"vanilla-{r}"]
                entry[f"PLT{r}/R1_latency"] = paired_ratio(plt, base)
                entry[f"PLT{r}/vanilla{r}_latency"] = paired_ratio(plt, van)
                entry[f"PLT{r}/sequential{r}_latency"] = paired_ratio(plt, seq)
                entry[f"PLT{r}/R1_kv"] = plt["kv_bytes"] / base["kv_bytes"]
                entry[f"PLT{r}_kv_bound"] = 1 + (r - 1) * (s.window + 1) / context + 0.01
                entry[f"vanilla{r}/R1_kv"] = van["kv_bytes"] / base["kv_bytes"]
            out.append(entry)
    return out


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Decode benchmark on {m.get('gpu') or m.get('cpu')} ({m['device']}, {m['threads']} threads), "
        f"{m['date']}; matmul {m['matmul_flops'] / 1e9:.0f} GFLOP/s, read bandwidth "
        f"{m['read_bandwidth'] / 1e9:.1f} GB/s",
        "",
    ]
    lines.append(
        f"{'configuration':<36}{'batch':>6}{'ctx':>6}{'ms/step':>10}{'tok/s':>9}{'KV MiB':>9}{'% bw floor':>11}"
    )
    for r in report["results"]:
        lines.append(
            f"{r['config']:<36}{r['batch']:>6}{r['context']:>6}{r['latency_s'] * 1e3:>10.2f}"
            f"{r['tokens_per_s']:>9.1f}{r['kv_bytes'] / 2**20:>9.1f}"
            f"{100 * r['fraction_of_bandwidth_floor']:>10.0f}%"
        )
    lines.append("")
    for e in report["ratios"]:
        head = f"batch {e['batch']}, context {e['context']}:"
        parts = []
        if "R1_engine_speedup_over_transformers" in e:
            parts.append(f"engine R=1 is {e['R1_engine_speedup_over_transformers']:.2f}x transformers")
        for key, val in e.items():
            if "/" in key:
                parts.append(f"{key} {val:.3f}")
        lines.append(head + " " + "; ".join(parts))
    return "\n".join(lines)
