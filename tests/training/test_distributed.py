"""Data-parallel training on CPU (gloo, 2 processes under torchrun): FSDP2 and DDP follow the
single-process loss trajectory at the same global batch, a 2-process checkpoint resumes in 1, and no
rank outlives its launcher or a dead peer.

Time budgets are for a loaded 2-core machine (starting 3 Python processes that import torch can take a
minute there); a run that overstays is killed with its whole process tree (`support.training.run_cli`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loopcoder.model.checkpoint import load_model
from loopcoder.training.checkpoints import list_checkpoints
from support.training import SRC, data_dir, descendants, is_running, kill_tree, read_metrics, run_cli, tiny_overrides

pytestmark = pytest.mark.slow  # end-to-end: seconds each

SETTINGS = {"train.steps": 4, "train.global_batch_size": 4, "checkpoint.every": 2, "eval.every": 2}
BUDGET_S = 900  # per command: torchrun and two ranks on a loaded 2-core machine


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    r = run_cli(["train", *tiny_overrides(data_dir(), out, **SETTINGS)], timeout=BUDGET_S)
    assert r.returncode == 0, r.stderr
    return out


def _close(got: list[dict], want: list[dict], key: str) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want]
    torch.testing.assert_close(
        torch.tensor([m[key] for m in got], dtype=torch.float64),
        torch.tensor([m[key] for m in want], dtype=torch.float64),
        rtol=2e-5,
        atol=1e-6,
    )


def test_fsdp_two_processes_match_one_and_resume_in_one(single, tmp_path):
    two = tmp_path / "two"
    r = run_cli(["train", *tiny_overrides(data_dir(), two, **SETTINGS)], torchrun=2, timeout=BUDGET_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 per rank x 1 micro-steps x 2 rank(s)" in r.stderr and "fsdp" in r.stderr
    _close(read_metrics(two), read_metrics(single), "loss")
    _close(read_metrics(two), read_metrics(single), "grad_norm")
    _close(read_metrics(two, "val"), read_metrics(single, "val"), "val_loss")

    # The 2-process checkpoint of step 2 continues in one process, on the same trajectory.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    r = run_cli(["train", "--resume", f"out={resumed}"], timeout=BUDGET_S)
    assert r.returncode == 0, r.stderr
    assert "1 rank(s)" in r.stderr
    _close(read_metrics(resumed), read_metrics(single), "loss")

    # and its final weights are the single-process run's (up to float reassociation)
    a = load_model(list_checkpoints(single)[-1][1])
    b = load_model(list_checkpoints(resumed)[-1][1])
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_two_processes_match_one(single, tmp_path):
    two = tmp_path / "ddp"
    args = ["train", *tiny_overrides(data_dir(), two, **SETTINGS, **{"distributed.strategy": "ddp"})]
    r = run_cli(args, torchrun=2, timeout=BUDGET_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ddp" in r.stderr
    _close(read_metrics(two), read_metrics(single), "loss")


# ----------------------------------------------------------------------------- no orphaned ranks
TIMEOUT_S = 20  # distributed.timeout_s of the runs below
SLACK_S = 60  # on top of it: torchrun's monitor, its SIGTERM-then-SIGKILL of the survivors, a loaded machine


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("victim", ["launcher", "rank"])
def test_no_rank_outlives_a_killed_launcher_or_a_dead_peer(tmp_path, victim):
    """A long DDP run; once it trains, SIGKILL torchrun (which cannot pass that on: its ranks run in
    sessions of their own) or one rank. Every process of the tree must be gone within the distributed
    timeout plus slack."""
    run = tmp_path / "run"
    overrides = tiny_overrides(
        data_dir(),
        run,
        **{
            "train.steps": 100000,
            "eval.every": 0,
            "checkpoint.every": 0,
            "distributed.strategy": "ddp",
            "distributed.timeout_s": TIMEOUT_S,
            "logging.progress": "off",
        },
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(
            [*cmd, "-m", "loopcoder", "train", *overrides], stdout=log, stderr=log, env=env, start_new_session=True
        )
    tree: list[int] = []
    try:
        deadline = time.monotonic() + BUDGET_S
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and '"train"' in metrics.read_text()):  # the ranks are training
            assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not start training in time"
            time.sleep(0.5)
        tree = descendants(proc.pid)
        ranks = [p for p in tree if "loopcoder train" in _cmdline(p)]
        assert len(ranks) == 2, [(p, _cmdline(p)) for p in tree]
        os.kill(proc.pid if victim == "launcher" else ranks[1], signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT_S + SLACK_S
        while time.monotonic() < deadline and (proc.poll() is None or any(is_running(p) for p in tree)):
            time.sleep(0.5)
        survivors = [(p, _cmdline(p)) for p in [proc.pid, *tree] if is_running(p)]
        assert not survivors, f"alive {TIMEOUT_S + SLACK_S} s after the {victim} was killed: {survivors}"
    finally:  # whatever happened, leave nothing behind
        kill_tree(proc.pid)
        for p in tree:
            if is_running(p):
                os.kill(p, signal.SIGKILL)
        proc.wait()
