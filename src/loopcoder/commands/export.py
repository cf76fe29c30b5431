"""`loopcoder export`: a model directory that loads in plain transformers (`trust_remote_code=True`).

What it writes is checked first (`runtime.verify_model_dir`): weights against their recorded checksums,
a strict load, finite weights, a forward pass, and the tokenizer; a broken model is one line, exit 2,
and nothing is written.
"""

from __future__ import annotations

import argparse
import functools
import sys

from loopcoder.commands.options import add_tokenizer_check_argument
from loopcoder.errors import LoopcoderError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="model directory (loopcoder's, or the released layout with only weights and config) "
        "or a training run directory (its latest checkpoint)",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="write a copy with the remote-code files here (must be new or empty)")
    where.add_argument(
        "--in-place",
        action="store_true",
        help="add the remote-code files and auto_map to --model itself (no copy of the weights)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing model directory --out (atomically)")
    p.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="export a model that has no tokenizer files (its users must bring the tokenizer)",
    )
    add_tokenizer_check_argument(p)


def run(args: argparse.Namespace) -> int:
    from loopcoder.export import describe, export, left_out  # here: they import torch (fast --help)
    from loopcoder.identity import tokenizer_files_dir
    from loopcoder.runtime import verify_model_dir
    from loopcoder.training.checkpoints import resolve_model_dir

    src = resolve_model_dir(args.model)
    has_tokenizer = tokenizer_files_dir(src) == src
    if not has_tokenizer and not args.no_tokenizer:
        raise LoopcoderError(
            f"{str(src)!r} has no tokenizer (tokenizer.json): an export without one cannot encode a prompt; "
            "copy the model's tokenizer files into it, or pass --no-tokenizer"
        )
    verify = functools.partial(
        verify_model_dir, require_tokenizer=has_tokenizer, allow_tokenizer_mismatch=args.allow_tokenizer_mismatch
    )
    out = export(src, None if args.in_place else args.out, in_place=args.in_place, force=args.force, verify=verify)
    info = describe(out)
    print(f"{info['directory']}: {', '.join(info['files'])}; auto_map {', '.join(info['auto_map'])}")
    if not args.in_place and (skipped := left_out(src)):
        print(f"left out (not part of a model): {', '.join(skipped)}", file=sys.stderr)
    print(
        "load it without loopcoder: AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and "
        "AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)",
        file=sys.stderr,
    )
    return 0
