"""`loopcoder init`: write a randomly initialised PLT model directory (released layout)."""

from __future__ import annotations

import argparse
from pathlib import Path

from loopcoder.errors import LoopcoderError


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


def write_random_model(out: str | Path, *, loops: int = 2, hidden_size: int = 256, layers: int = 4, heads: int = 4,
                       kv_heads: int = 2, intermediate_size: int | None = None, vocab_size: int = 4096,
                       window: int = 64, max_positions: int = 4096, architecture: str = "plt", seed: int = 0) -> int:
    """Write a randomly initialised PLT model directory to `out` (the defaults are `init`'s); its parameter count."""
    import torch

    from loopcoder.checkpoint import save_model
    from loopcoder.config import PLTConfig
    from loopcoder.model import PLTForCausalLM

    if hidden_size % heads:
        raise LoopcoderError(f"--hidden-size {hidden_size} is not a multiple of --heads {heads}")
    inter = intermediate_size or 64 * round(8 * hidden_size / 3 / 64)
    config = PLTConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads, max_position_embeddings=max_positions,
        plt_num_loops=loops, plt_window_size=[window, 0], loop_architecture=architecture,
    )
    torch.manual_seed(seed)
    model = PLTForCausalLM(config)
    save_model(model, out)
    return sum(p.numel() for p in model.parameters())
