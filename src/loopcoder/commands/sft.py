"""`loopcoder sft`: instruction-tune a checkpoint with the training engine; only assistant tokens
carry loss (docs/training.md).

    loopcoder sft --config tiny --init runs/r2 --data data/stdlib --out runs/r2-sft
"""

from __future__ import annotations

import argparse

from loopcoder.commands import train as train_command


def add_arguments(p: argparse.ArgumentParser) -> None:
    train_command.add_arguments(p, stage="sft")


def run(args: argparse.Namespace) -> int:
    return train_command.run_stage(args, "sft")
