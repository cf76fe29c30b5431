"""`loopcoder data`: build the tokenizer and packed shards, write the instruction and reasoning sets.

loopcoder data build --source stdlib --out data/stdlib --vocab-size 4096
loopcoder data verify data/stdlib
loopcoder data instructions --data data/stdlib
loopcoder data reasoning --n 2000 --steps 1-6 --split train --seed 0 --out reasoning-train.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json

from loopcoder.data import reasoning
from loopcoder.data.corpus import CorpusSpec
from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.errors import LoopcoderError


def add_arguments(p: argparse.ArgumentParser) -> None:
    # corpus defaults come from `CorpusSpec` (its class attributes), so the CLI cannot drift from the API
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    b = sub.add_parser("build", help="corpus -> tokenizer + packed shards + manifest (skipped if up to date)")
    b.add_argument(
        "--source",
        action="append",
        metavar="SRC",
        help="stdlib (default), a directory, FILE.jsonl[.gz], FILE.parquet or hf:NAME_OR_PATH; repeat to combine",
    )
    b.add_argument("--out", required=True, help="the data directory to write")
    b.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary incl. 12 special/added tokens")
    b.add_argument("--seq-len", type=int, default=512, help="tokens per packed training sequence")
    b.add_argument(
        "--val-fraction", type=float, default=CorpusSpec.val_fraction, help="share of documents for validation"
    )
    b.add_argument("--max-file-bytes", type=int, default=CorpusSpec.max_file_bytes, help="skip larger documents")
    b.add_argument("--min-file-bytes", type=int, default=CorpusSpec.min_file_bytes, help="skip smaller documents")
    b.add_argument(
        "--include-ext",
        action="append",
        metavar="EXT",
        help="file extensions taken from directories (default .py; '*' for all; comma lists ok)",
    )
    b.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATTERN",
        help="skip paths with a component (or a relative path, if it has '/') matching this glob",
    )
    b.add_argument(
        "--text-field", default=CorpusSpec.text_field, help="the text field of JSONL, Parquet and hf: sources"
    )
    b.add_argument("--hf-config", default=CorpusSpec.hf_config, help="configuration name of an hf: dataset")
    b.add_argument("--hf-split", default=CorpusSpec.hf_split, help="split of an hf: dataset")
    b.add_argument(
        "--max-documents", type=int, default=CorpusSpec.max_documents, help="stop after this many kept documents"
    )
    b.add_argument("--tokenizer", default=None, metavar="DIR", help="reuse this tokenizer instead of training")
    b.add_argument("--tokenizer-max-bytes", type=int, default=None, help="train the tokenizer on at most this")
    b.add_argument("--shard-tokens", type=int, default=1 << 25, help="tokens per shard file")
    b.add_argument("--seed", type=int, default=CorpusSpec.seed, help="salt of the train/validation split")
    b.add_argument(
        "--force",
        action="store_true",
        help="replace an existing data directory built from other inputs (everything in it, "
        "instructions/ included), and rebuild even if it is up to date",
    )

    v = sub.add_parser(
        "verify", help="check a data directory: index.json, every shard's size and checksum, the tokenizer"
    )
    v.add_argument("dir", metavar="DIR", help="a directory written by `loopcoder data build`")

    i = sub.add_parser("instructions", help="documented functions of a data directory's corpus -> chat JSONL")
    i.add_argument("--data", required=True, help="a directory written by `loopcoder data build`")
    i.add_argument(
        "--out", default=None, help="output directory for train.jsonl/validation.jsonl (default DATA/instructions)"
    )
    i.add_argument("--max-tokens", type=int, default=None, help="drop longer records (default: the seq len)")
    i.add_argument("--max-code-chars", type=int, default=6000, help="drop functions longer than this")

    r = sub.add_parser("reasoning", help="synthetic code-reasoning programs with executed answers -> JSONL")
    r.add_argument("--n", type=int, required=True, help="number of examples")
    r.add_argument("--steps", default="1-6", help="dependent steps: N, LO-HI or N,M,... (each example draws one)")
    r.add_argument("--split", choices=["train", "eval"], default="train")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--distractors", type=int, default=0, help="assignments the answer does not depend on")
    r.add_argument(
        "--family",
        choices=["mixed", "digits", "chains"],
        default="mixed",
        help="mixed programs, one-digit modular arithmetic (digits), or variable tracking (chains)",
    )
    r.add_argument(
        "--format",
        choices=["examples", "chat", "completion", "cruxeval"],
        default="examples",
        help="examples: the raw records; chat: {messages} for SFT; completion/cruxeval: {text} "
        "documents for pretraining mixes",
    )
    r.add_argument("--out", required=True, help="JSONL file to write")


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        return _build(args)
    if args.action == "instructions":
        return _instructions(args)
    if args.action == "verify":
        from loopcoder.data.verify import verify  # reads the shards (numpy) and the tokenizer

        report = verify(args.dir)
        splits = ", ".join(f"{k} {v:,} sequences" for k, v in report["splits"].items())
        print(
            f"{args.dir}: ok: {report['shards']} shards ({report['bytes']:,} bytes of tokens) match their "
            f"checksums; {splits}; tokenizer {report['tokenizer']} is the shards'"
        )
        return 0
    return _reasoning(args)


def _extensions(values: list[str] | None) -> tuple[str, ...]:
    if not values:
        return CorpusSpec.include_ext
    exts = []
    for v in values:
        for e in v.split(","):
            e = e.strip()
            if e:
                exts.append(e if e == "*" or e.startswith(".") else "." + e)
    if not exts:
        raise LoopcoderError("--include-ext: no extension given")
    return tuple(exts)


def _build(args: argparse.Namespace) -> int:
    from loopcoder.data.build import BuildConfig, build, format_statistics  # the tokenizer imports torch

    spec = CorpusSpec(
        sources=tuple(args.source or CorpusSpec.sources),
        include_ext=_extensions(args.include_ext),
        ignore=tuple(args.ignore),
        text_field=args.text_field,
        max_file_bytes=args.max_file_bytes,
        min_file_bytes=args.min_file_bytes,
        val_fraction=args.val_fraction,
        seed=args.seed,
        hf_config=args.hf_config,
        hf_split=args.hf_split,
        max_documents=args.max_documents,
    )
    config = BuildConfig(
        corpus=spec,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        tokenizer=args.tokenizer,
        tokenizer_max_bytes=args.tokenizer_max_bytes,
        shard_tokens=args.shard_tokens,
    )
    manifest = build(config, args.out, force=args.force)
    print(format_statistics(manifest, args.out))
    return 0


def _instructions(args: argparse.Namespace) -> int:
    from loopcoder.data.instructions import write_instruction_set  # imports the tokenizer (torch)

    result = write_instruction_set(args.data, args.out, args.max_tokens, args.max_code_chars)
    st = result["statistics"]
    print(
        f"{st['files']} files, {st['candidates']} documented functions and methods; dropped {st['too_long']} "
        f"over {result['max_tokens']} tokens, {st['duplicates']} duplicates, {st['unparsable']} unparsable files"
    )
    for split, path in result["files"].items():
        print(f"{split:<11} {st[split]:>6} records -> {path}")
    return 0


def _reasoning(args: argparse.Namespace) -> int:
    examples = reasoning.generate_examples(
        args.n, args.steps, args.seed, args.split, args.distractors, progress=True, family=args.family
    )
    lines = []
    for ex in examples:
        if args.format == "examples":
            rec = ex
        elif args.format == "chat":
            rec = {"id": ex["id"], "messages": reasoning.to_chat_messages(ex)}
        else:
            rec = {"id": ex["id"], "text": reasoning.to_text(ex, args.format)}
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    atomic_write_text(args.out, "".join(lines))
    counts = collections.Counter(ex["steps"] for ex in examples)
    per = ", ".join(f"{k} steps: {counts[k]}" for k in sorted(counts))
    print(f"wrote {len(examples)} {args.split} examples ({args.format}) to {args.out}" + (f" ({per})" if per else ""))
    return 0
