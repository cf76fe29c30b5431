"""`loopcoder export`: a model directory that loads in plain transformers (`trust_remote_code=True`)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from loopcoder import lora
from loopcoder.checkpoint import write_merged
from loopcoder.errors import LoopcoderError
from loopcoder.export import describe, export
from loopcoder.training.checkpoints import resolve_model_dir


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
    p.add_argument(
        "--merge",
        action="store_true",
        help="--model is a LoRA adapter (a `sft --lora` run or checkpoint): write its base with the adapter "
        "merged in, a plain model directory",
    )


def run(args: argparse.Namespace) -> int:
    src = resolve_model_dir(args.model)
    if args.merge and lora.is_adapter_dir(src):
        if args.in_place:
            raise LoopcoderError("--merge writes a new model directory: give --out DIR, not --in-place")
        parent = Path(args.out).resolve().parent  # beside the output: the merged weights can be large
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".merge-", dir=parent) as tmp:
            out = export(write_merged(src, Path(tmp) / "merged"), args.out)
    else:
        if args.merge:
            print(f"--merge: {src} is a full model (no LoRA adapter): exported as it is", file=sys.stderr)
        out = export(src, None if args.in_place else args.out, in_place=args.in_place)
    info = describe(out)
    print(f"{info['directory']}: {', '.join(info['files'])}; auto_map {', '.join(info['auto_map'])}")
    print(
        "load it without loopcoder: AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)", file=sys.stderr
    )
    return 0
