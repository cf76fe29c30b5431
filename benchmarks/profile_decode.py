"""Profile one decode configuration: where a step's time goes (torch.profiler, per op), and how many
host synchronisations it makes. For chasing a slow configuration that `loopcoder bench decode` shows.

    PYTHONPATH=src python3 benchmarks/profile_decode.py --device cuda --loops 2 --batch 1 --context 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loopcoder.bench.common import sync
from loopcoder.bench.decode import DecodeBenchSettings, EngineTimer, build_model
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.utils.runtime import pick_device, pick_dtype


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="a tiny shape (rehearsal)")
    ap.add_argument("--cuda-graphs", action="store_true")
    a = ap.parse_args()
    if a.small:
        shape = dict(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            intermediate_size=128,
            vocab_size=256,
        )
    elif a.device == "cpu":
        shape = {}  # `loopcoder bench decode`'s default CPU shape
    else:  # gpu_check.py's shape
        shape = dict(
            hidden_size=4096,
            num_layers=8,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            intermediate_size=11008,
            vocab_size=32000,
        )
    s = DecodeBenchSettings(
        **shape,
        contexts=(a.context,),
        batches=(a.batch,),
        steps=a.steps,
        rounds=1,
        warmup=10,
        device=a.device,
        dtype=a.dtype,
        cuda_graphs=a.cuda_graphs,
    )
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    models = {}
    for name, R, arch in (
        ("R=1", 1, "plt"),
        (f"PLT-{a.loops}", a.loops, "plt"),
        (f"vanilla-{a.loops}", a.loops, "vanilla"),
    ):
        models[name] = build_model(PLTForCausalLM, s.model_config(R, arch), device, dtype, s.seed)
    timers = {
        "R=1": EngineTimer(models["R=1"], "parallel", a.batch, a.context, s),
        f"PLT-{a.loops} single-pass": EngineTimer(models[f"PLT-{a.loops}"], "parallel", a.batch, a.context, s),
        f"vanilla-{a.loops}": EngineTimer(models[f"vanilla-{a.loops}"], "sequential", a.batch, a.context, s),
    }
    for name, t in timers.items():
        t.run(a.steps)
        print(
            f"{name:<24} median {statistics.median(t.times) * 1e3:8.2f} ms  min {min(t.times) * 1e3:8.2f} ms",
            flush=True,
        )
    target = timers[f"PLT-{a.loops} single-pass"]
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            target.run(1, keep=False)
        torch.cuda.set_sync_debug_mode(0)
        print(f"host synchronisations in one PLT step: {len(caught)}")
        for w in caught[:5]:
            print("  ", str(w.message)[:200])
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    for name in (f"PLT-{a.loops} single-pass", "R=1"):
        with torch.profiler.profile(activities=acts) as prof:
            t0 = time.perf_counter()
            timers[name].run(3, keep=False)
            sync(device)
        print(f"\n== {name}: 3 steps in {(time.perf_counter() - t0) * 1e3:.1f} ms")
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=48))
        if device.type == "cuda":
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48))


if __name__ == "__main__":
    main()
