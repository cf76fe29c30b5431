"""`loopcoder bench decode|train|serve`: benchmarks that compare configurations in one run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from loopcoder.bench.settings import DecodeBenchSettings, ServeBenchSettings, TrainBenchSettings
from loopcoder.commands.options import add_threads_argument, int_list
from loopcoder.utils.errors import LoopcoderError


def _ints(text: str) -> tuple[int, ...]:
    values = int_list(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


# The flags' defaults are the settings' own, so the CLI and the Python API cannot drift apart.
D, S, T = DecodeBenchSettings, ServeBenchSettings, TrainBenchSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="which", metavar="BENCHMARK", required=True)
    d = sub.add_parser(
        "decode",
        help="per-token decode latency and KV bytes: R=1, PLT single-pass, PLT "
        "sequential, vanilla looped, transformers generate",
    )
    d.add_argument("--batches", type=_ints, default=D.batches)
    d.add_argument("--contexts", type=_ints, default=D.contexts)
    d.add_argument("--loops", type=_ints, default=D.loops)
    d.add_argument("--steps", type=int, default=D.steps, help="timed steps per configuration and round")
    d.add_argument("--rounds", type=int, default=D.rounds, help="compared configurations take turns this many times")
    d.add_argument("--warmup", type=int, default=D.warmup)
    d.add_argument(
        "--hidden-size", type=int, default=D.hidden_size, help="default shape: the released 7B's proportions"
    )
    d.add_argument("--layers", type=int, default=D.num_layers)
    d.add_argument("--heads", type=int, default=D.num_heads)
    d.add_argument("--kv-heads", type=int, default=D.num_kv_heads)
    d.add_argument("--head-dim", type=int, default=D.head_dim)
    d.add_argument("--intermediate-size", type=int, default=D.intermediate_size)
    d.add_argument("--vocab-size", type=int, default=D.vocab_size)
    d.add_argument("--window", type=int, default=D.window)
    d.add_argument("--device", default=D.device)
    d.add_argument("--dtype", default=D.dtype)
    d.add_argument("--no-transformers", action="store_true", help="skip transformers' generate")
    d.add_argument("--cuda-graphs", action="store_true", help="capture the decode step as a CUDA graph")
    d.add_argument("--out", default="runs/bench/decode.json", help="JSON report path")
    add_threads_argument(d)
    s = sub.add_parser(
        "serve",
        help="load test of `loopcoder serve`: concurrent clients on loopback, requests/s, "
        "tokens/s, latency percentiles, errors, server memory before/after",
    )
    s.add_argument("--model", default=S.model, help="model directory (default: build a small random model + tokenizer)")
    s.add_argument("--concurrency", type=int, default=S.concurrency, help="clients sending requests back to back")
    s.add_argument(
        "--duration", type=float, default=S.duration, help="seconds of load (in-flight requests then finish)"
    )
    s.add_argument("--warmup", type=float, default=S.warmup, help="seconds of load before measuring")
    s.add_argument(
        "--max-tokens", type=int, default=S.max_tokens, help="tokens generated per request (end-of-text ignored)"
    )
    s.add_argument("--max-batch", type=int, default=S.max_batch, help="the server's --max-batch")
    s.add_argument("--no-stream", action="store_true", help="non-streaming requests (no time to first token)")
    s.add_argument("--hidden-size", type=int, default=S.hidden_size, help="of the built model")
    s.add_argument("--layers", type=int, default=S.layers, help="of the built model")
    s.add_argument("--loops", type=int, default=S.loops, help="of the built model")
    s.add_argument("--device", default=S.device)
    s.add_argument("--dtype", default=S.dtype)
    s.add_argument(
        "--server-threads",
        type=int,
        default=S.server_threads,
        help="the server's --threads (default: the server's default)",
    )
    s.add_argument("--seed", type=int, default=S.seed)
    s.add_argument(
        "--workload",
        choices=("load", "agentic"),
        default=S.workload,
        help="load: concurrent clients; agentic: agents' multi-turn chats over a shared system prompt, against a "
        "server without prefix caching (paired)",
    )
    s.add_argument("--url", default=S.url, help="agentic: measure this running server (no paired server started)")
    s.add_argument("--agents", type=int, default=S.agents, help="agentic: agents at once")
    s.add_argument("--turns", type=int, default=S.turns, help="agentic: turns per agent")
    s.add_argument("--system-chars", type=int, default=S.system_chars, help="agentic: the shared system prompt")
    s.add_argument("--tool-chars", type=int, default=S.tool_chars, help="agentic: each turn's tool result")
    s.add_argument("--rounds", type=int, default=S.rounds, help="agentic: the two servers take turns this many times")
    s.add_argument(
        "--out", default=None, help="JSON report path (default runs/bench/serve.json, or serve-agentic.json)"
    )
    _add_train_arguments(sub)


def _add_train_arguments(sub: Any) -> None:
    t = sub.add_parser("train", help="training tokens/s: PLT R=1,2,3 and transformers' Llama at the R=1 shape")
    t.add_argument("--loops", type=_ints, default=T.loops, help="loop counts (1 is always included)")
    t.add_argument("--batch", type=int, default=T.batch)
    t.add_argument("--seq-len", type=int, default=T.seq_len)
    t.add_argument("--steps", type=int, default=T.steps, help="timed steps per configuration and round")
    t.add_argument("--warmup", type=int, default=T.warmup)
    t.add_argument("--rounds", type=int, default=T.rounds, help="the configurations take turns this many times")
    t.add_argument("--hidden-size", type=int, default=T.hidden_size)
    t.add_argument("--layers", type=int, default=T.num_layers)
    t.add_argument("--heads", type=int, default=T.num_heads)
    t.add_argument("--kv-heads", type=int, default=T.num_kv_heads)
    t.add_argument(
        "--intermediate-size", type=int, default=T.intermediate_size, help="default: 8/3 x hidden, as in training"
    )
    t.add_argument("--vocab-size", type=int, default=T.vocab_size)
    t.add_argument("--window", type=int, default=T.window)
    t.add_argument("--device", default=T.device)
    t.add_argument("--dtype", default=T.dtype, help="auto: fp32 on CPU, bf16 autocast on GPU")
    t.add_argument("--activation-checkpointing", action="store_true")
    t.add_argument(
        "--attention",
        choices=("sdpa", "flex_attention"),
        default=T.attention,
        help="PLT's training attention (flex_attention: CUDA only)",
    )
    t.add_argument("--no-transformers", action="store_true", help="skip transformers' LlamaForCausalLM")
    t.add_argument("--out", default="runs/bench/train.json", help="JSON report path")
    add_threads_argument(t)


def run(args: argparse.Namespace) -> int:
    from loopcoder.utils.runtime import apply_threads  # here and below: the benchmarks import torch (fast --help)

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
    from loopcoder.bench.decode import format_report, run_decode_bench

    if args.heads % args.kv_heads:
        raise LoopcoderError(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise LoopcoderError("--steps and --rounds must be >= 1 and --warmup >= 0")
    s = DecodeBenchSettings(
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        window=args.window,
        loops=args.loops,
        batches=args.batches,
        contexts=args.contexts,
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        include_transformers=not args.no_transformers,
        cuda_graphs=args.cuda_graphs,
    )
    _run_bench(args, lambda: run_decode_bench(s), format_report)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from loopcoder.bench.serve import format_report, run_serve_bench

    if args.url and args.workload != "agentic":
        raise LoopcoderError("--url needs --workload agentic (the load workload starts its own server)")
    args.out = args.out or ("runs/bench/serve-agentic.json" if args.workload == "agentic" else "runs/bench/serve.json")
    s = ServeBenchSettings(
        model=args.model,
        concurrency=args.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        max_tokens=args.max_tokens,
        max_batch=args.max_batch,
        stream=not args.no_stream,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        server_threads=args.server_threads,
        hidden_size=args.hidden_size,
        layers=args.layers,
        loops=args.loops,
        workload=args.workload,
        url=args.url,
        agents=args.agents,
        turns=args.turns,
        system_chars=args.system_chars,
        tool_chars=args.tool_chars,
        rounds=args.rounds,
    )
    if args.workload == "agentic":
        from loopcoder.bench.agentic import format_report as agentic_report
        from loopcoder.bench.agentic import run_agentic_bench

        r = _run_bench(args, lambda: run_agentic_bench(s, sys.stderr), agentic_report)["result"]
        sides = [v for k, v in r.items() if k not in ("ratios", "server_exit_codes")]
        return 1 if any(v["errors"] for v in sides) or any(c != 0 for c in r["server_exit_codes"].values()) else 0
    r = _run_bench(args, lambda: run_serve_bench(s), format_report)["result"]
    return 1 if r["errors"] or r["server_exit_code"] != 0 else 0


def _train(args: argparse.Namespace) -> int:
    from loopcoder.bench.train import format_report, run_train_bench

    if args.hidden_size % args.heads:
        raise LoopcoderError(f"--hidden-size {args.hidden_size} is not a multiple of --heads {args.heads}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.batch < 1 or args.seq_len < 2:
        raise LoopcoderError("--steps, --rounds and --batch must be >= 1, --warmup >= 0, --seq-len >= 2")
    s = TrainBenchSettings(
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        window=args.window,
        batch=args.batch,
        seq_len=args.seq_len,
        loops=tuple(sorted({1, *args.loops})),
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        device=args.device,
        dtype=args.dtype,
        include_transformers=not args.no_transformers,
        activation_checkpointing=args.activation_checkpointing,
        attention=args.attention,
    )
    if args.attention == "flex_attention" and not args.device.startswith("cuda"):
        raise LoopcoderError("--attention flex_attention needs --device cuda (no flex_attention backward on CPU)")
    _run_bench(args, lambda: run_train_bench(s), format_report)
    return 0


def _run_bench(
    args: argparse.Namespace, run: Callable[[], dict[str, Any]], format_report: Callable[[dict[str, Any]], str]
) -> dict[str, Any]:
    """Print the settings, run the benchmark, print its report and write it (JSON) to --out."""
    from loopcoder.bench.common import write_json

    print(
        f"{args.which} benchmark: " + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k != "which"),
        file=sys.stderr,
    )
    report = run()
    print(format_report(report))
    write_json(report, args.out)
    print(f"\nwrote {args.out}", file=sys.stderr)
    return report
