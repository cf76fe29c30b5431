"""`loopcoder generate` with the default threads, one thread and every core, while other processes load the CPUs.

    python benchmarks/threads.py --rounds 5 --load 2 --out benchmarks/results/threads.json

Builds a model with `loopcoder init` (its defaults: hidden 256, 4 layers, R = 2, vocabulary 4096), starts
`--load` busy-looping processes (another job on the machine), then runs `loopcoder generate` for 32
tokens with each setting in turn, `--rounds` times, and reads the decode time the command prints. The
settings take turns within each round, so drifting load hits all of them alike; the report gives the
median and the median of the per-round ratios to the default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def loopcoder(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The `loopcoder` a user would type (else this Python's): only the decode time it prints is used."""
    command = [shutil.which("loopcoder", path=env.get("PATH")) or sys.executable, *args]
    if not command[0].endswith("loopcoder"):
        command[1:1] = ["-m", "loopcoder"]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--load", type=int, default=os.cpu_count(), help="busy-looping processes (0: none)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args()

    cpus = len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(SRC)
    settings = {"default": [], "1": ["--threads", "1"], f"all ({cpus})": ["--threads", str(cpus)]}
    times: dict[str, list[float]] = {name: [] for name in settings}
    chosen: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        r = loopcoder("init", "--out", str(model), env=env)
        assert r.returncode == 0, r.stderr
        load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
        try:
            time.sleep(2)
            for _ in range(args.rounds):
                for name, flags in settings.items():
                    r = loopcoder(
                        "generate",
                        "--model",
                        str(model),
                        "--prompt",
                        "def fibonacci(n):",
                        "--max-new-tokens",
                        str(args.tokens),
                        *flags,
                        env=env,
                    )
                    m = re.search(r"\[(\d+) tokens in ([0-9.]+)s.*threads=(\d+)", r.stderr)
                    assert r.returncode == 0 and m, r.stderr
                    times[name].append(float(m.group(2)))
                    if name == "default":
                        chosen.append(m.group(3))
        finally:
            for p in load:
                p.kill()
                p.wait()
    report = {
        "cpus": cpus,
        "load_processes": args.load,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "default_threads_chosen": chosen,
        "seconds": times,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "median_ratio_to_default": {
            k: statistics.median(a / b for a, b in zip(v, times["default"])) for k, v in times.items()
        },
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "loadavg_end": os.getloadavg(),
    }
    print(
        f"generate, {args.tokens} tokens, {cpus} CPUs, {args.load} busy processes, {args.rounds} rounds "
        f"(default chose {', '.join(chosen)} threads)"
    )
    for name in settings:
        print(
            f"  threads {name:<8} median {report['median_s'][name]:7.2f} s   per-round ratio to default "
            f"{report['median_ratio_to_default'][name]:6.2f}   all: {', '.join(f'{t:.2f}' for t in times[name])}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
