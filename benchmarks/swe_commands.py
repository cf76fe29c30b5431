"""What the sandbox adds to each command of an SWE agent, measured in pairs.

    PYTHONPATH=src python3 benchmarks/swe_commands.py [--rounds 40] [--cpu 0]

The agent's commands run through `SandboxShell` (`loopcoder.evaluation.sandbox.run_command`: new
namespaces, a private filesystem, rlimits, a fresh uid and the workspace handed to it and back). The
same commands also run plainly (`bash -c` in a copy of the workspace, as mini-swe-agent's local
environment runs them). Each round runs every command once each way, in random order, everything
pinned to one CPU, in a real task repository (the `colorsys` module and its tests). The figures to
read are the medians of the paired differences (sandboxed - plain), of wall time and of CPU time (this
process and every process of the command): the sandbox's cost per agent command. The target is 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from loopcoder.evaluation.sandbox import isolation_report
from loopcoder.swe import catalog, repo, taskset
from loopcoder.swe.shell import SandboxShell

COMMANDS = {
    "true": "true",
    "ls": "ls -la",
    "git status": "git status --short",
    "grep": "grep -n 'def ' colorsys.py | head -5",
    "python3 -c pass": "python3 -c pass",
    "unittest (7 tests)": "python3 -m unittest -q tests.test_colorsys 2>&1 | tail -1",
}


def cpu_used() -> float:
    """CPU seconds of this process (the sandbox's parent side: setting up, handing the workspace over and
    back, reading the pipes) and of every reaped descendant (launcher, init, the command)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def plain(command: str, workspace: Path) -> None:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workspace), "LC_ALL": "C.UTF-8"}
    subprocess.run(["bash", "-c", command], cwd=workspace, env=env, capture_output=True, timeout=120)


def timed(run) -> tuple[float, float]:
    cpu, start = cpu_used(), time.perf_counter()
    run()
    return time.perf_counter() - start, cpu_used() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40, help="rounds; each runs every command both ways")
    ap.add_argument("--cpu", type=int, default=0, help="the one CPU everything runs on")
    a = ap.parse_args()
    os.sched_setaffinity(0, {a.cpu})
    shell = SandboxShell(allow_code_execution=True)
    with tempfile.TemporaryDirectory(prefix="swe-commands-") as d:
        boxed_ws, plain_ws = Path(d) / "boxed", Path(d) / "plain"
        repo.write_tree(boxed_ws, taskset.pristine_tree(catalog.BY_NAME["colorsys"]))
        repo.commit_tree(boxed_ws)
        shutil.copytree(boxed_ws, plain_ws)
        sides = {}
        for name, command in COMMANDS.items():
            sides[(name, "sandboxed")] = lambda c=command: shell(c, boxed_ws, timeout=60)
            sides[(name, "plain")] = lambda c=command: plain(c, plain_ws)
        for run in sides.values():  # the interpreter check and a warm page cache, outside the timing
            for _ in range(3):
                run()
        rng = random.Random(0)
        wall = {k: [] for k in sides}
        cpu = {k: [] for k in sides}
        for _ in range(a.rounds):
            order = list(sides)
            rng.shuffle(order)
            for key in order:
                w, c = timed(sides[key])
                wall[key].append(w)
                cpu[key].append(c)
    rows = {}
    for name in COMMANDS:
        row = {}
        for label, samples in (("wall_ms", wall), ("cpu_ms", cpu)):
            boxed, bare = samples[(name, "sandboxed")], samples[(name, "plain")]
            diffs = sorted(x - y for x, y in zip(boxed, bare))
            q = statistics.quantiles(diffs, n=4)
            row[label] = {
                "plain_median": round(1000 * statistics.median(bare), 1),
                "sandboxed_median": round(1000 * statistics.median(boxed), 1),
                "added_median": round(1000 * statistics.median(diffs), 1),
                "added_quartiles": [round(1000 * q[0], 1), round(1000 * q[2], 1)],
            }
        rows[name] = row
    print(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "rounds": a.rounds,
                "cpu": a.cpu,
                "load_average_1min": round(os.getloadavg()[0], 2),
                "commands": rows,
                "isolation": isolation_report(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
