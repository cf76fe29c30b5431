"""`loopcoder train`: pretrain from scratch on packed shards (docs/training.md).

loopcoder train --config tiny --data data/stdlib --loops 2 --out runs/r2
loopcoder train --config tiny data.dir=data/stdlib model.loops=2 out=runs/r2   # the same, as keys
loopcoder train --config my.yaml --resume
torchrun --nproc_per_node 8 -m loopcoder train --config small
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loopcoder.commands.options import MODEL_FLAGS, TRAINING_FLAGS, add_config_flags, config_overrides
from loopcoder.training.config import load_config, lora_overrides, parse_override
from loopcoder.utils.errors import LoopcoderError


def add_arguments(p: argparse.ArgumentParser, stage: str = "pretrain") -> None:
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE_OR_PRESET",
        help="a YAML config (may say `base: PRESET`) or a preset name (tiny, small, 7b)",
    )
    p.add_argument("--preset", default=None, metavar="NAME", help="the same as --config NAME")
    if stage == "sft":
        p.add_argument(
            "--init",
            default=None,
            metavar="CHECKPOINT",
            help="the model to tune: a model directory or a pretraining run directory (its newest checkpoint)",
        )
        p.add_argument(
            "--lora",
            default=None,
            metavar="SPEC",
            help="train a LoRA adapter instead of every weight, e.g. r=16,alpha=32,dropout=0.05,targets=q_proj,v_proj "
            "(the same as lora.r=16 ...; defaults: alpha 2r, dropout 0.05, targets q_proj,v_proj; all-linear for all)",
        )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in --out (without --config: with the config saved there)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch: the same as train.threads=N (default: $OMP_NUM_THREADS, else the "
        "cores the load average shows free, at least 1; see docs/benchmarks.md)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="any other config key, e.g. optim.weight_decay=0.05 eval.every=50 (--print-config lists them; "
        "unknown keys are errors)",
    )
    # SFT takes its model's shape from --init, so only pretraining has the shape flags
    add_config_flags(p, TRAINING_FLAGS if stage == "sft" else (*MODEL_FLAGS, *TRAINING_FLAGS))


def run(args: argparse.Namespace) -> int:
    return run_stage(args, "pretrain")


def run_stage(args: argparse.Namespace, stage: str) -> int:
    if args.config and args.preset:
        raise LoopcoderError("give --config or --preset, not both")
    source = args.config or args.preset
    flags = config_overrides(args, args.overrides)  # --loops 2 is model.loops=2
    if source is None and args.resume:  # continue a run with the config it saved
        out = flags.get("out") or dict(parse_override(o) for o in args.overrides).get("out")
        saved = Path(str(out)) / "config.yaml" if out else None
        if saved is None or not saved.is_file():
            raise LoopcoderError("--resume without --config needs --out RUN_DIR of a run that saved config.yaml")
        source = str(saved)
    extra = {**flags, **({"init": args.init} if getattr(args, "init", None) else {})}
    overrides = [*args.overrides, *([f"train.threads={args.threads}"] if args.threads is not None else [])]
    if getattr(args, "lora", None) is not None:
        overrides += lora_overrides(args.lora)
    cfg = load_config(source, overrides, stage=stage, extra=extra)
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return 0
    from loopcoder.training.run import train  # here: it imports torch (fast --help)

    train(cfg, resume=args.resume)
    return 0
