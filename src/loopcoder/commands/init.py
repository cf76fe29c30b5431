"""`loopcoder init`: write a randomly initialised PLT model directory (released layout)."""

from __future__ import annotations

import argparse

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
    import torch

    from loopcoder.checkpoint import save_model
    from loopcoder.config import PLTConfig
    from loopcoder.model import PLTForCausalLM

    if args.hidden_size % args.heads:
        raise LoopcoderError(f"--hidden-size {args.hidden_size} is not a multiple of --heads {args.heads}")
    inter = args.intermediate_size or 64 * round(8 * args.hidden_size / 3 / 64)
    config = PLTConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=inter,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads, max_position_embeddings=args.max_positions,
        plt_num_loops=args.loops, plt_window_size=[args.window, 0], loop_architecture=args.architecture,
    )
    torch.manual_seed(args.seed)
    model = PLTForCausalLM(config)
    save_model(model, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.2f}M parameters, R={args.loops}, {args.architecture}")
    return 0
