"""The GPU check: one command, under ten minutes on one GPU.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out $OUT

1. Correctness on CUDA: the engine's greedy tokens (single-pass, sequential, fixed shapes, CUDA graph)
   equal full recompute on a tiny model in fp32.
2. The decode benchmark in bf16 with CUDA graphs at batch 1, 32 and 256, contexts 512 and 2048.
3. The training benchmark with MFU, if the training module is present.
Writes JSON and a log under --out; prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def correctness(out_dir: str) -> dict:
    from loopcoder.config import PLTConfig
    from loopcoder.engine import Engine
    from loopcoder.model import PLTForCausalLM
    from loopcoder.sampling import SamplingParams

    results = {}
    prompts = [[5, 9, 11, 3, 7, 8, 2], [4, 6, 10], list(range(1, 40))]
    for R in (1, 2, 3):
        torch.manual_seed(0)
        cfg = PLTConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, plt_num_loops=R,
                        plt_window_size=[8, 0], max_position_embeddings=128, eos_token_id=None)
        model = PLTForCausalLM(cfg).cuda().eval()
        expected = []
        with torch.no_grad():
            for p in prompts:
                seq = torch.tensor([p], device="cuda")
                for _ in range(12):
                    seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
                expected.append(seq[0, len(p):].tolist())
        for name, kw in {"parallel": {}, "sequential": {"mode": "sequential"},
                         "static": {"static_shapes": True}, "cuda_graphs": {"cuda_graphs": True}}.items():
            engine = Engine(model, max_batch=2, max_seq_len=96, **kw)
            got = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=12))]
            results[f"R={R} {name}"] = got == expected
    print("correctness:", json.dumps(results, indent=1), flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"))
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"), "correctness": correctness(args.out)}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    decode = [sys.executable, "-m", "loopcoder", "bench", "decode", "--device", "cuda", "--dtype", "bfloat16",
              "--batches", "1,32,256", "--contexts", "512,2048", "--hidden-size", "4096", "--layers", "8",
              "--heads", "32", "--kv-heads", "8", "--intermediate-size", "11008", "--vocab-size", "32000",
              "--steps", "20", "--warmup", "5", "--cuda-graphs", "--out", f"{args.out}/decode_gpu.json"]
    summary["decode_rc"] = subprocess.run(decode, env=env, timeout=330).returncode
    if not args.skip_train:
        train = [sys.executable, "-m", "loopcoder", "bench", "train", "--device", "cuda",
                 "--out", f"{args.out}/train_gpu.json"]
        try:
            summary["train_rc"] = subprocess.run(train, env=env, timeout=180).returncode
        except subprocess.TimeoutExpired:
            summary["train_rc"] = "timeout"
    with open(f"{args.out}/gpu_check.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0 if all(summary["correctness"].values()) and summary["decode_rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
