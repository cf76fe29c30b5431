"""`loopcoder bench decode|train|serve`: benchmarks that compare configurations in one run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from loopcoder.errors import LoopcoderError
from loopcoder.runtime import add_threads_argument, apply_threads


def int_list(text: str) -> tuple[int, ...]:
    """argparse type for integer lists: `1,2,3`, or a range `1-6` (both ends included)."""
    try:
        if "-" in text and "," not in text:
            a, b = (int(x) for x in text.split("-"))
            return tuple(range(a, b + 1))
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,3 or 1-6, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    values = int_list(text)
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
    d.add_argument("--steps", type=int, default=4, help="timed steps per configuration and round")
    d.add_argument("--rounds", type=int, default=5, help="compared configurations take turns this many times")
    d.add_argument("--warmup", type=int, default=2)
    d.add_argument("--hidden-size", type=int, default=1024, help="default shape: the released 7B's proportions")
    d.add_argument("--layers", type=int, default=14)
    d.add_argument("--heads", type=int, default=8)
    d.add_argument("--kv-heads", type=int, default=2)
    d.add_argument("--head-dim", type=int, default=128)
    d.add_argument("--intermediate-size", type=int, default=5504)
    d.add_argument("--vocab-size", type=int, default=15360)
    d.add_argument("--window", type=int, default=64)
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", default="auto")
    d.add_argument("--no-transformers", action="store_true", help="skip transformers' generate")
    d.add_argument("--cuda-graphs", action="store_true", help="capture the decode step as a CUDA graph")
    d.add_argument("--out", default="runs/bench/decode.json", help="JSON report path")
    add_threads_argument(d)
    s = sub.add_parser("serve", help="load test of `loopcoder serve`: concurrent clients on loopback, requests/s, "
                                     "tokens/s, latency percentiles, errors, server memory before/after")
    s.add_argument("--model", default=None, help="model directory (default: build a small random model + tokenizer)")
    s.add_argument("--concurrency", type=int, default=32, help="clients sending requests back to back")
    s.add_argument("--duration", type=float, default=30.0, help="seconds of load (in-flight requests then finish)")
    s.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    s.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (end-of-text ignored)")
    s.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    s.add_argument("--no-stream", action="store_true", help="non-streaming requests (no time to first token)")
    s.add_argument("--hidden-size", type=int, default=256, help="of the built model")
    s.add_argument("--layers", type=int, default=4, help="of the built model")
    s.add_argument("--loops", type=int, default=2, help="of the built model")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--server-threads", type=int, default=None,
                   help="the server's --threads (default: the server's default)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="runs/bench/serve.json", help="JSON report path")
    _add_train_arguments(sub)


def _add_train_arguments(sub: Any) -> None:
    t = sub.add_parser("train", help="training tokens/s: PLT R=1,2,3 and transformers' Llama at the R=1 shape")
    t.add_argument("--loops", type=_ints, default=(1, 2, 3), help="loop counts (1 is always included)")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--rounds", type=int, default=3, help="the configurations take turns this many times")
    t.add_argument("--hidden-size", type=int, default=128)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--intermediate-size", type=int, default=352)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--window", type=int, default=64)
    t.add_argument("--device", default="cpu")
    t.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 autocast on GPU")
    t.add_argument("--activation-checkpointing", action="store_true")
    t.add_argument("--attention", choices=("sdpa", "flex_attention"), default="sdpa",
                   help="PLT's training attention (flex_attention: CUDA only)")
    t.add_argument("--no-transformers", action="store_true", help="skip transformers' LlamaForCausalLM")
    t.add_argument("--out", default="runs/bench/train.json", help="JSON report path")
    add_threads_argument(t)


def run(args: argparse.Namespace) -> int:
    if args.which in ("decode", "train"):
        apply_threads(args.threads)
    if args.which == "decode":
        return _decode(args)
    if args.which == "serve":
        return _serve(args)
    if args.which == "train":
        return _train(args)
    raise LoopcoderError(f"unknown benchmark {args.which!r}")


def _decode(args: argparse.Namespace) -> int:
    from loopcoder.bench.decode import DecodeBenchSettings, format_report, run_decode_bench

    if args.heads % args.kv_heads:
        raise LoopcoderError(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise LoopcoderError("--steps and --rounds must be >= 1 and --warmup >= 0")
    s = DecodeBenchSettings(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                            num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                            intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                            window=args.window, loops=args.loops, batches=args.batches, contexts=args.contexts,
                            steps=args.steps, rounds=args.rounds, warmup=args.warmup, device=args.device,
                            dtype=args.dtype,
                            include_transformers=not args.no_transformers, cuda_graphs=args.cuda_graphs)
    _run_bench(args, lambda: run_decode_bench(s), format_report)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from loopcoder.bench.serve import ServeBenchSettings, format_report, run_serve_bench

    s = ServeBenchSettings(model=args.model, concurrency=args.concurrency, duration=args.duration,
                           warmup=args.warmup, max_tokens=args.max_tokens, max_batch=args.max_batch,
                           stream=not args.no_stream, device=args.device, dtype=args.dtype, seed=args.seed,
                           server_threads=args.server_threads,
                           hidden_size=args.hidden_size, layers=args.layers, loops=args.loops)
    r = _run_bench(args, lambda: run_serve_bench(s), format_report)["result"]
    return 1 if r["errors"] or r["server_exit_code"] != 0 else 0


def _train(args: argparse.Namespace) -> int:
    from loopcoder.bench.train import TrainBenchSettings, format_report, run_train_bench

    if args.hidden_size % args.heads:
        raise LoopcoderError(f"--hidden-size {args.hidden_size} is not a multiple of --heads {args.heads}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.batch < 1 or args.seq_len < 2:
        raise LoopcoderError("--steps, --rounds and --batch must be >= 1, --warmup >= 0, --seq-len >= 2")
    s = TrainBenchSettings(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                           num_kv_heads=args.kv_heads, head_dim=args.hidden_size // args.heads,
                           intermediate_size=args.intermediate_size, vocab_size=args.vocab_size, window=args.window,
                           batch=args.batch, seq_len=args.seq_len, loops=tuple(sorted({1, *args.loops})),
                           steps=args.steps, warmup=args.warmup, rounds=args.rounds, device=args.device,
                           dtype=args.dtype, include_transformers=not args.no_transformers,
                           activation_checkpointing=args.activation_checkpointing, attention=args.attention)
    if args.attention == "flex_attention" and not args.device.startswith("cuda"):
        raise LoopcoderError("--attention flex_attention needs --device cuda (no flex_attention backward on CPU)")
    _run_bench(args, lambda: run_train_bench(s), format_report)
    return 0


def _run_bench(args: argparse.Namespace, run: Callable[[], dict[str, Any]],
               format_report: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Print the settings, run the benchmark, print its report and write it (JSON) to --out."""
    from loopcoder.bench import write_json

    print(f"{args.which} benchmark: " + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k != "which"),
          file=sys.stderr)
    report = run()
    print(format_report(report))
    write_json(report, args.out)
    print(f"\nwrote {args.out}", file=sys.stderr)
    return report
