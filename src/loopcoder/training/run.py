"""Entry points: `pretrain(config)` and `sft(config, init)` (both `train(config)` underneath).

The two stages differ only in where batches come from (`data.pretrain_source`: packed shards;
`data.sft_source`: chat JSONL with loss masks) and where the weights start (a seeded random init;
the `--init` checkpoint). Both work in one process or under torchrun.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from loopcoder.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from loopcoder.model import lora
from loopcoder.model.checkpoint import load_model
from loopcoder.model.config import PLTConfig
from loopcoder.model.identity import (
    OVERRIDE_KEY,
    check_same_tokenizer,
    model_tokenizer_fingerprint,
    tokenizer_fingerprint,
)
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.training import checkpoints as ckpt
from loopcoder.training import distributed as D
from loopcoder.training.config import TrainConfig, load_config, parse_override, set_key
from loopcoder.training.data import BatchSource, pretrain_source, sft_source
from loopcoder.training.flops import param_counts
from loopcoder.training.trainer import Trainer, TrainResult, seed_everything
from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.runtime import apply_threads, pick_dtype, quiet_libraries

# Keys a resumed run must share with its checkpoint (others, e.g. train.steps or eval.every, may change).
RESUME_FIXED = ("stage", "seed", "model", "data", "lora", "train.global_batch_size")
RESUME_FREE = {"data.allow_tokenizer_mismatch"}  # inside a fixed section, but a resumed run may change it


def model_config(cfg: TrainConfig, vocab_size: int, seq_len: int) -> PLTConfig:
    """The `PLTConfig` of `cfg.model` for a tokenizer of `vocab_size` tokens (our tokenizer's special ids)."""
    return cfg.model.plt_config(vocab_size, seq_len, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def _load_weights(path: Path) -> Any:
    return load_model(path, dtype=torch.float32).train()


def _lora_config(cfg: TrainConfig, base: Path | None = None) -> Any:
    """The run's LoRA settings as PEFT's config (checked), or None for full fine-tuning."""
    lo = cfg.lora
    if not lo.r:
        return None
    return lora.lora_config(lo.r, lo.alpha if lo.alpha is not None else 2 * lo.r, lo.dropout, lo.targets, base)


def _load_model(cfg: TrainConfig, start: Path | None, init_dir: Path | None) -> Any:
    """The model to train: a checkpoint to resume (a LoRA run's: its base with the adapter as saved), or the
    init model (with a new adapter for a LoRA run)."""
    if cfg.lora.r and start is not None:
        return lora.load_adapter(_load_weights(lora.base_dir(start)), start)
    model = _load_weights(start or init_dir)
    return lora.attach(model, _lora_config(cfg, init_dir)) if cfg.lora.r else model


def _check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = cfg.to_dict()
    if not isinstance(saved, dict):
        raise LoopcoderError(f"cannot resume: the checkpoint's config is {type(saved).__name__}, not a mapping")
    defaults = TrainConfig().to_dict()
    for key in RESUME_FIXED:
        a, b, d = saved, now, defaults
        for part in key.split("."):
            a, b, d = (a.get(part) if isinstance(a, dict) else None), b.get(part), d.get(part)
        a = d if a is None and isinstance(d, dict) else a  # a section added since the checkpoint: its defaults
        if isinstance(a, dict) and isinstance(b, dict):
            for free in RESUME_FREE:
                if free.startswith(key + "."):
                    a, b = {**a, free[len(key) + 1 :]: None}, {**b, free[len(key) + 1 :]: None}
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                diff = next(k for k in sorted({*a, *b}) if a.get(k) != b.get(k))
                key, a, b = f"{key}.{diff}", a.get(diff), b.get(diff)
            raise LoopcoderError(f"cannot resume: {key} is {a!r} in the checkpoint and {b!r} now")


def _say(env: D.DistEnv, cfg: TrainConfig, text: str) -> None:
    if env.is_main and cfg.logging.progress != "off":
        print(text, file=sys.stderr, flush=True)


def _start_point(cfg: TrainConfig, env: D.DistEnv, resume: bool) -> Path | None:
    """The checkpoint to resume from (decided on rank 0, the same everywhere)."""
    decision: tuple[str, str | None] = ("ok", None)
    if env.is_main:
        run_dir = Path(cfg.out)
        ckpt.remove_partial(run_dir)
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None and not resume:
            decision = (
                "error",
                f"{run_dir} already has checkpoints (latest {latest.name}): pass --resume to "
                "continue that run, or choose another out=DIR",
            )
        elif latest is not None:
            decision = ("ok", str(latest))
    kind, value = D.broadcast_object(decision, env)
    if kind == "error":
        raise LoopcoderError(value)
    return Path(value) if value else None


def train(cfg: TrainConfig, resume: bool = False, source: BatchSource | None = None) -> TrainResult:
    """Run (or, with `resume`, continue from the newest checkpoint in `cfg.out`) one training stage.
    `source`: batches from elsewhere than the stage's own (`data.dir` shards or chat JSONL), e.g. a
    synthetic task's rows (`permutation_source`); pretraining only."""
    cfg.validate()
    if source is not None and cfg.stage != "pretrain":
        raise LoopcoderError("a given batch source is for pretraining only (SFT reads chat JSONL)")
    quiet_libraries()  # transformers' per-save progress bars are noise in a training log
    env = D.setup(cfg)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        apply_threads(cfg.train.threads)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        _lora_config(cfg)  # a bad LoRA setting fails here, before anything is loaded
        if cfg.train.attention == "flex_attention" and env.device.type != "cuda":
            raise LoopcoderError(
                "train.attention=flex_attention needs a CUDA device (torch's flex_attention "
                "has no backward on CPU); use train.attention=sdpa"
            )
        start = _start_point(cfg, env, resume)
        state = ckpt.load_state(start) if start is not None else None
        if state is not None:
            _check_resumable(state["config"], cfg)
        init_dir = None
        if cfg.stage == "sft":  # a resumed SFT run starts from its own checkpoint, the init may be gone
            init_dir = start if start is not None else ckpt.resolve_model_dir(cfg.init)
        if source is None:
            log = sys.stderr if env.is_main and cfg.logging.progress != "off" else None
            source = pretrain_source(cfg, log) if cfg.stage == "pretrain" else sft_source(cfg, init_dir)
        _check_tokenizer(cfg, source, start or init_dir)
        seed_everything(cfg.seed)
        if start is not None or init_dir is not None:
            model = _load_model(cfg, start, init_dir)
        else:
            model = PLTForCausalLM(model_config(cfg, source.vocab_size, source.seq_len))
        model.config._attn_implementation = cfg.train.attention  # not saved: each run chooses its own
        if model.config.vocab_size < source.vocab_size:
            raise LoopcoderError(
                f"the model's vocabulary ({model.config.vocab_size}) is smaller than the "
                f"tokenizer's ({source.vocab_size})"
            )
        run_dir = Path(cfg.out)
        if env.is_main:
            atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        _say(env, cfg, _header(cfg, env, model, source, start))
        if state is not None and state["step"] >= cfg.train.steps and env.is_main:
            print(_finished(cfg, state["step"]), file=sys.stderr, flush=True)
        trainer = Trainer(cfg, model, source, env, state, run_dir)
        result = trainer.fit()
        if env.is_main:
            _write_summary(cfg, env, result, model.config)
        return result
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        D.teardown(env)


def _check_tokenizer(cfg: TrainConfig, source: BatchSource, model_dir: Path | None) -> None:
    """The weights a run starts from (a checkpoint to resume, SFT's init) must have been made with the
    tokenizer of the data it trains on: compared by fingerprint (`identity.py`), not by size."""
    if model_dir is None or source.tokenizer_dir is None:
        return
    expected, where = model_tokenizer_fingerprint(model_dir)
    given = tokenizer_fingerprint(source.tokenizer_dir)
    what = (
        "the data's tokenizer"
        if cfg.data.dir and Path(cfg.data.dir) in source.tokenizer_dir.parents
        else "the tokenizer"
    )
    check_same_tokenizer(
        expected,
        f"the model {where}",
        given,
        f"{what} {str(source.tokenizer_dir)!r}",
        OVERRIDE_KEY,
        cfg.data.allow_tokenizer_mismatch,
    )


def _write_summary(cfg: TrainConfig, env: D.DistEnv, result: TrainResult, mc: PLTConfig) -> None:
    summary = {
        "stage": cfg.stage,
        "step": result.step,
        "final_checkpoint": str(result.final_checkpoint),
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_bpb": result.val_bpb,
        "tokens": result.tokens,
        "train_s": round(result.train_s, 2),
        "loops": mc.plt_num_loops,
        "params": param_counts(mc).total,
        "world_size": env.world_size,
    }
    atomic_write_text(Path(cfg.out) / "summary.json", json.dumps(summary, indent=1) + "\n")
    _say(
        env,
        cfg,
        f"done: step {result.step}, train loss {_fmt(result.train_loss)}, val loss "
        f"{_fmt(result.val_loss)}, {_fmt(result.val_bpb)} bits/byte, {result.train_s:.0f} s; "
        f"final checkpoint {result.final_checkpoint}",
    )


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _finished(cfg: TrainConfig, step: int) -> str:
    """What `--resume` of a run that has reached `train.steps` says (it trains nothing)."""
    command = "train" if cfg.stage == "pretrain" else "sft"
    return (
        f"{cfg.out} is finished: its newest checkpoint is step {step} and train.steps={cfg.train.steps}, so "
        f"there is nothing left to train. To train further, give more steps: loopcoder {command} --resume "
        f"out={cfg.out} train.steps={max(2 * step, step + 1)} (the LR schedule follows the new length)"
    )


def _header(cfg: TrainConfig, env: D.DistEnv, model: Any, source: BatchSource, start: Path | None) -> str:
    mc = model.config
    p = param_counts(mc)
    micro, accum = cfg.accumulation(env.world_size)
    strategy = D.strategy(cfg, env)
    precision = "bf16" if pick_dtype(cfg.train.precision, env.device) is torch.bfloat16 else "fp32"
    where = f"resuming from {start}" if start else (f"from {cfg.init}" if cfg.stage == "sft" else "from scratch")
    return (
        f"{cfg.stage} {where} -> {cfg.out}\n"
        f"model: R={mc.plt_num_loops} ({mc.loop_architecture}), {mc.num_hidden_layers} layers x "
        f"{mc.hidden_size}, {p.total / 1e6:.2f}M parameters ({p.non_embedding / 1e6:.2f}M non-embedding), "
        f"vocab {mc.vocab_size}\n"
        f"batch: {cfg.train.global_batch_size} x {source.seq_len} tokens per step = {micro} per rank x {accum} "
        f"micro-steps x {env.world_size} rank(s); {cfg.train.steps} steps\n"
        f"device: {env.device}, {precision}, {strategy if strategy != 'none' else 'single process'}"
        f"{', activation checkpointing' if cfg.train.activation_checkpointing else ''}"
        f"{', compiled' if cfg.train.compile else ''}"
        f"{', flex_attention' if cfg.train.attention == 'flex_attention' else ''}"
        + (_lora_line(cfg, model) if cfg.lora.r else "")
    )


def _lora_line(cfg: TrainConfig, model: Any) -> str:
    trainable, total = lora.trainable_counts(model)
    config = model.peft_config["default"]
    return (
        f"\nLoRA: r={config.r}, alpha={config.lora_alpha:g}, dropout={config.lora_dropout:g} on "
        f"{', '.join(sorted(config.target_modules))} (shared by all loops); {trainable:,} trainable of "
        f"{total:,} parameters ({trainable / total:.2%}); base {config.base_model_name_or_path}"
    )


def prepare(
    config: TrainConfig | str | dict[str, Any] | None,
    overrides: list[str] | dict[str, Any] | None,
    stage: str,
    init: str | os.PathLike | None = None,
) -> TrainConfig:
    """A validated config for `stage` from a `TrainConfig` (copied), a preset name, a YAML path or a mapping."""
    if isinstance(config, TrainConfig):
        cfg = copy.deepcopy(config)
        cfg.stage = stage
        items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
        for key, value in items:
            set_key(cfg, key, value)
    else:
        extra = {} if init is None else {"init": str(init)}
        cfg = load_config(config, overrides, stage=stage, extra=extra)
    if init is not None:
        cfg.init = str(init)
    return cfg.validate()


def pretrain(
    config: TrainConfig | str | dict[str, Any] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    resume: bool = False,
    source: BatchSource | None = None,
) -> TrainResult:
    """Pretrain from scratch on packed shards (or on `source`'s rows). `config`: a `TrainConfig`, a preset
    name, a YAML path or a mapping of sections; `overrides`: ["model.loops=2", ...] or {"model.loops": 2}."""
    return train(prepare(config, overrides, "pretrain"), resume, source)


def sft(
    config: TrainConfig | str | dict[str, Any] | None = None,
    init: str | os.PathLike | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Instruction-tune `init` (a model directory, or a run directory: its newest checkpoint) with the
    same engine; only assistant tokens carry loss. A preset's `sft:` block applies."""
    return train(prepare(config, overrides, "sft", init), resume)
