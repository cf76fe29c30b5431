"""Why the depth probe trains its runs side by side, one thread each: throughput of the study's own
training runs (`loopcoder.study.depth.train_run`, the tiny preset's settings, fewer steps) done
(a) one after another with two threads each, and (b) two at a time in a process pool, one thread each.
The two ways take turns for --rounds rounds, so a change in the machine's load hits both alike; the
figure is the ratio of their wall times for the same runs.

    PYTHONPATH=src python3 benchmarks/study_workers.py [--steps 300 --rounds 3 --out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from loopcoder.study import get_preset
from loopcoder.study.depth import train_run
from loopcoder.study.presets import PLT2, R1


def _settings(steps: int, threads: int):
    s = get_preset("tiny").depth
    train = dataclasses.replace(
        s.train,
        train=dataclasses.replace(s.train.train, steps=steps, threads=threads),
        eval=dataclasses.replace(s.train.eval, every=0, at_end=False),
    )
    return dataclasses.replace(s, train=train)


def _warm() -> int:
    import loopcoder.training  # noqa: F401  (the workers' imports stay out of the timings)

    return os.getpid()


def _jobs(root: Path, tag: str) -> list[tuple]:
    return [(m, 0, str(root / f"{tag}-{m.key}")) for m in (R1, PLT2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    serial_s: list[float] = []
    pool_s: list[float] = []
    loads: list[float] = []
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(2, mp_context=ctx) as pool:
        while len({f.result() for f in [pool.submit(_warm) for _ in range(4)]}) < 2:
            pass  # until both workers have started
        for r in range(args.rounds):
            root = Path(tmp) / f"round{r}"
            t0 = time.perf_counter()
            for job in _jobs(root, "serial"):
                train_run(_settings(args.steps, 2), *job)
            serial_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            futures = [pool.submit(train_run, _settings(args.steps, 1), *job) for job in _jobs(root, "pool")]
            [f.result() for f in futures]
            pool_s.append(time.perf_counter() - t0)
            loads.append(os.getloadavg()[0])
            print(
                f"round {r}: one after another, 2 threads: {serial_s[-1]:.1f} s; two at a time, 1 thread: "
                f"{pool_s[-1]:.1f} s (load average {loads[-1]:.1f})",
                flush=True,
            )
            result = {
                "steps": args.steps,
                "runs": ["r1", "plt2"],
                "serial_2_threads_s": serial_s,
                "pool_1_thread_s": pool_s,
                "speedup_median": statistics.median(s / p for s, p in zip(serial_s, pool_s)),
                "loadavg_1min_after_each_round": loads,
                "cpus": os.cpu_count(),
                "when": time.strftime("%Y-%m-%d %H:%M"),
            }
            if args.out:  # after every round: a long measurement keeps what it has
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"two at a time, one thread each, is {result['speedup_median']:.2f}x the throughput "
        f"(load average {loads[-1]:.1f} on {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
