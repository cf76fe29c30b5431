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
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from loopcoder.config import PLTConfig


@dataclass
class DecodeBenchSettings:
    hidden_size: int = 1024
    num_layers: int = 8
    num_heads: int = 16
    num_kv_heads: int = 4
    head_dim: int = 64
    intermediate_size: int = 2816
    vocab_size: int = 32000
    window: int = 64
    loops: tuple[int, ...] = (2, 3, 4)
    batches: tuple[int, ...] = (1, 32)
    contexts: tuple[int, ...] = (512, 2048)
    steps: int = 10
    warmup: int = 3
    device: str = "cpu"
    dtype: str = "float32"
    include_transformers: bool = True
    cuda_graphs: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def model_config(self, loops: int, arch: str = "plt") -> PLTConfig:
        return PLTConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                         intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                         num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                         head_dim=self.head_dim, max_position_embeddings=max(self.contexts) + 64,
                         plt_num_loops=loops, plt_window_size=[self.window, 0], loop_architecture=arch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_machine(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Peak-ish matmul rate (FLOP/s) and memory read bandwidth (bytes/s) of this device."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(4):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3 / min(times[1:])
    del a, b
    big = torch.ones(256 * 2**20 // 4 if device.type == "cpu" else 2**30 // 4, device=device)
    times = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        big.sum()
        _sync(device)
        times.append(time.perf_counter() - t0)
    bandwidth = big.numel() * 4 / min(times[1:])
    return {"matmul_flops": flops, "read_bandwidth": bandwidth}


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


def _fill(engine: Any, batch: int, context: int, gen: torch.Generator) -> None:
    """Pretend `batch` sequences of `context` tokens were prefilled: random K/V and states."""
    c = engine.cache
    for t in (c.k, c.v, c.rk, c.rv, c.states):
        if t.numel():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))
    w1 = c.ring_pos.shape[1]
    pos = torch.arange(context - w1, context, device=c.ring_pos.device)
    c.ring_pos[:batch, pos % w1] = pos
    c.lengths[:batch] = context


def time_engine(model: Any, mode: str, batch: int, context: int, s: DecodeBenchSettings) -> dict[str, Any]:
    from loopcoder.engine import Engine

    device = next(model.parameters()).device
    engine = Engine(model, max_batch=batch, max_seq_len=context + s.warmup + s.steps + 2, mode=mode,
                    cuda_graphs=s.cuda_graphs and device.type == "cuda")
    _fill(engine, batch, context, torch.Generator().manual_seed(s.seed))
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    times = []
    with torch.inference_mode():
        for i in range(s.warmup + s.steps):
            _sync(device)
            t0 = time.perf_counter()
            logits = engine.decode_step(tokens, batch)
            tokens = logits.argmax(-1)
            _sync(device)
            if i >= s.warmup:
                times.append(time.perf_counter() - t0)
    live_kv = model.config.kv_cache_bytes(context, batch, dtype_bytes=next(model.parameters()).element_size())
    return {"latency_s": statistics.median(times), "kv_bytes": live_kv, "kv_allocated_bytes": engine.kv_bytes()}


def time_transformers(s: DecodeBenchSettings, batch: int, context: int, device: torch.device,
                      dtype: torch.dtype) -> dict[str, Any]:
    """`LlamaForCausalLM.generate` at the R = 1 shape, per-token latency from a logits processor's clock."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    cfg = LlamaConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                      num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                      num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim,
                      max_position_embeddings=max(s.contexts) + 64)
    torch.manual_seed(s.seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype=dtype).eval()
    gen = torch.Generator().manual_seed(s.seed)
    cache = DynamicCache(config=cfg)
    for layer in range(s.num_layers):
        shape = (batch, s.num_kv_heads, context, s.head_dim)
        cache.update(torch.randn(shape, generator=gen).to(device, dtype), torch.randn(shape, generator=gen).to(
            device, dtype), layer)

    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            _sync(device)
            stamps.append(time.perf_counter())
            return scores

    ids = torch.randint(0, s.vocab_size, (batch, context + 1), device=device)
    n = s.warmup + s.steps + 1
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, logits_processor=LogitsProcessorList([Clock()]),
                       pad_token_id=0)
    diffs = [b - a for a, b in itertools.pairwise(stamps)][s.warmup:]
    del model, cache
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    return {"latency_s": statistics.median(diffs), "kv_bytes": s.model_config(1).kv_cache_bytes(context, batch,
                                                                                                dtype_bytes)}


def configurations(s: DecodeBenchSettings) -> list[tuple[str, str, int, str]]:
    """(name, architecture, R, mode) of every engine configuration, in table order."""
    rows = [("R=1", "plt", 1, "parallel")]
    rows += [(f"PLT-{r} single-pass", "plt", r, "parallel") for r in s.loops]
    rows += [(f"PLT-{r} sequential", "plt", r, "sequential") for r in s.loops]
    rows += [(f"vanilla-{r}", "vanilla", r, "sequential") for r in s.loops]
    return rows


def run_decode_bench(s: DecodeBenchSettings, log: Any = sys.stderr) -> dict[str, Any]:
    from loopcoder.model import PLTForCausalLM
    from loopcoder.runtime import pick_device, pick_dtype

    device = pick_device(s.device)
    dtype = pick_dtype(s.dtype, device)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    machine = measure_machine(device, dtype)
    results: list[dict[str, Any]] = []
    configs = configurations(s)
    total = len(configs) * len(s.batches) * len(s.contexts) + (
        len(s.batches) * len(s.contexts) if s.include_transformers else 0)
    done, start = 0, time.perf_counter()

    def progress(name: str) -> None:
        nonlocal done
        done += 1
        el = time.perf_counter() - start
        print(f"  [{done}/{total}] {name}  elapsed {el:.0f}s  eta {el / done * (total - done):.0f}s", file=log,
              flush=True)

    for name, arch, R, mode in configs:
        torch.manual_seed(s.seed)
        cfg = s.model_config(R, arch)
        with torch.device(device):  # initialise where it runs: a 1B model on CPU would take minutes
            model = PLTForCausalLM(cfg).to(dtype=dtype).eval()
        for batch in s.batches:
            for context in s.contexts:
                row = {"config": name, "architecture": arch, "loops": R, "mode": mode, "batch": batch,
                       "context": context, **time_engine(model, mode, batch, context, s)}
                row.update(_step_cost(cfg, mode, batch, context, dtype_bytes))
                results.append(row)
                progress(f"{name} batch={batch} context={context}: {row['latency_s'] * 1e3:.1f} ms")
                gc.collect()
        del model
        gc.collect()
    if s.include_transformers:
        cfg = s.model_config(1)
        for batch in s.batches:
            for context in s.contexts:
                row = {"config": "transformers generate (R=1 shape)", "architecture": "llama", "loops": 1,
                       "mode": "hf", "batch": batch, "context": context,
                       **time_transformers(s, batch, context, device, dtype)}
                row.update(_step_cost(cfg, "parallel", batch, context, dtype_bytes))
                results.append(row)
                progress(f"transformers batch={batch} context={context}: {row['latency_s'] * 1e3:.1f} ms")
                gc.collect()
    for row in results:
        floor = row["bytes"] / machine["read_bandwidth"]
        row["bandwidth_floor_s"] = floor
        row["fraction_of_bandwidth_floor"] = floor / row["latency_s"]
        row["compute_floor_s"] = row["flops"] / machine["matmul_flops"]
        row["tokens_per_s"] = row["batch"] / row["latency_s"]
    return {"settings": asdict(s), "machine": {**machine, **machine_info(device)}, "results": results,
            "ratios": ratios(results, s)}


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device),
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = _cpu_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ratios(results: list[dict[str, Any]], s: DecodeBenchSettings) -> list[dict[str, Any]]:
    """Per (batch, context): latency and KV ratios against the non-looped model and vanilla."""
    def get(name: str, batch: int, context: int) -> dict[str, Any] | None:
        return next((r for r in results if r["config"] == name and r["batch"] == batch
                     and r["context"] == context), None)

    out = []
    for batch in s.batches:
        for context in s.contexts:
            base = get("R=1", batch, context)
            hf = get("transformers generate (R=1 shape)", batch, context)
            entry: dict[str, Any] = {"batch": batch, "context": context}
            if hf is not None:
                entry["R1_engine_speedup_over_transformers"] = hf["latency_s"] / base["latency_s"]
            for r in s.loops:
                plt, seq = get(f"PLT-{r} single-pass", batch, context), get(f"PLT-{r} sequential", batch, context)
                van = get(f"vanilla-{r}", batch, context)
                entry[f"PLT{r}/R1_latency"] = plt["latency_s"] / base["latency_s"]
                entry[f"PLT{r}/vanilla{r}_latency"] = plt["latency_s"] / van["latency_s"]
                entry[f"PLT{r}/sequential{r}_latency"] = plt["latency_s"] / seq["latency_s"]
                entry[f"PLT{r}/R1_kv"] = plt["kv_bytes"] / base["kv_bytes"]
                entry[f"PLT{r}_kv_bound"] = 1 + (r - 1) * (s.window + 1) / context + 0.01
                entry[f"vanilla{r}/R1_kv"] = van["kv_bytes"] / base["kv_bytes"]
            out.append(entry)
    return out


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Decode benchmark on {m.get('gpu') or m.get('cpu')} ({m['device']}, {m['threads']} threads), "
             f"{m['date']}; matmul {m['matmul_flops'] / 1e9:.0f} GFLOP/s, read bandwidth "
             f"{m['read_bandwidth'] / 1e9:.1f} GB/s", ""]
    lines.append(f"{'configuration':<36}{'batch':>6}{'ctx':>6}{'ms/step':>10}{'tok/s':>9}{'KV MiB':>9}"
                 f"{'% bw floor':>11}")
    for r in report["results"]:
        lines.append(f"{r['config']:<36}{r['batch']:>6}{r['context']:>6}{r['latency_s'] * 1e3:>10.2f}"
                     f"{r['tokens_per_s']:>9.1f}{r['kv_bytes'] / 2**20:>9.1f}"
                     f"{100 * r['fraction_of_bandwidth_floor']:>10.0f}%")
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


def write_json(report: dict[str, Any], path: str) -> None:
    from loopcoder.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(report, indent=2))
