"""What the integrity checks cost: opening a data directory's shards (index.json, every header and file
size: at every training start), hashing every shard (at a start for data up to 1 GiB, and `loopcoder data
verify`), and hashing a model's weights into model_identity.json (every checkpoint and model written).

    python benchmarks/check_costs.py data/stdlib [--model runs/r2/checkpoints/step-000300] [--rounds 7]

The three take turns in each round; medians over rounds (the first round reads from disk, the rest from
the page cache, as a run's start usually does). One thread: hashing is single-threaded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loopcoder.data.shards import ShardDataset, read_index, verify_checksums
from loopcoder.model.checkpoint import write_random_model
from loopcoder.model.identity import write_identity
from loopcoder.utils.runtime import quiet_libraries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="a data directory from `loopcoder data build`")
    p.add_argument("--model", default=None, help="a model directory (default: a random tiny-preset model)")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    quiet_libraries()
    model = Path(args.model) if args.model else Path(tempfile.mkdtemp()) / "tiny"
    if args.model is None:
        write_random_model(model, loops=2, vocab_size=4096)
    splits = list(read_index(args.data)["splits"])
    times: dict[str, list[float]] = {"open": [], "hash": [], "identity": []}
    nbytes = 0
    for _ in range(args.rounds):
        t = time.perf_counter()
        datasets = [ShardDataset(args.data, s) for s in splits]
        times["open"].append(time.perf_counter() - t)
        t = time.perf_counter()
        nbytes = sum(verify_checksums(ds) for ds in datasets)
        times["hash"].append(time.perf_counter() - t)
        t = time.perf_counter()
        write_identity(model)
        times["identity"].append(time.perf_counter() - t)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(f"load average {os.getloadavg()[0]:.2f}; {args.rounds} rounds; median (first round)")
    print(f"open {len(splits)} splits' shards (index, headers, sizes): {_ms(times['open'])}")
    print(f"hash {nbytes / 1e6:.1f} MB of shards: {_ms(times['hash'])}, {nbytes / 1e6 / _med(times['hash']):.0f} MB/s")
    print(f"hash {weights / 1e6:.1f} MB of weights (model_identity.json): {_ms(times['identity'])}")


def _med(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def _ms(xs: list[float]) -> str:
    return f"{_med(xs) * 1e3:.1f} ms ({xs[0] * 1e3:.1f} ms)"


if __name__ == "__main__":
    main()
