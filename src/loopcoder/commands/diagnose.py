"""`loopcoder diagnose`: LoopCoder-v2's loop diagnostics (spec section 3) for one or more models.

    loopcoder diagnose --model runs/r2 [--model runs/r3 ...] --data val.jsonl --samples 500 --out diag/

Writes diag/diagnostics.json (every figure), diag/report.md (tables, recommendation) and
diag/plots/*.png. Several models (different R) are compared side by side in one report.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from loopcoder.commands.options import add_threads_argument, add_tokenizer_check_argument
from loopcoder.utils.errors import LoopcoderError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="DIR",
        help="model directory (released layout) or a run directory (its newest checkpoint); repeat "
        "to compare models of different R",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help='held-out data: a text file, a JSONL file with a "text" field, or a data directory '
        "from `loopcoder data build` (its validation split)",
    )
    p.add_argument("--samples", type=int, default=500, help="number of samples (default 500, as published)")
    p.add_argument("--out", required=True, metavar="DIR", help="report directory to write (replaced atomically)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sample at most (default 1024)")
    p.add_argument(
        "--tokenizer", metavar="DIR", default=None, help="tokenizer directory (default: the model directory's own)"
    )
    p.add_argument(
        "--name",
        action="append",
        default=None,
        metavar="NAME",
        help="display name per --model, in the same order (default: the directory names)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (auto: as saved)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--no-per-sample",
        action="store_true",
        help="leave the per-sample values out of diagnostics.json (smaller file)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_threads_argument(p)
    add_tokenizer_check_argument(p)


def _names(models: list[str], names: list[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(models):
            raise LoopcoderError(f"--name given {len(names)} time(s) for {len(models)} --model(s)")
        if len(set(names)) != len(names):
            raise LoopcoderError(f"--name values must be distinct, got {names}")
        return names
    paths = [Path(m).resolve() for m in models]
    out = [p.name or str(p) for p in paths]
    for i, name in enumerate(out):  # same directory names: qualify with the parent, then number them
        if out.count(name) > 1:
            out[i] = f"{paths[i].parent.name}/{paths[i].name}"
    for i in range(len(out)):
        if out[:i].count(out[i]):
            out[i] = f"{out[i]}-{i + 1}"
    return out


def run(args: argparse.Namespace) -> int:
    # here, not at the top: they import torch, which `loopcoder diagnose --help` does not need
    import torch

    from loopcoder.data.shards import read_index
    from loopcoder.diagnostics import diagnose, load_sequences, recommend, write_report
    from loopcoder.diagnostics.report import check_out_dir
    from loopcoder.model.checkpoint import load_model
    from loopcoder.model.loading import check_tokenizer, check_vocab, load_tokenizer
    from loopcoder.training.checkpoints import resolve_model_dir
    from loopcoder.utils.runtime import DTYPES as TORCH_DTYPES
    from loopcoder.utils.runtime import apply_threads, pick_device

    # Check every input before loading a model: a typo should cost nothing.
    if args.samples < 1:
        raise LoopcoderError(f"--samples must be >= 1, got {args.samples}")
    if args.seq_len < 2:
        raise LoopcoderError(f"--seq-len must be >= 2, got {args.seq_len}")
    model_dirs = [str(resolve_model_dir(m)) for m in args.model]
    data = Path(args.data)
    if not data.exists():
        raise LoopcoderError(f"data {args.data!r} does not exist")
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise LoopcoderError(f"tokenizer directory {args.tokenizer!r} does not exist")
    check_out_dir(Path(args.out))
    names = _names(args.model, args.name)
    apply_threads(args.threads)
    device = pick_device(args.device)
    dtype = None if args.dtype == "auto" else TORCH_DTYPES[args.dtype]  # auto: as saved

    # The samples, tokenized once per tokenizer (a data directory holds token ids already), before any
    # model is loaded.
    def tokenizer_dir(model_dir: str) -> str | None:
        return None if data.is_dir() else (args.tokenizer or model_dir)

    samples: dict[str | None, list] = {}
    vocab: dict[str | None, int] = {}  # the tokenizer's, or the data directory's
    for key in map(tokenizer_dir, model_dirs):
        if key not in samples:
            tokenizer = None if key is None else load_tokenizer(key)
            samples[key] = load_sequences(data, tokenizer, args.seq_len, args.samples)
            vocab[key] = len(tokenizer) if tokenizer is not None else read_index(data)["vocab_size"]
            if not samples[key]:
                raise LoopcoderError(f"{args.data!r} gave no sample of at least 2 tokens")
    for model_dir in model_dirs:  # every pairing, before any model is loaded
        key = tokenizer_dir(model_dir)
        what = "the data directory" if key is None else "the tokenizer"
        check_tokenizer(model_dir, key or data, args.allow_tokenizer_mismatch, what)
    results = []
    for model_dir, name in zip(model_dirs, names):
        key = tokenizer_dir(model_dir)
        seqs = samples[key]
        if len(seqs) < args.samples and not args.quiet:
            print(
                f"diagnose {name}: {args.data} has only {len(seqs)} sample(s) of the {args.samples} asked for",
                file=sys.stderr,
            )
        model = load_model(model_dir, dtype=dtype, device=device)
        check_vocab(model.config.vocab_size, vocab[key], key or str(data))
        results.append(diagnose(model, seqs, args.samples, name=name, source=model_dir, progress=not args.quiet))
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rec = recommend(results)
    out = write_report(results, args.out, rec, plots=not args.no_plots, per_sample=not args.no_per_sample)
    for r in results:
        print(
            f"{r.name}: R={r.num_loops} {r.architecture}, {r.num_samples} samples, {r.num_tokens} tokens, "
            f"{r.seconds:.1f}s"
        )
    print(f"recommendation: {rec.headline}")
    for reason in rec.reasons:
        print(f"  - {reason}")
    print(f"wrote {out}/diagnostics.json, {out}/report.md" + ("" if args.no_plots else f", {out}/plots/"))
    return 0
