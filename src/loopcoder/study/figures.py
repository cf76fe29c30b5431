"""Matplotlib for the study's plots: headless, and one way to finish and save a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported anywhere
import matplotlib.pyplot as plt


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    return plt


def save(fig: Any, axes: Any, path: Path, legend: int | None = 8, grid_axis: str = "both") -> None:
    """Grid (and legend, unless `legend` is None) on every axis, tight layout, save at 110 dpi, close."""
    for ax in axes:
        ax.grid(alpha=0.3, axis=grid_axis)
        if legend is not None:
            ax.legend(fontsize=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
