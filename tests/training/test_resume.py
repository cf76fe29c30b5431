"""Exact resume: a run SIGKILLed mid-way and resumed gives the uninterrupted run's trajectory, bit for bit."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from loopcoder.training.checkpoints import latest_checkpoint, list_checkpoints
from loopcoder.training.trainer import KILL_ENV
from support.training import data_dir, read_metrics, run_cli, tiny_overrides

pytestmark = pytest.mark.slow  # end-to-end: seconds each

EXACT = ("step", "loss", "grad_norm", "lr", "tokens")


def test_sigkill_then_resume_reproduces_every_loss_bit_for_bit(tmp_path):
    data = data_dir()
    full, killed = tmp_path / "full", tmp_path / "killed"
    settings = {"train.steps": 8, "checkpoint.every": 3, "eval.every": 3}

    r = run_cli(["train", *tiny_overrides(data, full, **settings)])
    assert r.returncode == 0, r.stderr

    # Killed by SIGKILL right after step 5: step 3 is the newest checkpoint, steps 4-5 are lost work.
    r = run_cli(["train", *tiny_overrides(data, killed, **settings)], env={KILL_ENV: "5"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert latest_checkpoint(killed).name == "step-000003"
    assert [m["step"] for m in read_metrics(killed)] == [1, 2, 3, 4, 5]

    # --resume with the config the run saved
    r = run_cli(["train", "--resume", f"out={killed}"])
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr and "step-000003" in r.stderr

    want, got = read_metrics(full), read_metrics(killed)
    assert [m["step"] for m in got] == list(range(1, 9))
    assert [{k: m[k] for k in EXACT} for m in got] == [{k: m[k] for k in EXACT} for m in want]
    assert read_metrics(killed, "val") == [{**v} for v in read_metrics(full, "val")]

    # the final weights are identical too
    a = load_file(str(list_checkpoints(full)[-1][1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(killed)[-1][1] / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_finished_run_does_nothing_and_a_rerun_without_resume_is_refused(tmp_path):
    data = data_dir()
    run = tmp_path / "run"
    r = run_cli(["train", *tiny_overrides(data, run, **{"train.steps": 2, "checkpoint.every": 0})])
    assert r.returncode == 0, r.stderr
    r = run_cli(["train", *tiny_overrides(data, run, **{"train.steps": 2})])
    assert r.returncode == 2
    assert "already has checkpoints" in r.stderr and "--resume" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli(["train", "--resume", f"out={run}"])
    assert r.returncode == 0, r.stderr
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    # it says so, and how to go on
    assert f"{run} is finished: its newest checkpoint is step 2 and train.steps=2" in r.stderr
    assert f"loopcoder train --resume out={run} train.steps=4" in r.stderr
    r = run_cli(["train", "--resume", f"out={run}", "train.steps=4"])  # what it suggests, as written
    assert r.returncode == 0, r.stderr
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4] and "is finished" not in r.stderr
