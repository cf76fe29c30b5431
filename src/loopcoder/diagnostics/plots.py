"""PNG plots of the diagnostics (matplotlib's object API with the Agg canvas: no pyplot state, no
display needed). Means with 95 % CIs as error bars; one colour per model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from loopcoder.diagnostics.run import GROUPS, MEASURES, DiagnosticsResult

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def slug(name: str) -> str:
    """A file-name-safe version of a model name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _series(result: DiagnosticsResult, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loops where the measure is defined, their means and error-bar half widths (low, high)."""
    xs, ys, lo, hi = [], [], [], []
    for r, s in enumerate(result.stats(key), 1):
        if s.na is None and np.isfinite(s.mean):
            xs.append(r)
            ys.append(s.mean)
            lo.append(s.mean - s.low if np.isfinite(s.low) else 0.0)
            hi.append(s.high - s.mean if np.isfinite(s.high) else 0.0)
    return np.array(xs), np.array(ys), np.array([lo, hi]).reshape(2, -1)


def _loop_axis(ax, max_loops: int) -> None:
    ax.set_xlim(0.5, max_loops + 0.5)
    ax.set_xticks(range(1, max_loops + 1))
    ax.set_xlabel("loop r")


def _na(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)


def plot_trajectories(results: list[DiagnosticsResult], out_dir: Path, group: str) -> Path:
    """One panel per measure of `group`: mean ± 95 % CI against loop, one line per model."""
    keys = [k for k, m in MEASURES.items() if m.group == group]
    cols = 4
    rows = -(-len(keys) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    fig.suptitle(f"{GROUPS[group]}: per-loop means with 95 % CIs over samples")
    max_r = max(r.num_loops for r in results)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        m = MEASURES[key]
        drawn = False
        for i, res in enumerate(results):
            xs, ys, err = _series(res, key)
            if xs.size:
                shift = 0.06 * (i - (len(results) - 1) / 2)  # side by side, so error bars stay visible
                ax.errorbar(
                    xs + shift,
                    ys,
                    yerr=err,
                    marker="o",
                    capsize=3,
                    color=COLORS[i % len(COLORS)],
                    label=f"{res.name} (R={res.num_loops})",
                )
                drawn = True
        ax.set_title(m.label, fontsize=10)
        _loop_axis(ax, max_r)
        ax.set_ylabel(m.unit)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            why = next((w for res in results if (w := res.not_applicable(key, res.num_loops))), "no data")
            _na(ax, f"not applicable:\n{why}")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    path = out_dir / f"trajectories_{group}.png"
    fig.savefig(path, dpi=110)
    return path


def plot_scissors(results: list[DiagnosticsResult], out_dir: Path) -> Path:
    """Gain against cost per model: Delta p (left axis, nats) and Omega (right axis, L2) against loop."""
    fig = Figure(figsize=(5.5 * len(results), 4.2), layout="constrained")
    fig.suptitle("Gain-cost scissors: output change Δp (gain) vs offset cost Ω (cost), 95 % CIs")
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, res in zip(axes, results):
        ax.set_title(f"{res.name} (R={res.num_loops})")
        _loop_axis(ax, max(res.num_loops, 2))
        if res.num_loops < 2:
            _na(ax, "R = 1: no loop r ≥ 2,\nΔp and Ω are not applicable")
            continue
        xs, ys, err = _series(res, "delta_p")
        a = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=COLORS[0], label="Δp(r) (left, nats)")
        ax.set_ylabel("output change Δp(r)  [nats]", color=COLORS[0])
        ax.tick_params(axis="y", labelcolor=COLORS[0])
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        xs, ys, err = _series(res, "offset_cost")
        b = ax2.errorbar(
            xs, ys, yerr=err, marker="s", capsize=3, color=COLORS[1], linestyle="--", label="Ω(r) (right, L2)"
        )
        ax2.set_ylabel("offset cost Ω(r)  [L2 norm]", color=COLORS[1])
        ax2.tick_params(axis="y", labelcolor=COLORS[1])
        ax.legend(handles=[a, b], fontsize=8, loc="best")
    path = out_dir / "scissors.png"
    fig.savefig(path, dpi=110)
    return path


def plot_head_similarity(result: DiagnosticsResult, out_dir: Path) -> Path:
    """Left: mean pairwise head cosine per layer and loop. Right: the H x H head-cosine matrix at
    each loop for the layer whose mean cosine changes most across loops."""
    R = result.num_loops
    stats = result.layer_stats("head_cosine")
    grid = np.array([[s.mean for s in row] for row in stats])  # (L, R)
    L = grid.shape[0]
    layer = int(np.nanargmax(np.nanmax(grid, 1) - np.nanmin(grid, 1))) if R > 1 else L - 1
    fig = Figure(figsize=(3.2 + 3.0 * (R + 1), max(3.6, 0.28 * L + 1.8)), layout="constrained")
    fig.suptitle(
        f"{result.name} (R={R}): head similarity (cosine of heads' attention maps; "
        f"{'global branch for loops ≥ 2' if result.is_plt and R > 1 else 'causal attention'})"
    )
    axes = fig.subplots(1, R + 1, squeeze=False)[0]
    im = axes[0].imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    axes[0].set_xticks(range(R), [str(r) for r in range(1, R + 1)])
    axes[0].set_xlabel("loop r")
    axes[0].set_ylabel("layer")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title("mean pairwise head cosine")
    if L * R <= 120:
        for li in range(L):
            for r in range(R):
                if np.isfinite(grid[li, r]):
                    axes[0].text(
                        r,
                        li,
                        f"{grid[li, r]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if grid[li, r] < 0.6 else "black",
                    )
    fig.colorbar(im, ax=axes[0], label="cosine")
    for r in range(R):
        ax = axes[r + 1]
        im2 = ax.imshow(result.head_cosine_matrix[layer, r], cmap="magma", vmin=0, vmax=1, origin="lower")
        ax.set_title(f"layer {layer}, loop {r + 1}")
        ax.set_xlabel("head")
        ax.set_ylabel("head")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im2, ax=axes[1:].tolist(), label="cosine", shrink=0.8)
    path = out_dir / f"head_similarity_{slug(result.name)}.png"
    fig.savefig(path, dpi=110)
    return path


def plot_gates(results: list[DiagnosticsResult], out_dir: Path) -> Path:
    """Per model with gates: the distribution of gate values per loop, and the mean gate per layer."""
    gated = [r for r in results if r.is_plt and r.num_loops > 1]
    fig = Figure(figsize=(11, 3.8 * max(1, len(gated))), layout="constrained")
    fig.suptitle("G-SWA gate g (weight of the global branch; 0.5 = zero-initialised)")
    if not gated:
        ax = fig.subplots()
        ax.set_axis_off()
        _na(ax, "no model has a gate (R = 1 or vanilla loops): not applicable")
    else:
        axes = fig.subplots(len(gated), 2, squeeze=False)
        edges = np.linspace(0, 1, gated[0].gate_histogram.shape[-1] + 1)
        centers = (edges[1:] + edges[:-1]) / 2
        for row, res in zip(axes, gated):
            hist = res.gate_histogram.sum(0)  # (R, bins) over layers
            for r in range(1, res.num_loops):
                counts = hist[r]
                density = counts / max(counts.sum(), 1) / np.diff(edges)
                row[0].plot(
                    centers, density, drawstyle="steps-mid", color=COLORS[r % len(COLORS)], label=f"loop {r + 1}"
                )
            row[0].axvline(0.5, color="0.5", linestyle=":", label="g = 0.5")
            row[0].set_xlabel("gate value g")
            row[0].set_ylabel("density")
            row[0].set_title(f"{res.name} (R={res.num_loops}): gate distribution (all layers, heads, tokens)")
            row[0].legend(fontsize=8)
            stats = res.layer_stats("gate")
            for r in range(1, res.num_loops):
                ys = np.array([s[r].mean for s in stats])
                lo = ys - np.array([s[r].low for s in stats])
                hi = np.array([s[r].high for s in stats]) - ys
                row[1].errorbar(
                    np.arange(len(ys)),
                    ys,
                    yerr=np.nan_to_num(np.stack([lo, hi])),
                    marker="o",
                    capsize=3,
                    color=COLORS[r % len(COLORS)],
                    label=f"loop {r + 1}",
                )
            row[1].axhline(0.5, color="0.5", linestyle=":")
            row[1].set_xlabel("layer")
            row[1].xaxis.set_major_locator(MaxNLocator(integer=True))
            row[1].set_ylabel("mean gate g")
            row[1].set_title("mean gate per layer (95 % CI over samples)")
            row[1].legend(fontsize=8)
            row[1].grid(alpha=0.3)
    path = out_dir / "gates.png"
    fig.savefig(path, dpi=110)
    return path


def write_plots(results: list[DiagnosticsResult], out_dir: Path) -> list[Path]:
    """Every plot into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_trajectories(results, out_dir, g) for g in GROUPS]
    paths.append(plot_scissors(results, out_dir))
    paths += [plot_head_similarity(r, out_dir) for r in results]
    paths.append(plot_gates(results, out_dir))
    return paths
