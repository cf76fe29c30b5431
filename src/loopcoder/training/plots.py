"""Training curves as a PNG, without TensorBoard: loss and validation loss, bits per byte, learning rate.

`RUN/curves.png` is redrawn from the run's metrics at every validation and at the end of training
(matplotlib's object API with the Agg canvas: no pyplot state, no display; written atomically).
`loopcoder plot RUN [RUN ...] --out curves.png` draws several runs side by side, one line per run and
series, from their `metrics.jsonl` (`metrics.read_metrics`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from loopcoder.training.metrics import read_metrics
from loopcoder.utils.atomic import atomic_write_bytes
from loopcoder.utils.errors import LoopcoderError

CURVES = "curves.png"
PANELS = ("loss", "bits per byte", "learning rate")


def _series(records: Sequence[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [s for s, _ in rows], [v for _, v in rows]


def curve_figure(runs: Mapping[str, Sequence[dict[str, Any]]], title: str | None = None) -> Figure:
    """The curves of every run (name -> metrics records), one colour per run: train loss (line) and validation
    loss (dashed, dots) in the first panel, validation bits per byte in the second, the LR in the third.
    Each line's label is `NAME train`, `NAME val`, `NAME bpb` or `NAME lr`."""
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, len(PANELS))
    # fixed margins: a layout engine would double the cost of each redraw during training
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.14, top=0.84 if title else 0.9, wspace=0.25)
    if title:
        fig.suptitle(title)
    for ax, name in zip(axes, PANELS):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    loss_ax, bpb_ax, lr_ax = axes
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for ax, kind, key, label, style in (
            (loss_ax, "train", "loss", "train", {"linewidth": 1.2}),
            (loss_ax, "val", "val_loss", "val", {"linestyle": "--", "marker": "o", "markersize": 3}),
            (bpb_ax, "val", "val_bpb", "bpb", {"marker": "o", "markersize": 3}),
            (lr_ax, "train", "lr", "lr", {"linewidth": 1.2}),
        ):
            steps, values = _series(records, kind, key)
            if steps:
                ax.plot(steps, values, color=color, label=f"{name} {label}", **style)
    for ax, empty in ((loss_ax, "no records yet"), (bpb_ax, "no validation yet"), (lr_ax, "no records yet")):
        if ax.get_lines():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="0.4")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """The figure as a PNG at `path`, written atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def write_run_curves(run_dir: str | os.PathLike, records: Sequence[dict[str, Any]]) -> Path:
    """`RUN/curves.png` from the run's records so far."""
    run = Path(run_dir)
    return save_figure(curve_figure({run.name: records}, title=str(run)), run / CURVES)


def plot_runs(
    run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, names: Sequence[str] | None = None
) -> Figure:
    """Several runs side by side in one PNG at `out`; returns the figure. A run without metrics is an error."""
    if not run_dirs:
        raise LoopcoderError("give at least one run directory")
    names = list(names) if names is not None else [Path(r).name or str(r) for r in run_dirs]
    if len(names) != len(run_dirs):
        raise LoopcoderError(f"{len(names)} name(s) for {len(run_dirs)} run(s)")
    for i, name in enumerate(names):  # runs of the same name (runs/a/r2, runs/b/r2): number them
        if names.count(name) > 1:
            names[i] = f"{name} ({i + 1})"
    runs = {}
    for name, run in zip(names, run_dirs):
        if not Path(run).is_dir():
            raise LoopcoderError(f"run directory {str(run)!r} does not exist")
        records = read_metrics(run)
        if not records:
            raise LoopcoderError(f"{str(run)!r} has no training metrics (metrics.jsonl): not a run directory")
        runs[name] = records
    fig = curve_figure(runs)
    save_figure(fig, out)
    return fig
