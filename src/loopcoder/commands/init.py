"""`loopcoder init`: write a randomly initialised PLT model directory (released layout) with a tokenizer.

The tokenizer is a byte-level BPE (the project's, with the chat template) trained on this package's own
source code, so that `init` followed by `generate` or `serve` works without any data; `--tokenizer DIR`
takes an existing one instead (a data directory's, to train the model on that data). Either way the
model's vocabulary is the tokenizer's size.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import loopcoder
from loopcoder.atomic import atomic_directory
from loopcoder.commands.options import MODEL_FLAGS, add_config_flags
from loopcoder.errors import LoopcoderError

# the model's shape when no flag says otherwise
SHAPE = dict(
    loops=2,
    hidden_size=256,
    layers=4,
    heads=4,
    kv_heads=2,
    intermediate_size=None,
    window=64,
    max_positions=4096,
    architecture="plt",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        help="directory to write (config.json, model.safetensors, tokenizer); must be new or empty",
    )
    p.add_argument("--force", action="store_true", help="replace an existing model directory --out (atomically)")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="use this tokenizer (a tokenizer or data directory) instead of training one",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="of the trained tokenizer, and so of the model (ignored with --tokenizer)",
    )
    add_config_flags(p, MODEL_FLAGS, defaults=SHAPE)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from loopcoder.checkpoint import write_random_model  # here: they import torch (fast --help)
    from loopcoder.data import tokenizer as T

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LoopcoderError(f"--out {args.out!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        what = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        if not (out / "config.json").is_file():  # --force replaces a model directory, never anything else
            raise LoopcoderError(
                f"--out {args.out!r} is not empty ({what}, ...) and is not a model directory; choose a new directory"
            )
        if not args.force:
            raise LoopcoderError(
                f"--out {args.out!r} is not empty ({what}, ...): choose a new directory, or pass --force to replace it"
            )
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "is not a directory" if not parent.is_dir() else "is not writable"
        raise LoopcoderError(f"cannot write --out {args.out!r}: {str(parent)!r} {why}")
    if args.tokenizer is not None:
        tok = T.load_raw_tokenizer(args.tokenizer)
    else:  # the package's own source: always at hand, and the same for the same loopcoder version
        root = Path(loopcoder.__file__).parent
        tok = T.train_tokenizer((f.read_text() for f in sorted(root.rglob("*.py"))), args.vocab_size)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    try:
        with atomic_directory(out) as tmp:  # a failed write leaves an existing --out as it was
            n = write_random_model(
                tmp,
                loops=args.loops,
                hidden_size=args.hidden_size,
                layers=args.layers,
                heads=args.heads,
                kv_heads=args.kv_heads,
                intermediate_size=args.intermediate_size,
                vocab_size=vocab,
                window=args.window,
                max_positions=args.max_positions,
                architecture=args.architecture,
                seed=args.seed,
            )
            T.save_tokenizer(tok, tmp, model_max_length=args.max_positions)
    except OSError as e:
        raise LoopcoderError(f"cannot write --out {args.out!r}: {e.strerror or e}") from None
    note = "" if args.tokenizer or vocab == args.vocab_size else f" (the tokenizer's text gave {vocab} tokens)"
    print(
        f"wrote {args.out}: {n / 1e6:.2f}M parameters, R={args.loops}, {args.architecture}, vocabulary {vocab}" + note
    )
    return 0
