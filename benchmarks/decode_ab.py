"""Decode latency of two source trees of loopcoder (before / after a change), in one run.

Each tree runs in its own worker process (PYTHONPATH = that tree, pinned threads) that builds the same
configurations as `loopcoder bench decode` (`EngineTimer`: an engine whose cache is filled to the
context, timed with `Engine.decode_step`). The coordinator makes the trees take turns: for every round,
every configuration runs `--steps` steps in tree A, then in tree B (the order alternating), so the slow
drift of a shared machine hits both alike. Reported per configuration: the median over rounds of the
ratio B / A of the two round medians, with the spread of those ratios, in wall time (what
`bench decode` reports) and in the worker thread's CPU time (less hit by other processes on a shared
machine: time spent descheduled does not count).

    PYTHONPATH=src python3 benchmarks/decode_ab.py --a /path/to/old/src --b src --threads 1
    PYTHONPATH=src python3 benchmarks/decode_ab.py --before 16243ec --threads 1   # A: that revision's src/

`--before REV` extracts a git revision's `src/` to a temporary directory as tree A (B: this checkout's
`src/` unless `--b` says otherwise). The workers import only what every revision has (`loopcoder.bench.decode`
and the package's lazy `loopcoder.PLTForCausalLM`), so trees before and after a move of modules compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli_startup import extract  # a revision's src/, as the start-up benchmark extracts it


def worker(args: argparse.Namespace) -> None:
    import torch

    import loopcoder
    from loopcoder.bench.decode import DecodeBenchSettings, EngineTimer, build_model

    PLTForCausalLM = loopcoder.PLTForCausalLM  # the lazy export: every revision has it, wherever the module is

    torch.set_num_threads(args.threads)
    shape = json.loads(args.shape)
    s = DecodeBenchSettings(
        **shape,
        contexts=tuple(args.contexts),
        batches=tuple(args.batches),
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        loops=(args.loops,),
    )
    dev = torch.device("cpu")
    R = args.loops
    models = {
        "R=1": build_model(PLTForCausalLM, s.model_config(1), dev, torch.float32, s.seed),
        f"PLT-{R}": build_model(PLTForCausalLM, s.model_config(R), dev, torch.float32, s.seed),
        f"vanilla-{R}": build_model(PLTForCausalLM, s.model_config(R, "vanilla"), dev, torch.float32, s.seed),
    }
    timers: dict[str, EngineTimer] = {}
    for b in s.batches:
        for c in s.contexts:
            single = EngineTimer(models[f"PLT-{R}"], "parallel", b, c, s)
            timers[f"R=1 b={b} ctx={c}"] = EngineTimer(models["R=1"], "parallel", b, c, s)
            timers[f"PLT-{R} single-pass b={b} ctx={c}"] = single
            timers[f"PLT-{R} sequential b={b} ctx={c}"] = EngineTimer(
                models[f"PLT-{R}"], "sequential", b, c, s, share=single
            )
            timers[f"vanilla-{R} b={b} ctx={c}"] = EngineTimer(models[f"vanilla-{R}"], "sequential", b, c, s)
    print(json.dumps({"ready": list(timers)}), flush=True)
    for line in sys.stdin:
        name = json.loads(line)["run"]
        t = timers[name]
        cpu = time.thread_time()  # one thread: the step's own CPU time, less hit by other processes than wall time
        t.run(s.steps)
        print(json.dumps({"median_s": t.rounds[-1], "cpu_s": (time.thread_time() - cpu) / s.steps}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", help="source tree A (the 'before'), e.g. a worktree's src")
    ap.add_argument("--b", help="source tree B (the 'after'; default with --before: this checkout's src)")
    ap.add_argument("--before", help="git revision whose src/ is tree A (extracted to a temporary directory)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=lambda x: [int(v) for v in x.split(",")], default=[1, 8])
    ap.add_argument("--contexts", type=lambda x: [int(v) for v in x.split(",")], default=[512, 2048])
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shape", default="{}", help="DecodeBenchSettings shape fields as JSON (default: bench decode's)")
    ap.add_argument("--out", default=None, help="JSON report path")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            args.a = str(extract(args.before, Path(tmp)))
            args.b = args.b or str(Path(__file__).resolve().parents[1] / "src")
        if not (args.a and args.b):
            ap.error("give --a and --b, or --before REV")
        compare(args)


def compare(args: argparse.Namespace) -> None:
    fwd = [
        "--threads",
        str(args.threads),
        "--batches",
        ",".join(map(str, args.batches)),
        "--contexts",
        ",".join(map(str, args.contexts)),
        "--loops",
        str(args.loops),
        "--steps",
        str(args.steps),
        "--rounds",
        str(args.rounds),
        "--warmup",
        str(args.warmup),
        "--shape",
        args.shape,
        "--a",
        args.a,
        "--b",
        args.b,
    ]
    procs = {}
    for side in ("a", "b"):
        env = {**os.environ, "PYTHONPATH": os.path.abspath(getattr(args, side)), "OMP_NUM_THREADS": str(args.threads)}
        procs[side] = subprocess.Popen(
            [sys.executable, __file__, "--worker", *fwd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
    names = None
    for p in procs.values():
        got = json.loads(p.stdout.readline())["ready"]
        names = names or got
        assert got == names
    medians: dict[str, dict[str, list[float]]] = {n: {"a": [], "b": [], "a_cpu": [], "b_cpu": []} for n in names}
    for rnd in range(args.rounds):
        for k, name in enumerate(names):
            for side in ("a", "b") if (rnd + k) % 2 == 0 else ("b", "a"):
                procs[side].stdin.write(json.dumps({"run": name}) + "\n")
                procs[side].stdin.flush()
                got = json.loads(procs[side].stdout.readline())
                medians[name][side].append(got["median_s"])
                medians[name][side + "_cpu"].append(got["cpu_s"])
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    rows = []
    print(
        f"{'configuration':<36} {'A ms':>8} {'B ms':>8} {'B/A':>6} {'range over rounds':>17} {'CPU-time B/A':>13} "
        f"{'range':>13}"
    )
    for name, m in medians.items():
        ratios = sorted(b / a for a, b in zip(m["a"], m["b"]))
        cpu = sorted(b / a for a, b in zip(m["a_cpu"], m["b_cpu"]))
        row = {
            "config": name,
            "a_ms": statistics.median(m["a"]) * 1e3,
            "b_ms": statistics.median(m["b"]) * 1e3,
            "ratio": statistics.median(ratios),
            "ratio_min": ratios[0],
            "ratio_max": ratios[-1],
            "cpu_ratio": statistics.median(cpu),
            "cpu_ratio_min": cpu[0],
            "cpu_ratio_max": cpu[-1],
            "rounds": m,
        }
        rows.append(row)
        print(
            f"{name:<36} {row['a_ms']:>8.2f} {row['b_ms']:>8.2f} {row['ratio']:>6.3f} {ratios[0]:>8.3f} - "
            f"{ratios[-1]:.3f} {row['cpu_ratio']:>13.3f} {cpu[0]:>6.3f} - {cpu[-1]:.3f}"
        )
    every = [r["ratio"] for r in rows]
    every_cpu = [r["cpu_ratio"] for r in rows]
    print(
        f"median over configurations: B/A {statistics.median(every):.3f}, "
        f"CPU-time B/A {statistics.median(every_cpu):.3f}"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
