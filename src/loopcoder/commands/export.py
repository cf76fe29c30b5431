"""`loopcoder export`: a model directory that loads in plain transformers (`trust_remote_code=True`).

What it writes is checked first (`loading.verify_model_dir`): weights against their recorded checksums,
a strict load, finite weights, a forward pass, and the tokenizer; a broken model is one line, exit 2,
and nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import tempfile
from pathlib import Path

from loopcoder.commands.options import add_tokenizer_check_argument
from loopcoder.utils.errors import LoopcoderError


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
    p.add_argument(
        "--merge",
        action="store_true",
        help="--model is a LoRA adapter (a `sft --lora` run or checkpoint): write its base with the adapter "
        "merged in, a plain model directory",
    )


def run(args: argparse.Namespace) -> int:
    from loopcoder.model import lora  # here: they import torch (fast --help)
    from loopcoder.model.checkpoint import write_merged
    from loopcoder.model.export import describe, export, left_out
    from loopcoder.model.identity import tokenizer_files_dir
    from loopcoder.model.loading import verify_model_dir
    from loopcoder.training.checkpoints import resolve_model_dir

    src = resolve_model_dir(args.model)
    merge = args.merge and lora.is_adapter_dir(src)
    if args.merge and not merge:
        print(f"--merge: {src} is a full model (no LoRA adapter): exported as it is", file=sys.stderr)
    if merge and args.in_place:
        raise LoopcoderError("--merge writes a new model directory: give --out DIR, not --in-place")
    with contextlib.ExitStack() as stack:
        if merge:  # the merged model beside the output (its weights can be large), then exported like any other
            parent = Path(args.out).resolve().parent
            parent.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=".merge-", dir=parent))
            src = write_merged(src, Path(tmp) / "merged")
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
        skipped = [] if args.in_place else left_out(src)
    info = describe(out)
    print(f"{info['directory']}: {', '.join(info['files'])}; auto_map {', '.join(info['auto_map'])}")
    if skipped:
        print(f"left out (not part of a model): {', '.join(skipped)}", file=sys.stderr)
    print(
        "load it without loopcoder: AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and "
        "AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)",
        file=sys.stderr,
    )
    return 0
