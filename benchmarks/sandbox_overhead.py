"""What one sandboxed run costs, before and after a change to the sandbox, measured in pairs.

    PYTHONPATH=src python3 benchmarks/sandbox_overhead.py [--before main] [--rounds 200] [--cpu 0]
    PYTHONPATH=src python3 benchmarks/sandbox_overhead.py --humaneval [--repeats 3] [--workers 2]

The "before" sandbox is `src/loopcoder/evaluation/sandbox.py` (with `sandbox_launcher.py`, where that
revision has one) as it is at git revision `--before`, loaded beside the current one. Each round runs
every side once, in random order, everything pinned to one CPU, so that load from other processes hits
all of a round alike; the figures to read are the medians of the paired differences, of wall time and
of the CPU time of the run's processes (launcher, init, program, checker; bash for a command).

Sides: a trivial program in the before and after sandboxes, both on the interpreter the before one
chose (`--python`, the system's by default), after also without its fork server (an interpreter per
run, as before) and on its default interpreter; after, the same program as a checked run (program and
checker in two processes); a command: `run_command("true")` in an empty workspace, with and without
the fork server, against a plain `subprocess.run(["bash", "-c", "true"])`. The fork server's own CPU
(receiving a request, forking) is not counted; it is small next to a run's.

`--humaneval` instead runs the 164 HumanEval canonical solutions through both sandboxes' checking
programs (before: one process, after: checked runs) on `--workers` workers, alternating, `--repeats`
times each, and reports programs per second and how many passed.

On a loaded machine the wall times mostly measure waiting for a CPU at each hand-off between the run's
processes. The sandbox starts each run in a session of its own (setsid: no controlling terminal), and
with the kernel's autogroup scheduling each session competes for the CPU as one group, whatever its
niceness; so the plain `bash -c true` is measured both in the benchmark's session and in its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from loopcoder.evaluation import channel
from loopcoder.evaluation import humaneval as humaneval_after
from loopcoder.evaluation import sandbox as after

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = "assert sum(range(10)) == 45\n"
CHECKED = after.Checked(
    channel.program_side("benchmark (the program)") + "_serve({'total': lambda n: sum(range(n))})\n",
    channel.checker_side("benchmark (the checker)") + "assert _remote('total')(10) == 45\n",
)


def git_show(revision: str, path: str) -> str | None:
    done = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{path}"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def load_before(revision: str) -> tuple[ModuleType, ModuleType]:
    """The sandbox and HumanEval modules of `revision`, loaded beside the current ones."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox-before-"))
    try:
        for name in ("sandbox", "sandbox_launcher", "cgroups", "channel"):
            text = git_show(revision, f"src/loopcoder/evaluation/{name}.py")
            if text is not None:
                (folder / f"{name}.py").write_text(text)
        # A package of its own: a sandbox that reads its launcher with importlib.resources finds it there.
        (folder / "__init__.py").write_text("")
        package = importlib.util.spec_from_file_location(
            "before", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        sys.modules["before"] = importlib.util.module_from_spec(package)
        package.loader.exec_module(sys.modules["before"])
        sandbox = _load(folder / "sandbox.py", "before.sandbox")
        # Its HumanEval module, with `loopcoder.evaluation.sandbox` meaning the before sandbox while it loads.
        (folder / "humaneval.py").write_text(git_show(revision, "src/loopcoder/evaluation/humaneval.py"))
        current = sys.modules["loopcoder.evaluation.sandbox"]
        sys.modules["loopcoder.evaluation.sandbox"] = sandbox
        try:
            humaneval = _load(folder / "humaneval.py", "before.humaneval")
        finally:
            sys.modules["loopcoder.evaluation.sandbox"] = current
    finally:
        shutil.rmtree(folder)
    return sandbox, humaneval


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every reaped descendant
    return usage.ru_utime + usage.ru_stime


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds of one run, and CPU seconds of its processes: those of our reaped children (exact),
    or where there are none (a launcher forked by the fork server is not our child) the result's
    `cpu_seconds`."""
    cpu, start = cpu_of_children(), time.perf_counter()
    result = run()
    wall = time.perf_counter() - start
    if not (result is True or getattr(result, "passed", False)):
        raise SystemExit("a side did not pass: the figures would be meaningless")
    children = cpu_of_children() - cpu
    reported = getattr(result, "cpu_seconds", None)
    return wall, children if children > 0 or reported is None else reported


def without_fork_server(run: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        after._FORK_SERVER = False
        try:
            return run()
        finally:
            after._FORK_SERVER = True

    return call


def summary(samples: dict[str, list[float]], baseline: str) -> dict[str, object]:
    """Per side: the median, and the median and quartiles of its paired differences to `baseline` (ms)."""
    out: dict[str, object] = {}
    for side, values in samples.items():
        ms: dict[str, object] = {"median": round(1000 * statistics.median(values), 2)}
        if side != baseline:
            diffs = [x - b for x, b in zip(values, samples[baseline])]
            q = statistics.quantiles(diffs, n=4)
            ms[f"minus_{baseline}_median"] = round(1000 * statistics.median(diffs), 2)
            ms[f"minus_{baseline}_quartiles"] = [round(1000 * q[0], 2), round(1000 * q[2], 2)]
        out[side] = ms
    return out


def per_run(a: argparse.Namespace, before: ModuleType) -> dict[str, object]:
    workspace = tempfile.mkdtemp(prefix="sandbox-bench-workspace-")
    program = lambda: after.run_program(PROGRAM, allow_code_execution=True, python=a.python)
    command = lambda: after.run_command("true", workspace=workspace, allow_code_execution=True)
    programs: dict[str, Callable[[], object]] = {
        "before": lambda: before.run_program(PROGRAM, allow_code_execution=True, python=a.python).passed,
        "after": program,
        "after, interpreter per run (no fork server)": without_fork_server(program),
        "after, default interpreter": lambda: after.run_program(PROGRAM, allow_code_execution=True),
        "after, checked run": lambda: after.run_program(CHECKED, allow_code_execution=True, python=a.python),
    }
    commands: dict[str, Callable[[], object]] = {
        "plain bash -c true": lambda: subprocess.run(["bash", "-c", "true"]).returncode == 0,
        "plain bash -c true, own session": lambda: (
            subprocess.run(["bash", "-c", "true"], start_new_session=True).returncode == 0
        ),
        "run_command true": command,
        "run_command true, interpreter per run (no fork server)": without_fork_server(command),
    }
    sides = {**programs, **commands}
    for run in sides.values():  # the interpreter checks and a warm page cache, outside the timing
        for _ in range(5):
            timed(run)
    rng = random.Random(0)
    wall: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(a.rounds):
        order = list(sides)
        rng.shuffle(order)
        for side in order:
            w, c = timed(sides[side])
            wall[side].append(w)
            cpu[side].append(c)
    ownership = after.run_command("true", workspace=workspace, allow_code_execution=True).isolation.get("workspace")
    shutil.rmtree(workspace)
    pick = lambda d, keys: {k: d[k] for k in keys}
    return {
        "programs": {
            "wall_ms": summary(pick(wall, programs), "before"),
            "cpu_of_the_runs_processes_ms": summary(pick(cpu, programs), "before"),
        },
        "commands": {
            "wall_ms": summary(pick(wall, commands), "plain bash -c true"),
            "cpu_of_the_runs_processes_ms": summary(pick(cpu, commands), "plain bash -c true"),
        },
        "isolation_after": after.isolation_report(),
        "command_workspace": ownership,
    }


def humaneval(a: argparse.Namespace, before: ModuleType, before_humaneval: ModuleType) -> dict[str, object]:
    problems = humaneval_after.load_problems()
    limits = {"cpu_seconds": 10, "wall_seconds": 20}
    old = [before_humaneval.check_program(p, p["canonical_solution"]) for p in problems]
    new = [humaneval_after.check_program(p, p["canonical_solution"]) for p in problems]
    sides = {
        "before (one process)": lambda: before.run_many(
            old, before.Limits(**limits), workers=a.workers, allow_code_execution=True, python=a.python
        ),
        "after (checked runs)": lambda: after.run_many(
            new, after.Limits(**limits), workers=a.workers, allow_code_execution=True, python=a.python
        ),
    }
    out: dict[str, dict[str, list[float]]] = {side: {"programs_per_second": [], "passed": []} for side in sides}
    for _ in range(a.repeats):
        for side, run in sides.items():
            batch = run()
            out[side]["programs_per_second"].append(round(batch.programs_per_second, 2))
            out[side]["passed"].append(sum(r.passed for r in batch.results))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="main", help="git revision of the sandbox to compare against")
    ap.add_argument("--rounds", type=int, default=200, help="rounds; each runs every side once")
    ap.add_argument("--cpu", type=int, default=0, help="the one CPU everything runs on (per-run sides)")
    ap.add_argument("--python", default="/usr/bin/python3", help="the interpreter both sandboxes use")
    ap.add_argument("--humaneval", action="store_true", help="HumanEval's 164 canonical solutions instead")
    ap.add_argument("--repeats", type=int, default=3, help="--humaneval: runs of the 164 per side")
    ap.add_argument("--workers", type=int, default=2, help="--humaneval: parallel sandboxes")
    a = ap.parse_args()
    before, before_humaneval = load_before(a.before)
    report: dict[str, object] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "before": a.before,
        "python": a.python,
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }
    if a.humaneval:
        report.update(repeats=a.repeats, workers=a.workers, humaneval=humaneval(a, before, before_humaneval))
    else:
        os.sched_setaffinity(0, {a.cpu})  # the sandbox's processes inherit it
        report.update(rounds=a.rounds, cpu=a.cpu, **per_run(a, before))
    report["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
