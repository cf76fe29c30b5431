"""The report: `diagnostics.json` (every figure), `report.md` (the tables) and `plots/*.png`,
written atomically into one output directory."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import loopcoder
from loopcoder.diagnostics.plots import write_plots
from loopcoder.diagnostics.recommend import Recommendation, recommend
from loopcoder.diagnostics.run import GROUPS, MEASURES, DiagnosticsResult, Stat
from loopcoder.utils.atomic import atomic_directory
from loopcoder.utils.errors import LoopcoderError

FORMAT = "loopcoder-diagnostics/1"
JSON_NAME, MARKDOWN_NAME, PLOTS_DIR = "diagnostics.json", "report.md", "plots"
PER_LAYER_TABLES = ("attention_kl", "head_cosine", "attention_entropy", "gate")


def build_json(
    results: list[DiagnosticsResult], recommendation: Recommendation, per_sample: bool = True
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "loopcoder_version": loopcoder.__version__,
        "definitions": "docs/diagnostics.md (spec section 3)",
        "confidence_interval": "95 % Student t interval of the mean over samples",
        "recommendation": recommendation.to_dict(),
        "models": [r.to_dict(per_sample=per_sample) for r in results],
    }


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{x:.0f}" if abs(x) >= 1e4 else f"{x:.4g}"


class _Notes:
    """Numbered footnotes for not-applicable cells, so tables stay narrow."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def cell(self, s: Stat) -> str:
        if s.na is not None:
            if s.na not in self.items:
                self.items.append(s.na)
            return f"n/a ({self.items.index(s.na) + 1})"
        ci = f" [{_fmt(s.low)}, {_fmt(s.high)}]" if math.isfinite(s.low) else ""
        return _fmt(s.mean) + ci

    def render(self) -> list[str]:
        return [f"({i}) {t}" + ("  " if i < len(self.items) else "") for i, t in enumerate(self.items, 1)]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def build_markdown(results: list[DiagnosticsResult], recommendation: Recommendation, plot_files: list[str]) -> str:
    max_r = max(r.num_loops for r in results)
    several = len(results) > 1
    lines = [
        "# Loop diagnostics",
        "",
        f"LoopCoder-v2 loop diagnostics (spec section 3), loopcoder {loopcoder.__version__}. Each cell: "
        "mean over samples [95 % Student t confidence interval]. Definitions and the exact formulas: "
        "`docs/diagnostics.md`.",
        "",
        "## Models",
        "",
    ]
    header = ["model", "R", "architecture", "layers", "heads", "hidden", "samples", "tokens", "time (s)", "source"]
    rows = [
        [
            r.name,
            str(r.num_loops),
            r.architecture,
            *(str(r.model_info.get(k)) for k in ("layers", "heads", "hidden_size")),
            str(r.num_samples),
            str(r.num_tokens),
            f"{r.seconds:.1f}",
            f"`{r.source}`" if r.source else "",
        ]
        for r in results
    ]
    lines += markdown_table(header, rows)
    lines += recommendation_section(recommendation)
    if several:
        lines += [
            "",
            "Each model's own verdict: " + ", ".join(f"{k}: {v}" for k, v in recommendation.per_model.items()) + ".",
        ]
    lines += [
        "",
        "Rule (spec section 3): an extra loop is worth it while erank still rises; stop when it "
        "falls (Δp and attention KL collapse, cos θ < 0 and Ω flat confirm). Thresholds: "
        "`docs/diagnostics.md`, section Recommendation.",
    ]
    for group, title in GROUPS.items():
        notes = _Notes()
        header = ["measure", *(["model"] if several else []), *[f"loop {r}" for r in range(1, max_r + 1)]]
        rows = []
        for key, m in MEASURES.items():
            if m.group != group:
                continue
            for res in results:
                cells = [notes.cell(s) for s in res.stats(key)] + [""] * (max_r - res.num_loops)
                rows.append([f"{m.label} [{m.unit}]", *([res.name] if several else []), *cells])
        lines += ["", f"## {title}", "", *markdown_table(header, rows)]
        if notes.items:
            lines += ["", *notes.render()]
    lines += [
        "",
        "## Per layer",
        "",
        "Attention measures per layer (heads averaged within each sample); primary branch: causal for "
        "loop 1 and vanilla loops, global for PLT loops ≥ 2.",
    ]
    for res in results:
        for key in PER_LAYER_TABLES:
            table = res.layer_stats(key)
            if all(c.na is not None for row in table for c in row):  # e.g. the KL of an R = 1 model
                continue
            notes = _Notes()
            rows = [[str(li), *[notes.cell(s) for s in row]] for li, row in enumerate(table)]
            lines += ["", f"### {res.name}: {MEASURES[key].label} [{MEASURES[key].unit}]", ""]
            lines += markdown_table(["layer", *[f"loop {r}" for r in range(1, res.num_loops + 1)]], rows)
            if notes.items:
                lines += ["", *notes.render()]
    if plot_files:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plot_files]
    return "\n".join(lines) + "\n"


def recommendation_section(rec: Recommendation) -> list[str]:
    """The report's recommendation heading and reasons; a warning first when held-out NLL disagrees."""
    h = rec.held_out
    disagrees = h is not None and h.agrees is False
    title = f"R = {rec.loops}" + (f" by the loop rule; held-out NLL favours R = {h.best_loops}" if disagrees else "")
    lines = ["", f"## Recommendation: {title}", ""]
    if disagrees:
        lines += [f"**Warning: {h.message}.**", ""]
    return lines + [f"- {reason}" for reason in rec.reasons]


def check_out_dir(out: Path) -> None:
    """Refuse to replace a directory that is not a previous diagnostics report (the whole directory is
    swapped atomically, so anything else in it would be lost)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / JSON_NAME).is_file())):
        raise LoopcoderError(
            f"--out {str(out)!r} exists and is not a diagnostics report directory; choose a new or empty directory"
        )


def write_report(
    results: list[DiagnosticsResult],
    out_dir: str | os.PathLike,
    recommendation: Recommendation | None = None,
    plots: bool = True,
    per_sample: bool = True,
) -> Path:
    """Write `diagnostics.json`, `report.md` and (unless `plots=False`) `plots/*.png` into `out_dir`,
    replacing a previous report there in one rename. Model names must be distinct."""
    if not results:
        raise ValueError("write_report() needs at least one DiagnosticsResult")
    names = [r.name for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be distinct, got {names}")
    out = Path(out_dir)
    check_out_dir(out)
    recommendation = recommendation or recommend(results)
    with atomic_directory(out) as tmp:
        plot_files: list[str] = []
        if plots:
            plot_files = [f"{PLOTS_DIR}/{p.name}" for p in write_plots(results, tmp / PLOTS_DIR)]
        data = build_json(results, recommendation, per_sample=per_sample)
        data["plots"] = plot_files
        text = json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
        # plain writes: the directory as a whole is renamed into place (and fsynced) by atomic_directory
        (tmp / JSON_NAME).write_text(text, encoding="utf-8")
        (tmp / MARKDOWN_NAME).write_text(build_markdown(results, recommendation, plot_files), encoding="utf-8")
    return out
