"""`loopcoder study`: the depth probe and the code model at several loop counts, in one report."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from loopcoder.commands.options import add_threads_argument, int_list
from loopcoder.utils.errors import LoopcoderError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default="tiny",
        help="tiny (minutes on a CPU: `make demo`), full (tiny plus the R = 3 "
        "controls and five seeds of the depth probe) or small (one GPU, ~1 h)",
    )
    p.add_argument("--out", default="runs/study", help="study directory (re-running skips finished stages)")
    p.add_argument("--source", default=None, help="code corpus for `data build` (default: the stdlib sources)")
    p.add_argument("--loops", type=int_list, default=None, help="the code model's loop counts (R=1 always included)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    from loopcoder.study import Study, get_preset  # here: the study imports torch (fast --help)

    preset = get_preset(args.preset, source=args.source, loops=args.loops, device=args.device)
    apply_study_threads(preset, args.threads)
    if args.source and args.source != "stdlib" and not args.source.startswith("hf:") and not Path(args.source).exists():
        raise LoopcoderError(f"--source {args.source!r} does not exist")
    print(
        f"loop-count study, preset {preset.name}: R = {', '.join(map(str, preset.loops))} -> {args.out}",
        file=sys.stderr,
    )
    report = Study(preset, args.out).run()
    print(f"\nreport: {report}")
    return 0


def apply_study_threads(preset, threads: int | None) -> None:
    """`--threads N` for every stage: training (the preset's `train.threads`) and what runs in this process
    (evaluation, diagnostics, timing). Without it, training keeps the preset's setting."""
    from loopcoder.utils.runtime import apply_threads

    apply_threads(threads)
    if threads is not None:  # the presets are TrainConfig objects now, no longer mappings of dotted keys
        for cfg in (preset.pretrain, preset.sft):
            cfg.train = replace(cfg.train, threads=threads)
