"""`--threads`: on every command that computes, one helper applies it, and the default follows the free cores."""

from __future__ import annotations

import argparse
import importlib

import pytest
import torch

from loopcoder.cli import COMMANDS, main
from loopcoder.utils import runtime

# every command that runs torch (data build runs the tokenizers library only; plan and init compute nothing
# worth threads)
COMPUTING = [
    "generate",
    "eval",
    "bfcl",
    "serve",
    "diagnose",
    "train",
    "sft",
    "study",
    "demo",
    "bench decode",
    "bench train",
]


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def parser_of(command: str) -> argparse.ArgumentParser:
    name, *sub = command.split()
    p = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[name][0]).add_arguments(p)
    if sub:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[sub[0]]
    return p


@pytest.mark.parametrize("command", COMPUTING)
def test_every_computing_command_takes_threads(command):
    options = {s for a in parser_of(command)._actions for s in a.option_strings}
    assert "--threads" in options


@pytest.mark.parametrize(
    ("cpus", "load", "expected"),
    [
        (8, 0.2, 8),  # an idle machine: every core
        (8, 3.4, 5),  # three cores busy elsewhere
        (8, 7.6, 1),
        (2, 11.0, 1),  # this project's shared 2-core machine on a busy day
        (2, 0.0, 2),
    ],
)
def test_the_default_is_the_cores_the_load_average_shows_free(monkeypatch, cpus, load, expected):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.free_cpus() == expected
    assert runtime.apply_threads(None) == expected == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an explicit environment wins over the load average
    assert runtime.apply_threads(None) == 1
    assert runtime.apply_threads(3) == 3 == torch.get_num_threads()  # and --threads over both


def test_generate_applies_threads_and_refuses_zero(tmp_path, capsys):
    from support.data import tiny_model_dir

    model, _ = tiny_model_dir(tmp_path, max_positions=32)
    torch.set_num_threads(2)
    assert main(["generate", "--model", str(model), "--prompt", "x", "--max-new-tokens", "2", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "--prompt", "x", "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "loopcoder generate: error: --threads must be >= 1, got 0"


def test_train_threads_is_train_threads_in_the_config(tmp_path, capsys):
    from support.training import data_dir

    assert (
        main(
            [
                "train",
                "--config",
                "tiny",
                f"data.dir={data_dir()}",
                f"out={tmp_path}",
                "--threads",
                "3",
                "--print-config",
            ]
        )
        == 0
    )
    assert "threads: 3" in capsys.readouterr().out
