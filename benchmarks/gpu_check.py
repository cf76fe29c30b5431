"""The GPU check: one command, about five minutes on one GPU.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out $OUT [--budget 300]
    PYTHONPATH=src python3 benchmarks/gpu_check.py --smoke --out /tmp/gpu   # rehearse the orchestration on CPU

Stages, most important first; each has its own time limit inside --budget and a failure in one does not
stop the others (its error is recorded):
1. correctness on CUDA: engine greedy tokens (single-pass, sequential, fixed shapes, CUDA graphs) equal
   full recompute for R = 1..3 in fp32; bf16 single-pass and sequential logits agree; the flex_attention
   training forward and backward match SDPA;
2. the decode benchmark in bf16 with CUDA graphs at batch 1 and 32, contexts 512 and 2048;
3. the training benchmark (tokens/s, MFU) of PLT R = 1, 2, 3 against transformers' Llama;
4. the real commands: `loopcoder data build`, `loopcoder train` (bf16 autocast, flex_attention),
   `loopcoder generate` on its checkpoint;
5. the decode benchmark at batch 256 (contexts 512 and 1024);
6. the training benchmark with flex_attention.
Writes gpu_check.json, gpu_check.log and each benchmark's JSON under --out; prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

PY = sys.executable


class Check:
    def __init__(self, out: Path, budget: float, smoke: bool) -> None:
        self.out, self.smoke = out, smoke
        self.deadline = time.monotonic() + budget
        self.summary: dict = {"stages": {}}
        self.log = open(out / "gpu_check.log", "a")  # noqa: SIM115 (open for the whole run)
        self.device = "cpu" if smoke else "cuda"
        self.only: set[str] = set()

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str, limit: float, fn, *args) -> None:
        """Run one stage if at least 20 s of the budget are left; record ok / error / skipped and its time."""
        if self.only and name not in self.only:
            return
        limit = min(limit, self.left() - 5)
        if limit < 20:
            self.summary["stages"][name] = {"status": "skipped (budget)"}
            self.say(f"== {name}: skipped, {self.left():.0f} s of the budget left")
            return
        self.say(f"== {name} (limit {limit:.0f} s)")
        t0 = time.monotonic()
        try:
            result = fn(limit, *args)
            ok = result is None or result is True or (type(result) is int and result == 0)  # 1 == True in Python
            status = "ok" if ok else f"failed ({result})"
        except Exception as e:  # record and go on: the other stages still run
            self.say(traceback.format_exc())
            status = f"error: {type(e).__name__}: {e}"[:500]
        self.summary["stages"][name] = {"status": status, "seconds": round(time.monotonic() - t0, 1)}
        self.say(f"== {name}: {status} in {time.monotonic() - t0:.0f} s")

    def command(self, limit: float, args: list[str], env: dict | None = None) -> int | str:
        """A subprocess whose output goes to the log and to stdout; killed at `limit` seconds."""
        self.say("$ " + " ".join(args))
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
        end = time.monotonic() + limit
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        while True:
            line = proc.stdout.readline()
            if line:
                self.say(line.rstrip())
                continue
            if proc.poll() is not None:
                rest = proc.stdout.read()
                if rest:
                    self.say(rest.rstrip())
                return proc.returncode
            if time.monotonic() > end:
                proc.kill()
                proc.wait()
                return "timeout"
            time.sleep(0.05)


# ----------------------------------------------------------------------------- 1. correctness
def correctness(limit: float, check: Check) -> bool:
    from loopcoder.inference.engine import Engine
    from loopcoder.inference.sampling import SamplingParams
    from loopcoder.model.modeling import PLTForCausalLM
    from loopcoder.model.shape import ModelShape

    dev = check.device
    results: dict[str, object] = {}
    prompts = [[5, 9, 11, 3, 7, 8, 2], [4, 6, 10], list(range(1, 40))]

    def tiny(R: int, dtype=torch.float32) -> PLTForCausalLM:
        torch.manual_seed(0)
        cfg = ModelShape(
            loops=R,
            hidden_size=64,
            layers=2,
            heads=4,
            kv_heads=2,
            intermediate_size=128,
            window=8,
            vocab_size=97,
            max_position_embeddings=128,
        ).plt_config(eos_token_id=None)
        model = PLTForCausalLM(cfg)
        with torch.no_grad():  # gates away from their zero init, so the local branch matters
            for layer in model.model.layers:
                if layer.self_attn.plt_gate is not None:
                    layer.self_attn.plt_gate.weight.normal_(0, 0.5)
                    layer.self_attn.plt_gate.bias.normal_(0, 1.0)
        return model.to(dev, dtype).eval()

    modes = {"parallel": {}, "sequential": {"mode": "sequential"}, "static": {"static_shapes": True}}
    if dev == "cuda":
        modes["cuda_graphs"] = {"cuda_graphs": True}
    for R in (1, 2, 3):
        model = tiny(R)
        expected = []
        with torch.no_grad():
            for p in prompts:
                seq = torch.tensor([p], device=dev)
                for _ in range(12):
                    seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
                expected.append(seq[0, len(p) :].tolist())
        for name, kw in modes.items():
            try:
                engine = Engine(tiny(R), max_batch=2, max_seq_len=96, **kw)
                got = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=12))]
                results[f"R={R} {name} == recompute"] = got == expected
            except Exception as e:
                results[f"R={R} {name} == recompute"] = f"error: {type(e).__name__}: {e}"[:300]
    # bf16: one step of single-pass vs sequential decoding (the same numbers up to bf16 rounding)
    try:
        model = tiny(3, torch.bfloat16)
        logits = {}
        for mode in ("parallel", "sequential"):
            engine = Engine(model, max_batch=2, max_seq_len=96, mode=mode)
            engine.add_request(prompts[0], SamplingParams(max_new_tokens=4))
            engine.add_request(prompts[2], SamplingParams(max_new_tokens=4))
            engine.step()
            with torch.inference_mode():
                logits[mode] = engine.decode_step(torch.tensor([1, 2], device=dev), 2).float()
        diff = (logits["parallel"] - logits["sequential"]).abs().max().item()
        results["bf16 single-pass vs sequential max |dlogit|"] = diff
        results["bf16 single-pass vs sequential close"] = diff < 0.05 * logits["parallel"].abs().max().item()
    except Exception as e:
        results["bf16 single-pass vs sequential close"] = f"error: {type(e).__name__}: {e}"[:300]
    if dev == "cuda":
        results.update(flex_matches_sdpa())
    for k, v in results.items():
        check.say(f"  {k}: {v}")
    check.summary["correctness"] = results
    return all(v is True for v in results.values() if isinstance(v, (bool, str)))  # numbers are figures


def flex_matches_sdpa() -> dict[str, object]:
    """Training forward and backward with flex_attention (compiled, block-sparse masks) against SDPA."""
    from loopcoder.model.modeling import PLTForCausalLM
    from loopcoder.model.shape import ModelShape

    out: dict[str, object] = {}
    try:
        torch.manual_seed(0)
        cfg = ModelShape(
            loops=2,
            hidden_size=256,
            layers=2,
            heads=4,
            kv_heads=2,
            intermediate_size=512,
            window=64,
            vocab_size=256,
            max_position_embeddings=1024,
        ).plt_config()
        model = PLTForCausalLM(cfg).cuda()
        ids = torch.randint(0, 256, (2, 512), device="cuda")
        got = {}
        for impl in ("sdpa", "flex_attention"):
            model.config._attn_implementation = impl
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids).loss
            loss.backward()
            got[impl] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        model.config._attn_implementation = "sdpa"
        (a, ga), (b, gb) = got["sdpa"], got["flex_attention"]
        rel = ((ga - gb).norm() / ga.norm()).item()
        out["flex vs sdpa loss"] = [a, b]
        out["flex vs sdpa grad rel. error"] = rel
        out["flex == sdpa (fp32, loss 1e-4, grads 1e-3)"] = abs(a - b) < 1e-4 * abs(a) and rel < 1e-3
    except Exception as e:
        out["flex == sdpa (fp32, loss 1e-4, grads 1e-3)"] = f"error: {type(e).__name__}: {e}"[:300]
    return out


# ----------------------------------------------------------------------------- benchmarks and commands
DECODE_SHAPE = [
    "--hidden-size",
    "4096",
    "--layers",
    "8",
    "--heads",
    "32",
    "--kv-heads",
    "8",
    "--head-dim",
    "128",
    "--intermediate-size",
    "11008",
    "--vocab-size",
    "32000",
]
TRAIN_SHAPE = [
    "--hidden-size",
    "2048",
    "--layers",
    "8",
    "--heads",
    "16",
    "--kv-heads",
    "4",
    "--intermediate-size",
    "5632",
    "--vocab-size",
    "32000",
    "--batch",
    "8",
    "--seq-len",
    "2048",
]
SMOKE_DECODE = [
    "--hidden-size",
    "64",
    "--layers",
    "2",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--head-dim",
    "16",
    "--intermediate-size",
    "128",
    "--vocab-size",
    "256",
    "--loops",
    "2",
]
SMOKE_TRAIN = [
    "--hidden-size",
    "64",
    "--layers",
    "2",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--intermediate-size",
    "128",
    "--vocab-size",
    "256",
    "--batch",
    "2",
    "--seq-len",
    "64",
]


def decode_bench(limit: float, check: Check, batches: str, contexts: str, name: str) -> int | str:
    shape = SMOKE_DECODE if check.smoke else DECODE_SHAPE
    extra = ["--dtype", "float32"] if check.smoke else ["--dtype", "bfloat16"]
    graphs_ok = all(v is True for k, v in check.summary.get("correctness", {}).items() if "cuda_graphs" in k)
    if not check.smoke and graphs_ok:  # a failed capture would sink the whole benchmark: time it without
        extra.append("--cuda-graphs")
    check.summary.setdefault("decode_cuda_graphs", {})[name] = "--cuda-graphs" in extra
    return check.command(
        limit,
        [
            PY,
            "-m",
            "loopcoder",
            "bench",
            "decode",
            "--device",
            check.device,
            *extra,
            "--batches",
            batches,
            "--contexts",
            contexts,
            *shape,
            "--steps",
            "10",
            "--rounds",
            "3",
            "--warmup",
            "5",
            "--out",
            str(check.out / name),
        ],
    )


def train_bench(limit: float, check: Check, attention: str, name: str) -> int | str:
    shape = SMOKE_TRAIN if check.smoke else TRAIN_SHAPE
    return check.command(
        limit,
        [
            PY,
            "-m",
            "loopcoder",
            "bench",
            "train",
            "--device",
            check.device,
            *shape,
            "--attention",
            attention,
            "--steps",
            "5",
            "--rounds",
            "2",
            "--out",
            str(check.out / name),
        ],
    )


def commands(limit: float, check: Check) -> int | str:
    """data build -> train (bf16 autocast on CUDA, flex_attention) -> generate on the final checkpoint."""
    end = time.monotonic() + limit
    work = Path("/tmp/gpu_check_work")
    data, run = work / "data", work / "train"
    rc = check.command(
        end - time.monotonic(),
        [PY, "-m", "loopcoder", "data", "build", "--source", "stdlib", "--out", str(data), "--vocab-size", "4096"],
    )
    if rc != 0:
        return f"data build: {rc}"
    attention = "sdpa" if check.smoke else "flex_attention"
    rc = check.command(
        end - time.monotonic(),
        [
            PY,
            "-m",
            "loopcoder",
            "train",
            "--preset",
            "tiny",
            f"data.dir={data}",
            f"out={run}",
            "model.loops=2",
            "train.steps=60",
            f"train.device={check.device}",
            f"train.attention={attention}",
            "eval.every=30",
            "checkpoint.every=30",
            "logging.progress=lines",
        ],
    )
    if rc != 0:
        return f"train: {rc}"
    summary = json.loads((run / "summary.json").read_text())
    (check.out / "train_run_summary.json").write_text(json.dumps(summary, indent=1))
    check.summary["train_run"] = summary
    return check.command(
        end - time.monotonic(),
        [
            PY,
            "-m",
            "loopcoder",
            "generate",
            "--model",
            summary["final_checkpoint"],
            "--prompt",
            "def parse(",
            "--max-new-tokens",
            "32",
            "--device",
            check.device,
        ],
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"))
    ap.add_argument("--budget", type=float, default=300, help="seconds for all stages together")
    ap.add_argument("--smoke", action="store_true", help="rehearse on CPU with tiny shapes")
    ap.add_argument(
        "--stages",
        default="",
        help="comma-separated stages to run (default: all): correctness, "
        "decode-small, train-sdpa, commands, decode-256, train-flex",
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget, args.smoke)
    check.only = {x.strip() for x in args.stages.split(",") if x.strip()}
    if not args.smoke and not torch.cuda.is_available():
        check.say("no CUDA device")
        return 2
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)"
    check.summary.update(device=name, torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"))
    check.say(f"{name}, torch {torch.__version__}")
    small = "1" if args.smoke else "1,32"
    check.stage("correctness", 60, correctness, check)
    check.stage("decode-small", 110, decode_bench, check, small, "512,2048", "decode_gpu.json")
    check.stage("train-sdpa", 70, train_bench, check, "sdpa", "train_gpu.json")
    check.stage("commands", 90, commands, check)
    # batch 256 at context 1024: vanilla-4's K/V alone would be 71 GB at 2048
    check.stage("decode-256", 60, decode_bench, check, "2" if args.smoke else "256", "512,1024", "decode_gpu_b256.json")
    if not args.smoke:
        check.stage("train-flex", 60, train_bench, check, "flex_attention", "train_gpu_flex.json")
    (out / "gpu_check.json").write_text(json.dumps(check.summary, indent=2, default=str))
    check.say(json.dumps(check.summary["stages"], indent=1))
    return 0 if all(v["status"] == "ok" for v in check.summary["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
