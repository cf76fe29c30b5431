"""What one sandboxed run costs, before and after a change to the sandbox, measured in pairs.

    PYTHONPATH=src python3 benchmarks/sandbox_overhead.py [--before main] [--rounds 200] [--cpu 0]

The "before" sandbox is `src/loopcoder/evaluation/sandbox.py` as it is at git revision `--before`,
loaded beside the current one; the current one also runs with its private filesystem switched off,
which isolates what the mount namespace costs. Each round runs the same trivial program once with
each (in random order), everything pinned to one CPU, so that load from other processes hits all of
a round alike; the figures to read are the medians of the paired differences, of wall time and of
the CPU time of the run's processes (launcher, init, program).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from loopcoder.evaluation import sandbox as after

PROGRAM = "assert sum(range(10)) == 45\n"


def load_before(revision: str) -> ModuleType:
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{revision}:src/loopcoder/evaluation/sandbox.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    try:
        spec = importlib.util.spec_from_file_location("sandbox_before", f.name)
        module = importlib.util.module_from_spec(spec)
        sys.modules["sandbox_before"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    finally:
        os.remove(f.name)
    return module


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every reaped descendant: launcher, init, program
    return usage.ru_utime + usage.ru_stime


def timed(module: ModuleType, private_filesystem: bool = True) -> tuple[float, float]:
    """Wall seconds of one run, and CPU seconds of its processes."""
    if module is after:
        after._PRIVATE_FILESYSTEM = private_filesystem
    cpu, start = cpu_of_children(), time.perf_counter()
    result = module.run_program(PROGRAM, allow_code_execution=True)
    wall = time.perf_counter() - start
    if not result.passed:
        raise SystemExit(f"{module.__name__}: the trivial program did not pass: {result.reason}")
    return wall, cpu_of_children() - cpu


def summary(samples: dict[str, list[float]]) -> dict[str, object]:
    """Per side: the median, and the median and quartiles of its paired differences to "before" (ms)."""
    out: dict[str, object] = {}
    for side, values in samples.items():
        ms = {"median": round(1000 * statistics.median(values), 2)}
        if side != "before":
            diffs = [x - b for x, b in zip(values, samples["before"])]
            q = statistics.quantiles(diffs, n=4)
            ms["minus_before_median"] = round(1000 * statistics.median(diffs), 2)
            ms["minus_before_quartiles"] = [round(1000 * q[0], 2), round(1000 * q[2], 2)]
        out[side] = ms
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="main", help="git revision of the sandbox to compare against")
    ap.add_argument("--rounds", type=int, default=200, help="rounds; each runs every side once")
    ap.add_argument("--cpu", type=int, default=0, help="the one CPU everything runs on")
    a = ap.parse_args()
    os.sched_setaffinity(0, {a.cpu})  # the sandbox's processes inherit it
    before = load_before(a.before)
    # The current sandbox also without its private filesystem: what the mount namespace alone costs.
    sides = {"before": (before, True), "after": (after, True), "after, no private filesystem": (after, False)}
    for module, fs in sides.values():  # the interpreter check and a warm page cache, outside the timing
        for _ in range(5):
            timed(module, fs)
    rng = random.Random(0)
    wall: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(a.rounds):
        order = list(sides)
        rng.shuffle(order)
        for side in order:
            w, c = timed(*sides[side])
            wall[side].append(w)
            cpu[side].append(c)
    after._PRIVATE_FILESYSTEM = True
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "before": a.before,
        "rounds": a.rounds,
        "cpu": a.cpu,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "wall_ms": summary(wall),
        "cpu_of_the_runs_processes_ms": summary(cpu),
        "isolation_after": after.isolation_report(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
