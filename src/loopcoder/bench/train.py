"""Training benchmark: tokens/s of PLT R = 1, 2, 3 and transformers' `LlamaForCausalLM` (the R = 1
shape), one shape, measured in one run.

Every configuration runs the same optimizer step as the trainer: forward with the logits of the
positions that predict something, fp32 cross-entropy, backward, gradient clipping at 1.0, AdamW
(betas 0.9/0.95, weight decay 0.1). Batches are random token ids (a step's cost does not depend on
them). The configurations take turns, `rounds` times `steps` timed steps each after warm-up, so a
shared machine's load drifts over all of them alike; the median step time is reported.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from loopcoder.bench.common import llama_config, machine_info, sync
from loopcoder.bench.settings import TrainBenchSettings
from loopcoder.model.config import PLTConfig
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.training.flops import mfu, peak_flops, train_flops_per_token
from loopcoder.utils.runtime import pick_device, pick_dtype

LLAMA = "llama (transformers)"


def llama_model(s: TrainBenchSettings) -> Any:
    return LlamaForCausalLM(llama_config(s.model_config(1)))


class _Runner:
    """One configuration: its model (and the PLT config its FLOPs are counted on), optimizer, batch and
    the training step."""

    def __init__(
        self, name: str, loops: int, cfg: PLTConfig, model: Any, s: TrainBenchSettings, device: torch.device, bf16: bool
    ) -> None:
        self.name, self.loops, self.cfg = name, loops, cfg
        self.model = model.to(device).train()
        if s.activation_checkpointing:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda" or None
        )
        g = torch.Generator().manual_seed(s.seed)
        self.ids = torch.randint(0, s.vocab_size, (s.batch, s.seq_len), generator=g).to(device)
        self.keep = torch.arange(s.seq_len - 1, device=device)
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.times: list[float] = []

    def step(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        with self.autocast:
            logits = self.model(input_ids=self.ids, use_cache=False, logits_to_keep=self.keep).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), self.ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t0


def run_train_bench(s: TrainBenchSettings, log: TextIO | None = None) -> dict[str, Any]:
    log = log if log is not None else sys.stderr
    device = pick_device(s.device)
    bf16 = pick_dtype(s.dtype, device) == torch.bfloat16
    runners: list[_Runner] = []
    for R in s.loops:
        cfg = s.model_config(R)
        torch.manual_seed(s.seed)
        model = PLTForCausalLM(cfg)
        model.config._attn_implementation = s.attention
        runners.append(_Runner(f"PLT R={R}", R, cfg, model, s, device, bf16))
    if s.include_transformers:
        torch.manual_seed(s.seed)
        runners.append(_Runner(LLAMA, 1, s.model_config(1), llama_model(s), s, device, bf16))
    for r in runners:
        for _ in range(s.warmup):
            r.step()
    start = time.perf_counter()
    for k in range(s.rounds):
        for r in runners:
            r.times += [r.step() for _ in range(s.steps)]
        print(f"  round {k + 1}/{s.rounds}: elapsed {time.perf_counter() - start:.0f}s", file=log, flush=True)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    tokens = s.batch * s.seq_len
    results = []
    for r in runners:
        step_s = statistics.median(r.times)
        flops = train_flops_per_token(r.cfg, s.seq_len)["total"]
        tps = tokens / step_s
        results.append(
            {
                "config": r.name,
                "loops": r.loops,
                "step_s": step_s,
                "step_s_min": min(r.times),
                "tokens_per_s": tps,
                "flops_per_token": flops,
                "flops_per_s": flops * tps,
                "mfu": mfu(flops, tps, peak),
            }
        )
    del runners
    gc.collect()
    base = next(x for x in results if x["config"] == "PLT R=1")
    ratios = {f"R{x['loops']}/R1": x["tokens_per_s"] / base["tokens_per_s"] for x in results if x["config"] != LLAMA}
    llama = next((x for x in results if x["config"] == LLAMA), None)
    if llama is not None:
        ratios["R1/llama"] = base["tokens_per_s"] / llama["tokens_per_s"]
    info = machine_info(device)
    info["peak_flops"] = peak
    return {"settings": asdict(s), "machine": info, "results": results, "ratios": ratios}


def format_report(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"Training benchmark on {m.get('gpu') or m.get('cpu')} ({m['device']}, {m['threads']} threads), {m['date']}",
        f"shape: {s['num_layers']} layers x {s['hidden_size']}, heads {s['num_heads']}/{s['num_kv_heads']}, "
        f"MLP {s['intermediate_size']}, vocab {s['vocab_size']}, window {s['window']}, {s['attention']}; "
        f"batch {s['batch']} x "
        f"{s['seq_len']} tokens; median of {s['rounds']} x {s['steps']} steps",
        "",
        f"{'configuration':<22}{'ms/step':>10}{'tokens/s':>11}{'GFLOP/token':>13}{'GFLOP/s':>10}{'MFU':>8}",
    ]
    for r in report["results"]:
        util = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(
            f"{r['config']:<22}{r['step_s'] * 1e3:>10.1f}{r['tokens_per_s']:>11.0f}"
            f"{r['flops_per_token'] / 1e9:>13.4f}{r['flops_per_s'] / 1e9:>10.1f}{util:>8}"
        )
    lines.append("")
    lines.append("ratios (tokens/s): " + ", ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()))
    return "\n".join(lines)
