"""Data-parallel training on CPU (gloo, 2 processes under torchrun): FSDP2 and DDP follow the
single-process loss trajectory at the same global batch, and a 2-process checkpoint resumes in 1."""

from __future__ import annotations

import shutil

import pytest
import torch

from loopcoder.checkpoint import load_model
from loopcoder.training.checkpoints import list_checkpoints
from support.training import data_dir, read_metrics, run_cli, tiny_overrides

pytestmark = pytest.mark.slow  # end-to-end: seconds each

SETTINGS = {"train.steps": 4, "train.global_batch_size": 4, "checkpoint.every": 2, "eval.every": 2}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    r = run_cli(["train", *tiny_overrides(data_dir(), out, **SETTINGS)])
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
    r = run_cli(["train", *tiny_overrides(data_dir(), two, **SETTINGS)], torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 per rank x 1 micro-steps x 2 rank(s)" in r.stderr and "fsdp" in r.stderr
    _close(read_metrics(two), read_metrics(single), "loss")
    _close(read_metrics(two), read_metrics(single), "grad_norm")
    _close(read_metrics(two, "val"), read_metrics(single, "val"), "val_loss")

    # The 2-process checkpoint of step 2 continues in one process, on the same trajectory.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    r = run_cli(["train", "--resume", f"out={resumed}"])
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
    r = run_cli(["train", *tiny_overrides(data_dir(), two, **SETTINGS, **{"distributed.strategy": "ddp"})], torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ddp" in r.stderr
    _close(read_metrics(two), read_metrics(single), "loss")
