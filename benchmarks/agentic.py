"""Engine-level parts of agentic serving: chunked prefill's effect on running streams, and what paging costs a
decode step. The agents' workload itself (time to first token, tokens/s, prefix hit rate and K/V in use, with
prefix caching and without) moved to `loopcoder bench serve --workload agentic`, over HTTP.

Each measurement is paired in one run (the machine is shared; ratios are what to read), through the engine's
public API, on a random model of `loopcoder init`'s default shape (4 layers, 256 wide, PLT-2, window 64):

1. gaps: `--streams` sequences decode; a `--prompt`-token prompt arrives. The running streams' inter-token gaps
   from its arrival to its first token, with the prompt prefilled in one piece (`max_step_tokens=None`, the old
   engine) and in chunks (the default budget of 256 tokens a step, and 64): median, p99 and max gap, against
   the median gap before it arrived (decode steps alone).
2. decode (not run by default): a decode step of 8 sequences at contexts 256 and 1024, paged against
   preallocated (`--parts decode`).

    PYTHONPATH=src python3 benchmarks/agentic.py --threads 1 [--out benchmarks/results/agentic.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import time

import torch

from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.model.shape import ModelShape

VOCAB = 4096


def build_model(loops: int) -> PLTForCausalLM:
    torch.manual_seed(0)
    shape = ModelShape(
        loops=loops,
        hidden_size=256,
        layers=4,
        heads=4,
        kv_heads=2,
        vocab_size=VOCAB,
        window=64,
        max_position_embeddings=8192,
    )
    return PLTForCausalLM(shape.plt_config()).eval()


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def gaps(model: PLTForCausalLM, args: argparse.Namespace) -> dict:
    out: dict = {}
    budgets = [int(b) for b in args.step_tokens.split(",")]
    for name, budget in [("one_piece", None)] + [(f"chunked_{b}", b) for b in budgets]:
        engine = Engine(
            model,
            max_batch=args.streams + 1,
            max_seq_len=args.max_seq_len,
            max_step_tokens=budget,
            prefix_caching=False,
        )
        rng = random.Random(7)
        streams = [
            engine.add_request(tokens(rng, 64), SamplingParams(max_new_tokens=10_000, ignore_eos=True))
            for _ in range(args.streams)
        ]
        times: list[float] = []
        for _ in range(30):  # decode only
            engine.step()
            times.append(time.perf_counter())
        before = [b - a for a, b in itertools.pairwise(times[10:])]
        long = engine.add_request(tokens(rng, args.prompt), SamplingParams(max_new_tokens=1, ignore_eos=True))
        arrived = time.perf_counter()
        during = [times[-1]]
        while not long.output_ids:
            n = len(streams[0].output_ids)
            engine.step()
            assert len(streams[0].output_ids) == n + 1
            during.append(time.perf_counter())
        for r in streams:
            engine.abort(r.id)
        g = sorted(b - a for a, b in itertools.pairwise(during))
        out[name] = {
            "max_step_tokens": budget,
            "median_gap_before_s": statistics.median(before),
            "median_gap_s": statistics.median(g),
            "p99_gap_s": g[min(len(g) - 1, int(0.99 * len(g)))],
            "max_gap_s": g[-1],
            "max_over_median": g[-1] / statistics.median(g),
            "max_over_median_before": g[-1] / statistics.median(before),
            "gaps": len(g),
            "prompt_ttft_s": during[-1] - arrived,
        }
    return out


def decode(model: PLTForCausalLM, args: argparse.Namespace) -> dict:
    """The price of paging for decoding: one decode step of 8 sequences, paged against preallocated, rounds
    taking turns (each reads every sequence's blocks through one gather per layer instead of a view)."""
    out: dict = {}
    for context in (256, 1024):
        engines = {p: Engine(model, max_batch=8, max_seq_len=2048, paged=p) for p in (False, True)}
        for e in engines.values():
            e.cache.fill_random(8, context, torch.Generator().manual_seed(0))
        tokens = torch.randint(3, VOCAB, (8,))
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds + 1):
            for paged, e in engines.items():
                t = time.perf_counter()
                for _ in range(10):
                    e.decode_step(tokens, 8)
                times[paged].append((time.perf_counter() - t) / 10)
        pre, pag = statistics.median(times[False][1:]), statistics.median(times[True][1:])
        out[f"context_{context}"] = {"preallocated_s": pre, "paged_s": pag, "paged_over_preallocated": pag / pre}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--loops", type=int, default=2)
    p.add_argument("--prompt", type=int, default=2500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--step-tokens", default="256,64", help="the chunked runs' max_step_tokens")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--parts", default="gaps", help="gaps, decode, or both (comma-separated)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.loops)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": args.threads,
        "load_average_before": os.getloadavg(),
        "settings": vars(args),
    }
    with torch.inference_mode():
        for part in args.parts.split(","):
            result[part] = globals()[part](model, args)
            print(json.dumps({part: result[part]}, indent=1), flush=True)
    result["load_average_after"] = os.getloadavg()
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
