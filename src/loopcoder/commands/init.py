"""`loopcoder init`: write a randomly initialised PLT model directory (released layout)."""

from __future__ import annotations

import argparse

from loopcoder.checkpoint import write_random_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory to write (config.json + model.safetensors)")
    p.add_argument("--loops", type=int, default=2, help="plt_num_loops R (1 = non-looped baseline)")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=None, help="default: about 8/3 x hidden")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--window", type=int, default=64, help="plt_window_size[0]")
    p.add_argument("--max-positions", type=int, default=4096)
    p.add_argument("--architecture", choices=["plt", "vanilla"], default="plt")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    n = write_random_model(args.out, loops=args.loops, hidden_size=args.hidden_size, layers=args.layers,
                           heads=args.heads, kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
                           vocab_size=args.vocab_size, window=args.window, max_positions=args.max_positions,
                           architecture=args.architecture, seed=args.seed)
    print(f"wrote {args.out}: {n / 1e6:.2f}M parameters, R={args.loops}, {args.architecture}")
    return 0

