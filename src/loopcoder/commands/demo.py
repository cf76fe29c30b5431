"""`loopcoder demo` (what `make demo` runs): until the loop-count study lands, the smallest
end-to-end thing: build tiny PLT models of R = 1..4, check cached decoding against full recompute,
generate, and print the KV-memory table against the vanilla looped transformer."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=int, default=4096, help="T for the KV-memory table")


def run(args: argparse.Namespace) -> int:
    import torch

    from loopcoder.config import PLTConfig
    from loopcoder.model import PLTForCausalLM

    torch.manual_seed(0)
    print("Tiny PLT models (random weights): cached decoding vs full recompute")
    for R in (1, 2, 3, 4):
        cfg = PLTConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, plt_num_loops=R,
                        plt_window_size=[8, 0], max_position_embeddings=512)
        model = PLTForCausalLM(cfg).eval()
        prompt = torch.randint(0, 256, (1, 12))
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
            full = model(out).logits[0, prompt.shape[1] - 1:-1].argmax(-1)
        same = bool((full == out[0, prompt.shape[1]:]).all())
        print(f"  R={R}: generated {out.shape[1] - prompt.shape[1]} tokens; greedy == argmax(full recompute): {same}")

    cfg = PLTConfig()  # the released 7B shape
    T = args.seq_len
    base = PLTConfig(plt_num_loops=1).kv_cache_bytes(T)
    print(f"\nKV cache per sequence, released 7B shape (L=14, kv_heads=8, head_dim=128, bf16), T={T}, w={cfg.window}")
    print(f"  {'R':>2} {'PLT (GiB)':>10} {'PLT/R=1':>8} {'vanilla (GiB)':>14} {'vanilla/R=1':>12}")
    for R in (1, 2, 3, 4):
        plt = PLTConfig(plt_num_loops=R).kv_cache_bytes(T)
        van = PLTConfig(plt_num_loops=R, loop_architecture="vanilla").kv_cache_bytes(T)
        print(f"  {R:>2} {plt / 2**30:>10.3f} {plt / base:>8.3f} {van / 2**30:>14.3f} {van / base:>12.3f}")
    return 0
