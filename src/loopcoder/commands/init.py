"""`loopcoder init`: write a randomly initialised PLT model directory (released layout) with a tokenizer.

The tokenizer is a byte-level BPE (the project's, with the chat template) trained on this package's own
source code, so that `init` followed by `generate` or `serve` works without any data; `--data DIR` takes
a data directory's tokenizer instead (to fine-tune the model on that data: a model's tokenizer must be
the data's, which `sft` checks), `--tokenizer DIR` any tokenizer directory. Either way the model's
vocabulary is the tokenizer's size. The shape defaults to the `tiny` training preset's, and is checked
(positions, memory and disk needed) before anything is trained or allocated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import loopcoder
from loopcoder.commands.options import MODEL_FLAGS, add_config_flags
from loopcoder.model.identity import write_identity
from loopcoder.training.config import load_config
from loopcoder.utils.atomic import atomic_directory, check_output_dir
from loopcoder.utils.errors import LoopcoderError

# The model's shape when no flag says otherwise: the tiny preset's (so that `init`'s model is the one
# `loopcoder train --config tiny` trains), R = 2 and 4096 positions. Its MLP width belongs to its hidden size:
# a changed --hidden-size without --intermediate-size gets 8/3 x hidden (`_shape`).
_TINY = load_config("tiny").model
SHAPE = dict(
    loops=2,
    hidden_size=_TINY.hidden_size,
    layers=_TINY.layers,
    heads=_TINY.heads,
    kv_heads=_TINY.kv_heads,
    intermediate_size=None,
    window=_TINY.window,
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
        "--data",
        default=None,
        metavar="DIR",
        help="use this data directory's tokenizer (from `loopcoder data build`): a model to train on that data",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="of the trained tokenizer, and so of the model (ignored with --tokenizer or --data)",
    )
    add_config_flags(p, MODEL_FLAGS, defaults=SHAPE)
    p.add_argument("--seed", type=int, default=0)


def _shape(args: argparse.Namespace) -> dict:
    """The model shape from the flags (their defaults are `SHAPE`)."""
    shape = {k: getattr(args, k) for k in SHAPE}
    if shape["intermediate_size"] is None and shape["hidden_size"] == _TINY.hidden_size:
        shape["intermediate_size"] = _TINY.intermediate_size
    return shape


def run(args: argparse.Namespace) -> int:
    from loopcoder.data import tokenizer as T
    from loopcoder.model.checkpoint import check_fits, random_model_config, write_random_model  # torch: fast --help

    out = Path(args.out)
    if args.tokenizer is not None and args.data is not None:
        raise LoopcoderError("give --tokenizer or --data, not both")
    check_output_dir(out, args.force, "model directory", lambda d: (d / "config.json").is_file())
    source = args.data or args.tokenizer
    tok = T.load_raw_tokenizer(source) if source is not None else None
    shape = _shape(args)
    shape["vocab_size"] = tok.get_vocab_size(with_added_tokens=True) if tok is not None else args.vocab_size
    check_fits(random_model_config(**shape), out)  # before a tokenizer is trained or a byte allocated
    if tok is None:  # the package's own source: always at hand, and the same for the same loopcoder version
        root = Path(loopcoder.__file__).parent
        tok = T.train_tokenizer((f.read_text() for f in sorted(root.rglob("*.py"))), args.vocab_size)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    shape["vocab_size"] = vocab
    try:
        with atomic_directory(out) as tmp:  # a failed write leaves an existing --out as it was
            n = write_random_model(tmp, seed=args.seed, identity=False, **shape)
            T.save_tokenizer(tok, tmp, model_max_length=args.max_positions)
            write_identity(tmp)
    except OSError as e:
        raise LoopcoderError(f"cannot write --out {args.out!r}: {e.strerror or e}") from None
    note = "" if source or vocab == args.vocab_size else f" (the tokenizer's text gave {vocab} tokens)"
    print(
        f"wrote {args.out}: {n / 1e6:.2f}M parameters, R={args.loops}, {args.architecture}, vocabulary {vocab}" + note
    )
    return 0
