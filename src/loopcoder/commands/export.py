"""`loopcoder export`: a model directory that loads in plain transformers (`trust_remote_code=True`)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="model directory (loopcoder's, or the released layout with only weights and config) "
        "or a training run directory (its latest checkpoint)",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="write a copy with the remote-code files here (replaced atomically)")
    where.add_argument(
        "--in-place",
        action="store_true",
        help="add the remote-code files and auto_map to --model itself (no copy of the weights)",
    )


def run(args: argparse.Namespace) -> int:
    from loopcoder.export import describe, export  # here: they import torch (fast --help)
    from loopcoder.training.checkpoints import resolve_model_dir

    src = resolve_model_dir(args.model)
    out = export(src, None if args.in_place else args.out, in_place=args.in_place)
    info = describe(out)
    print(f"{info['directory']}: {', '.join(info['files'])}; auto_map {', '.join(info['auto_map'])}")
    print(
        "load it without loopcoder: AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)", file=sys.stderr
    )
    return 0
