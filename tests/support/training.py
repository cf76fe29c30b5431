"""Shared helpers of the training tests (no tests here): a small data directory built once per
process, tiny configs, and running `loopcoder` in a subprocess (single-threaded, deterministic)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
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
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # a failed assertion that shows what the run printed
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return subprocess.CompletedProcess(cmd, -9, "", f"timed out after {timeout} s\n{err}")


def read_metrics(run: Path, kind: str = "train") -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
