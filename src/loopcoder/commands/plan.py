"""`loopcoder plan`: parameters, FLOPs per token, memory and the largest micro-batch that fits.

loopcoder plan --preset 7b --memory 80GiB --gpus 8
loopcoder plan --preset 7b --loops 2
loopcoder plan --config tiny model.loops=3 --json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from loopcoder.commands.options import MODEL_FLAGS, add_config_flags, config_overrides
from loopcoder.training.config import ConfigKeyError, load_config
from loopcoder.utils.errors import LoopcoderError

# Decimal units (kB, MB, GB, TB: powers of 1000) and binary ones (KiB, ..., and K, M, G, T, Ki, ..., as
# Slurm, docker and `free -g` read them: powers of 1024).
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
_UNITS.update({f"{p}{suffix}": 2 ** (10 * (i + 1)) for i, p in enumerate("kmgt") for suffix in ("", "i", "ib")})


def parse_bytes(text: str) -> float:
    """'80GiB', '80G' (GiB), '141GB' (decimal), '512MiB' -> bytes. A bare number is refused: bytes or GiB?"""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if m and not m.group(2):
        raise LoopcoderError(
            f"--memory {text!r} has no unit: write {m.group(1)}GiB (or {m.group(1)}G, binary) or "
            f"{m.group(1)}GB (decimal)"
        )
    if not m or m.group(2).lower() not in _UNITS:
        raise LoopcoderError(f"--memory {text!r}: expected a size such as 80GiB, 80G, 141GB or 512MiB")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="a preset (tiny, small, 7b; default: tiny)")
    p.add_argument("--config", default=None, help="a YAML config or preset name")
    p.add_argument(
        "--memory",
        default="80GiB",
        help="memory per GPU with a unit: 80GiB or 80G (binary), 141GB (decimal), 512MiB (default 80GiB)",
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs the model states are sharded over (FSDP)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the config's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.rope_theta=5e5")
    add_config_flags(p, MODEL_FLAGS)


def run(args: argparse.Namespace) -> int:
    from loopcoder.training.flops import fit, plan  # here: they import torch (fast --help)
    from loopcoder.training.run import model_config

    if args.config and args.preset:
        raise LoopcoderError("give --config or --preset, not both")
    if args.gpus < 1:
        raise LoopcoderError(f"--gpus {args.gpus} must be >= 1")
    cfg = load_config(
        args.config or args.preset or "tiny", args.overrides, extra=config_overrides(args, args.overrides)
    )
    vocab, seq_len, notes = _data_shape(cfg)
    seq_len = args.seq_len or seq_len
    if seq_len < 1:
        raise LoopcoderError(f"--seq-len {seq_len} must be >= 1")
    mc = model_config(cfg, vocab, seq_len)
    memory = parse_bytes(args.memory)
    report: dict[str, Any] = {"config": cfg.model.__dict__, "notes": notes}
    for ck in (True, False):
        report["checkpointing" if ck else "no_checkpointing"] = plan(
            mc,
            seq_len,
            memory,
            args.gpus,
            checkpointing=ck,
            reshard_after_forward=cfg.distributed.reshard_after_forward,
        )
    try:
        micro = cfg.accumulation(args.gpus)[0]
    except ConfigKeyError:  # the global batch does not split over these GPUs: no micro-batch to check
        micro = None
    report["fit"] = fit(
        mc,
        seq_len,
        memory,
        args.gpus,
        reshard_after_forward=cfg.distributed.reshard_after_forward,
        checkpointing=cfg.train.activation_checkpointing,
        micro_batch=micro,
    )
    tokens = cfg.train.steps * cfg.train.global_batch_size * seq_len
    report["run"] = {
        "steps": cfg.train.steps,
        "global_batch_size": cfg.train.global_batch_size,
        "tokens": tokens,
        "flops": tokens * report["checkpointing"]["flops_per_token"]["total"],
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_plan(report, mc))
    return 0


def _data_shape(cfg: Any) -> tuple[int, int, list[str]]:
    """(vocabulary, sequence length, notes) from the config, the data directory, or assumptions."""
    from loopcoder.data.shards import read_index  # imports torch

    notes = []

    vocab, seq_len = cfg.model.vocab_size, cfg.data.seq_len
    if (vocab is None or seq_len is None) and cfg.data.dir and (Path(cfg.data.dir) / "index.json").is_file():
        index = read_index(cfg.data.dir)
        vocab = vocab or index["vocab_size"]
        seq_len = seq_len or index["seq_len"]
    if vocab is None:
        vocab = 4096
        notes.append("vocabulary assumed 4096 (set model.vocab_size or data.dir)")
    if seq_len is None:
        seq_len = 512
        notes.append("sequence length assumed 512 (set data.seq_len or --seq-len)")
    return vocab, seq_len, notes


def _gib(x: float) -> str:
    return f"{x / 2**30:,.2f} GiB"


def _size(x: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:.0f} B"


def format_plan(report: dict[str, Any], mc: Any) -> str:
    ck, no = report["checkpointing"], report["no_checkpointing"]
    p = ck["params"]
    R, T = mc.plt_num_loops, ck["seq_len"]
    f = ck["flops_per_token"]
    kv = ck["kv_cache_bytes"]
    act = ck["activation_bytes_per_token"]
    sharding = f"model states sharded by FSDP over {ck['gpus']} GPUs" if ck["gpus"] > 1 else "one GPU"
    lines = [
        f"model       R={R} ({mc.loop_architecture}), {mc.num_hidden_layers} layers x {mc.hidden_size}, heads "
        f"{mc.num_attention_heads}/{mc.num_key_value_heads} x {mc.head_dim}, MLP {mc.intermediate_size}, "
        f"vocab {mc.vocab_size}, window {mc.window}, T={T}",
        f"parameters  {p['total']:,} total; {p['non_embedding']:,} non-embedding; embedding {p['embedding']:,}, "
        f"lm_head {p['lm_head']:,}",
        f"FLOPs/token {f['total'] / 1e9:,.3f} GFLOP training (matmuls {f['matmul'] / 1e9:,.3f} + attention "
        f"{f['attention'] / 1e9:,.3f}) = {f['total'] / ck['flops_per_token_r1']:.2f}x the R=1 model",
        f"run         {report['run']['steps']:,} steps x {report['run']['global_batch_size']} x {T} = "
        f"{report['run']['tokens']:,} tokens, {report['run']['flops']:.3e} FLOPs",
        "",
        f"memory per GPU ({_gib(ck['memory_bytes'])}, {sharding})",
        f"  weights + grads + Adam (fp32, 16 B/param) / {ck['gpus']}   {_gib(ck['model_state_bytes_per_gpu'])}",
        f"  gathered bf16 weights (FSDP)                 {_gib(ck['gathered_weight_bytes'])}",
        f"  runtime overhead (assumed)                   {_gib(ck['overhead_bytes'])}",
        f"  activations per token, no checkpointing      {act['no_checkpointing']['total'] / 2**10:,.1f} KiB",
        f"  activations per token, per-layer checkpoints {act['checkpointing']['total'] / 2**10:,.1f} KiB",
        f"  largest micro-batch (sequences of {T})       {ck['max_micro_batch']} with checkpointing, "
        f"{no['max_micro_batch']} without",
    ]
    if ck["gpus"] > 1:
        lines.append(
            f"  FSDP all-gathers per layer per step          {ck['fsdp_all_gathers_per_layer_per_step']} "
            f"({_gib(ck['fsdp_all_gather_bytes_per_step'])} received per GPU per step)"
        )
    verdict = report["fit"]
    lines += ["", f"verdict: {verdict['verdict']}"]
    lines += [f"  - {a}" for a in verdict["advice"]]
    lines += [
        "",
        f"KV cache at T={T} (bf16, per sequence): PLT {_size(kv['plt'])} (+{kv['plt'] / kv['r1'] - 1:.1%} over "
        f"R=1), vanilla looped {_size(kv['vanilla'])} ({kv['vanilla'] / kv['r1']:.0f}x R=1)",
    ]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
