"""Install every dependency at the lowest version pyproject.toml admits into a throwaway venv, then run tests.

    python tests/packaging/lower_bounds.py [--venv DIR] [--keep] [-- PYTEST ARGS]

torch stays at the version in constraints.txt (the CPU build on disk: a lower torch would be a CUDA download),
every other direct dependency is pinned to its `>=` bound; what they pull in is left to pip. Not part of
`make test`: the install takes minutes (docs/benchmarks.md has the measured time).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.packaging import ROOT, lower_bound, pins, requirements

DEFAULT_TESTS = [
    "tests/packaging",
    "tests/model",
    "tests/engine",
    "tests/evaluation",
    "tests/commands",
    "-m",
    "not slow",
    "-x",
    "-q",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", default=None, help="where to make the venv (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the venv afterwards")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest (default: the fast tests)")
    args = parser.parse_args(argv)
    venv = Path(args.venv or tempfile.mkdtemp(prefix="loopcoder-lower-"))
    venv.mkdir(parents=True, exist_ok=True)
    lowest = venv / "lower-bounds.txt"
    torch = pins()["torch"]
    lines = [f"{r.name}=={lower_bound(r)}" for r in requirements() if r.name != "torch"]
    text = "\n".join([f"torch=={torch}", *lines]) + "\n"
    lowest.write_text(text)
    print("lower bounds:", ", ".join(lines), flush=True)
    py = venv / "bin" / "python"
    start = time.perf_counter()
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            lowest.write_text(text)  # --clear emptied the directory
        pip = [str(py), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, f"torch=={torch}"], check=True)
        done = subprocess.run([*pip, "-c", str(lowest), "-e", f"{ROOT}[dev,lm-eval]"], capture_output=True, text=True)
        if done.returncode:  # pip's reasons (a conflict names the packages), without its index warnings
            print("\n".join(line for line in done.stderr.splitlines() if "WARNING: Location" not in line)[-4000:])
            return done.returncode
        installed = time.perf_counter() - start
        print(f"installed in {installed:.0f}s", flush=True)
        rc = subprocess.run([str(py), "-m", "pytest", *(args.pytest_args or DEFAULT_TESTS)], cwd=ROOT).returncode
        print(f"install {installed:.0f}s, tests {time.perf_counter() - start - installed:.0f}s, exit {rc}")
        return rc
    finally:
        if not args.keep:
            shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
