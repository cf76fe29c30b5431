"""Shared helpers of the training tests (no tests here): a small data directory built once per
process, tiny configs, and running `loopcoder` in a subprocess (single-threaded, deterministic)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[2] / "src"
_CACHE: dict[str, Path] = {}


def data_dir() -> Path:
    """A data directory (byte-level BPE of 300 tokens, rows of 64) built from this package's own
    sources, plus an instruction set; built once per test process."""
    if "data" in _CACHE:
        return _CACHE["data"]
    from loopcoder.data.build import BuildConfig, build
    from loopcoder.data.corpus import CorpusSpec

    root = Path(tempfile.mkdtemp(prefix="lc-train-test-"))
    atexit.register(shutil.rmtree, root, True)
    corpus = root / "corpus"
    corpus.mkdir()
    for i, f in enumerate(sorted((SRC / "loopcoder").rglob("*.py"))[:40]):
        shutil.copyfile(f, corpus / f"m{i:02d}_{f.name}")
    out = root / "data"
    spec = CorpusSpec(sources=(str(corpus),), val_fraction=0.2, seed=0)
    with open(os.devnull, "w") as quiet:
        build(BuildConfig(corpus=spec, vocab_size=300, seq_len=64), out, log=quiet)
    (out / "instructions").mkdir()
    for split, n in (("train", 48), ("validation", 8)):
        lines = [
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {i} + {i + 1}?"},
                        {"role": "assistant", "content": f"{i} + {i + 1} = {2 * i + 1}"},
                    ]
                }
            )
            for i in range(n)
        ]
        (out / "instructions" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    _CACHE["data"] = out
    return out


def tiny_overrides(data: Path, out: Path, **extra: Any) -> list[str]:
    """A model of ~60k parameters on rows of 32 tokens: a step takes milliseconds."""
    base = {
        "data.dir": str(data),
        "data.seq_len": 32,
        "out": str(out),
        "model.hidden_size": 32,
        "model.layers": 2,
        "model.heads": 4,
        "model.kv_heads": 2,
        "model.intermediate_size": 64,
        "model.window": 8,
        "model.loops": 2,
        "train.steps": 6,
        "train.global_batch_size": 4,
        "optim.lr": 3e-3,
        "eval.every": 3,
        "eval.max_batches": 2,
        "checkpoint.every": 3,
        "checkpoint.keep": 0,
        "logging.tensorboard": False,
        "logging.progress": "lines",
        "train.threads": 1,
        "train.deterministic": True,
        "distributed.timeout_s": 60,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


IN_PROCESS = {"train.threads": "null", "train.deterministic": False}  # leave the test process's settings alone


def in_process_overrides(out: Path, **extra: Any) -> list[str]:
    """`tiny_overrides` for a run inside the test process (`pretrain`/`sft` called directly)."""
    return tiny_overrides(data_dir(), out, **{**IN_PROCESS, **extra})


def run_cli(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 180, torchrun: int = 0
) -> subprocess.CompletedProcess:
    """`python -m loopcoder ARGS` (or under torchrun with `torchrun` processes), one thread each."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(SRC), **(env or {})}
    if torchrun:  # --standalone: the rendezvous binds a free port itself, no race for one
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(torchrun),
            "-m",
            "loopcoder",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "loopcoder", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # the whole tree goes (torchrun's ranks live in sessions of their own)
        kill_tree(proc.pid)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, -9, out, f"timed out after {timeout} s\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc)."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            out[int(d)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), whatever session they started."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (a dead process not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it (the tree is read first: orphans lose their parent link)."""
    for p in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def one_line_error(argv: list[str], capsys: Any, progress: str = "") -> str:
    """Run `loopcoder ARGV` in this process; assert exit status 2 with exactly one line on stderr (besides
    progress lines starting with `progress`, if given), starting `loopcoder CMD: error: `; return it."""
    from loopcoder.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not (progress and line.startswith(progress))]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"loopcoder {argv[0]}: error: "), (code, err)
    return err[0]


def can_mount_a_tmpfs() -> bool:
    """Whether a tmpfs can be mounted in a private user and mount namespace here (`in_a_small_tmpfs`)."""
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


def in_a_small_tmpfs(mnt: Path, size: str, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the shell `script` where `mnt` is a fresh tmpfs of `size` (a private mount in a user namespace,
    gone when the script ends): a disk that fills up, for real."""
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {mnt} && {script}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )


def read_metrics(run: Path, kind: str = "train") -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
