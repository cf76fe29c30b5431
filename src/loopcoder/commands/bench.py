"""`loopcoder bench decode|train|serve`: benchmarks that compare configurations in one run."""

from __future__ import annotations

import argparse
import sys

from loopcoder.errors import LoopcoderError


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="which", metavar="BENCHMARK", required=True)
    d = sub.add_parser("decode", help="per-token decode latency and KV bytes: R=1, PLT single-pass, PLT "
                                      "sequential, vanilla looped, transformers generate")
    d.add_argument("--batches", type=_ints, default=(1, 32))
    d.add_argument("--contexts", type=_ints, default=(512, 2048))
    d.add_argument("--loops", type=_ints, default=(2, 3, 4))
    d.add_argument("--steps", type=int, default=10, help="timed steps per configuration (median reported)")
    d.add_argument("--warmup", type=int, default=3)
    d.add_argument("--hidden-size", type=int, default=1024)
    d.add_argument("--layers", type=int, default=8)
    d.add_argument("--heads", type=int, default=16)
    d.add_argument("--kv-heads", type=int, default=4)
    d.add_argument("--intermediate-size", type=int, default=2816)
    d.add_argument("--vocab-size", type=int, default=32000)
    d.add_argument("--window", type=int, default=64)
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", default="auto")
    d.add_argument("--no-transformers", action="store_true", help="skip transformers' generate")
    d.add_argument("--cuda-graphs", action="store_true", help="capture the decode step as a CUDA graph")
    d.add_argument("--out", default="runs/bench/decode.json", help="JSON report path")


def run(args: argparse.Namespace) -> int:
    if args.which == "decode":
        return _decode(args)
    raise LoopcoderError(f"unknown benchmark {args.which!r}")


def _decode(args: argparse.Namespace) -> int:
    from loopcoder.bench.decode import DecodeBenchSettings, format_report, run_decode_bench, write_json

    if args.hidden_size % args.heads:
        raise LoopcoderError(f"--hidden-size {args.hidden_size} is not a multiple of --heads {args.heads}")
    if args.steps < 1 or args.warmup < 0:
        raise LoopcoderError("--steps must be >= 1 and --warmup >= 0")
    s = DecodeBenchSettings(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                            num_kv_heads=args.kv_heads, head_dim=args.hidden_size // args.heads,
                            intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                            window=args.window, loops=args.loops, batches=args.batches, contexts=args.contexts,
                            steps=args.steps, warmup=args.warmup, device=args.device, dtype=args.dtype,
                            include_transformers=not args.no_transformers, cuda_graphs=args.cuda_graphs)
    print("decode benchmark: " + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k != "which"),
          file=sys.stderr)
    report = run_decode_bench(s)
    print(format_report(report))
    write_json(report, args.out)
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0
