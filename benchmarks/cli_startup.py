"""How long `loopcoder --help`, `loopcoder CMD --help` and `--version` take, before and after a change.

    python benchmarks/cli_startup.py --before f1997b4 --rounds 10 --out cli_startup.json

`--before REV` is a git revision of this repository (its `src/` is extracted to a temporary directory);
the other side is this checkout's `src/`. Each command runs as `python -m loopcoder ARGS` with
`PYTHONPATH` set to one side's `src`, one thread (`OMP_NUM_THREADS=1`). The two sides take turns
within every round (before, after, after, before, ...), so drifting load hits both alike. Reported per
command: median wall and CPU (user + system) seconds of each side, and the median of the per-round
ratios before / after. Also whether the command imported torch (`-X importtime`, one extra run each).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [["--help"], ["--version"], ["generate", "--help"], ["train", "--help"], ["data", "build", "--help"]]


def run_once(src: Path, argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one `python -m loopcoder ARGV` on `src`."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loopcoder", *argv], env=env, capture_output=True, timeout=300)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def imports_torch(src: Path, argv: list[str]) -> bool:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "loopcoder", *argv], env=env, capture_output=True, text=True
    )
    return any(line.split("|")[-1].strip() == "torch" for line in r.stderr.splitlines())


def extract(rev: str, into: Path) -> Path:
    archive = into / "src.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], stdout=f, check=True)
    with tarfile.open(archive) as t:
        t.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"before": extract(args.before, Path(tmp)), "after": ROOT / "src"}
        times = {(" ".join(c), s): [] for c in COMMANDS for s in sides}
        load = [os.getloadavg()[0]]
        for i in range(args.rounds):
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for argv in COMMANDS:
                for side in order:
                    times[" ".join(argv), side].append(run_once(sides[side], argv))
            load.append(os.getloadavg()[0])
        torch = {(" ".join(c), s): imports_torch(sides[s], c) for c in COMMANDS for s in sides}
    report = {"before": args.before, "rounds": args.rounds, "threads": 1, "load_1min": load, "commands": {}}
    print(f"{args.rounds} rounds, 1 thread, 1-minute load average {min(load):.1f}-{max(load):.1f}")
    header = ("command", "before wall", "after wall", "ratio", "before CPU", "after CPU")
    print(f"{header[0]:<24} {header[1]:>11} {header[2]:>10} {header[3]:>6} {header[4]:>10} {header[5]:>9}  torch")
    for argv in COMMANDS:
        name = " ".join(argv)
        b, a = times[name, "before"], times[name, "after"]
        row = {
            "before_wall_s": statistics.median(w for w, _ in b),
            "after_wall_s": statistics.median(w for w, _ in a),
            "before_cpu_s": statistics.median(c for _, c in b),
            "after_cpu_s": statistics.median(c for _, c in a),
            "wall_ratio": statistics.median(x[0] / y[0] for x, y in zip(b, a)),
            "imports_torch": {"before": torch[name, "before"], "after": torch[name, "after"]},
        }
        report["commands"][name] = row
        print(
            f"{name:<24} {row['before_wall_s']:>10.2f}s {row['after_wall_s']:>9.2f}s {row['wall_ratio']:>5.0f}x "
            f"{row['before_cpu_s']:>9.2f}s {row['after_cpu_s']:>8.2f}s  "
            f"{'yes' if torch[name, 'before'] else 'no'} -> {'yes' if torch[name, 'after'] else 'no'}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
