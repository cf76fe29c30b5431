"""`loopcoder plot`: training curves of one or more runs side by side in one PNG (docs/training.md).

loopcoder plot runs/r1 runs/r2 --out curves.png
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each has metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default: curves.png)")
    p.add_argument(
        "--name", action="append", default=None, metavar="NAME", help="a legend name per run, in order (repeat it)"
    )


def run(args: argparse.Namespace) -> int:
    from loopcoder.training.plots import plot_runs  # here: matplotlib and torch (fast --help)

    fig = plot_runs(args.runs, args.out, args.name)
    lines = sum(len(ax.get_lines()) for ax in fig.axes)
    print(f"wrote {args.out}: {len(args.runs)} run(s), {lines} lines (loss, validation loss, bits per byte, LR)")
    return 0
