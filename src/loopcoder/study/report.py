"""The study's report: `report.md`, `summary.json` and plots, from the cached stage results.

It leads with the depth probe (`depth_report.py`). For the code language model it compares loop counts
item by item on the same held-out data (see `stats.py`), says for each comparison whether it is
distinguishable from noise, describes how each metric moves with R, sets the costs beside the gains,
shows the diagnostics side by side, and recommends a loop count with reasons.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

from loopcoder.diagnostics.report import markdown_table
from loopcoder.study.depth_report import DepthData, depth_section, percent
from loopcoder.study.figures import pyplot, save
from loopcoder.training.metrics import read_metrics
from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.stats import Difference, paired_difference, trend

DIAG_ROWS = [
    ("effective_rank", "erank"),
    ("step_size", "step δ"),
    ("update_cosine", "cos θ"),
    ("offset_cost", "Ω"),
    ("delta_p", "Δp (nats)"),
    ("attention_kl", "attn KL (nats)"),
    ("gate", "gate g"),
    ("gold_nll", "logit-lens NLL"),
]


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


class StudyData:
    """Per loop count: training, evaluation (with per-item records), cost and diagnostics."""

    def __init__(self, study: Any) -> None:
        self.study = study
        self.loops = list(study.p.loops)
        r = study.results
        self.pretrain = {R: r[f"pretrain-R{R}"] for R in self.loops}
        self.sft = {R: r[f"sft-R{R}"] for R in self.loops}
        self.cost = {R: r[f"cost-R{R}"] for R in self.loops}
        self.eval = {R: json.loads(Path(r[f"eval-R{R}"]["results"]).read_text()) for R in self.loops}
        self.diag = r["diagnostics"]
        diag_json = Path(self.diag["dir"]) / "diagnostics.json"
        self.diag_models = json.loads(diag_json.read_text())["models"] if diag_json.is_file() else []
        self.has_reasoning = all("reasoning" in self.eval[R]["tasks"] for R in self.loops)

    def reasoning(self, R: int) -> dict[str, Any]:
        t = self.eval[R]["tasks"]["reasoning"]
        return t["styles"][t["primary_style"]]

    def items(self, R: int, field: str) -> list[float]:
        """Per held-out reasoning item, in a fixed order (the same for every R)."""
        ex = self.reasoning(R)["examples"]
        return [float(row[field]) for k in sorted(ex, key=int) for row in ex[k]]

    def humaneval_items(self, R: int) -> list[float]:
        probs = self.eval[R]["tasks"]["humaneval"]["problems"]
        return [p["c"] / p["n"] for _, p in sorted(probs.items())]

    def bpb_items(self, R: int) -> list[float]:
        b = self.eval[R]["tasks"]["bpb"]
        return [nll / math.log(2) / max(nb, 1) for nll, nb in zip(b["row_nll"], b["row_bytes"])]


def comparisons(d: StudyData) -> dict[str, dict[str, Difference]]:
    """Each R against the one below it, on every metric (b - a; for NLL and bpb lower is better)."""
    out: dict[str, dict[str, Difference]] = {}
    for a, b in zip(d.loops, d.loops[1:]):
        comp = {}
        if d.has_reasoning:
            comp["reasoning accuracy"] = paired_difference(d.items(a, "correct"), d.items(b, "correct"))
            comp["answer NLL (nats)"] = paired_difference(d.items(a, "answer_nll"), d.items(b, "answer_nll"))
        comp["bits per byte"] = paired_difference(d.bpb_items(a), d.bpb_items(b))
        comp["HumanEval pass@1"] = paired_difference(d.humaneval_items(a), d.humaneval_items(b))
        out[f"R={b} vs R={a}"] = comp
    return out


HIGHER_IS_BETTER = {
    "reasoning accuracy": True,
    "answer NLL (nats)": False,
    "bits per byte": False,
    "HumanEval pass@1": True,
}


def recommend_loops(d: StudyData, comps: dict[str, dict[str, Difference]]) -> tuple[int, list[str]]:
    """The smallest R that no larger R beats beyond noise on the outcome metrics, with the diagnostics'
    own verdict and the costs as reasons."""
    reasons = []
    best = d.loops[0]
    for a, b in zip(d.loops, d.loops[1:]):
        comp = comps[f"R={b} vs R={a}"]
        gains = [m for m, diff in comp.items() if diff.clear and (diff.mean > 0) == HIGHER_IS_BETTER[m]]
        losses = [m for m, diff in comp.items() if diff.clear and (diff.mean > 0) != HIGHER_IS_BETTER[m]]
        if gains and not losses:
            best = b
            reasons.append(f"R={b} beats R={a} beyond noise on {', '.join(gains)} and loses on nothing.")
        elif gains:
            reasons.append(f"R={b} vs R={a} is mixed: better on {', '.join(gains)}, worse on {', '.join(losses)}.")
        elif losses:
            reasons.append(f"R={b} is worse than R={a} beyond noise on {', '.join(losses)}.")
        else:
            reasons.append(f"R={b} vs R={a}: no outcome metric differs beyond noise.")
    diag = d.diag.get("recommendation", {})
    if diag:
        reasons.append(
            f"The paper's diagnostic rule (docs/diagnostics.md) recommends R={diag['loops']}: "
            + _rule_reasons(diag.get("reasons", [])[:2])
        )
    c1 = d.cost[d.loops[0]]["latency_ms"]
    lat = ", ".join(f"R={R} {d.cost[R]['latency_ms']['1'] / c1['1']:.2f}x" for R in d.loops)
    train = ", ".join(f"R={R} {d.pretrain[R]['train_s'] / d.pretrain[d.loops[0]]['train_s']:.2f}x" for R in d.loops)
    reasons.append(f"Cost relative to R=1: pretraining time {train}; decode latency at batch 1 {lat}.")
    if best == d.loops[0] and len(d.loops) > 1:
        reasons.append(
            "With no extra loop winning beyond noise here, the cheapest model is the recommendation "
            "at this scale; it says nothing about larger budgets (the paper's 7B result is R=2)."
        )
    return best, reasons


# ----------------------------------------------------------------------------- plots
def write_plots(d: StudyData, out: Path) -> list[str]:
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    colors = {R: c for R, c in zip(d.loops, ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee"])}
    if d.has_reasoning:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for R in d.loops:
            table = d.reasoning(R)["by_steps"]
            steps = sorted(table, key=int)
            x = [int(s) + (R - 2) * 0.08 for s in steps]
            acc = [100 * table[s]["accuracy"] for s in steps]
            err = [
                [100 * (table[s]["accuracy"] - table[s]["ci95"][0]) for s in steps],
                [100 * (table[s]["ci95"][1] - table[s]["accuracy"]) for s in steps],
            ]
            axes[0].errorbar(x, acc, yerr=err, marker="o", capsize=3, label=f"R={R}", color=colors[R])
            nll = [table[s]["answer_nll"] for s in steps]
            axes[1].errorbar(
                x,
                [v["mean"] for v in nll],
                yerr=[[v["mean"] - v["ci95"][0] for v in nll], [v["ci95"][1] - v["mean"] for v in nll]],
                marker="o",
                capsize=3,
                label=f"R={R}",
                color=colors[R],
            )
        axes[0].set(
            xlabel="dependent steps in the program",
            ylabel="exact-match accuracy (%)",
            title="Held-out code reasoning (95 % CI)",
        )
        axes[1].set(
            xlabel="dependent steps in the program",
            ylabel="answer NLL (nats, lower is better)",
            title="Likelihood of the right answer (95 % CI)",
        )
        save(fig, axes, out / "reasoning.png", legend=10)
        files.append("plots/reasoning.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for R in d.loops:
        for ax, stage in zip(axes, (d.pretrain, d.sft)):
            rows = read_metrics(stage[R]["run_dir"])
            train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
            val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "val"]
            if train:
                k = max(1, len(train) // 60)  # light smoothing: mean over windows
                pts = [
                    (train[i][0], sum(v for _, v in train[i : i + k]) / len(train[i : i + k]))
                    for i in range(0, len(train), k)
                ]
                ax.plot(*zip(*pts), color=colors[R], alpha=0.6, label=f"R={R} train")
            if val:
                ax.plot(*zip(*val), color=colors[R], marker="o", linestyle="--", label=f"R={R} validation")
    axes[0].set(xlabel="step", ylabel="loss (nats/token)", title="Pretraining (matched data, steps, seed)")
    axes[1].set(xlabel="step", ylabel="loss on assistant tokens (nats)", title="Instruction tuning")
    save(fig, axes, out / "training.png", legend=7)
    files.append("plots/training.png")

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [f"R={R}" for R in d.loops]
    axes[0].bar(names, [d.pretrain[R]["train_s"] / 60 for R in d.loops], color=[colors[R] for R in d.loops])
    axes[0].set(ylabel="minutes", title="Pretraining time (same steps)")
    for i, b in enumerate(d.study.p.decode_batches):
        w = 0.8 / len(d.study.p.decode_batches)
        axes[1].bar(
            [j + i * w for j in range(len(d.loops))],
            [d.cost[R]["latency_ms"][str(b)] for R in d.loops],
            width=w,
            label=f"batch {b}",
        )
    axes[1].set_xticks([j + 0.4 - 0.4 / len(d.study.p.decode_batches) for j in range(len(d.loops))], names)
    axes[1].set(ylabel="ms per decode step", title="Decode latency (single-pass engine)")
    axes[1].legend(fontsize=8)
    axes[2].bar(
        names, [d.cost[R]["kv_bytes_per_token_at_context"] / 1024 for R in d.loops], color=[colors[R] for R in d.loops]
    )
    axes[2].set(ylabel="KiB per token (bf16)", title=f"KV cache at T={d.study.p.decode_context}")
    save(fig, axes, out / "cost.png", legend=None, grid_axis="y")
    files.append("plots/cost.png")
    return files


# ----------------------------------------------------------------------------- the report
def write_study_report(study: Any) -> Path:
    p = study.p
    out = Path(study.out)
    lines = [
        f"# Loop-count study (preset `{p.name}`)",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')} on {platform.node() or 'this machine'} "
        f"({platform.machine()}, Python {platform.python_version()}).",
        "",
    ]
    summary: dict[str, Any] = {"preset": p.to_dict()}
    if p.depth is not None:
        depth_lines, summary["depth"] = depth_section(DepthData.load(p.depth, study.results), out)
        lines += depth_lines
    if p.loops:
        code_lines, code_summary = code_section(study)
        lines += code_lines
        summary.update(code_summary)
    files = [
        "`summary.json`: every figure above",
        "`stages/`: the cache that lets a re-run skip finished work",
        "`runs/`: training runs (metrics, checkpoints in the released layout)",
    ]
    if p.depth is not None:
        files.append(
            "`depth/eval/*.json`: each depth model's per-item outcomes; `depth/diagnostics/`: the full "
            "diagnostics of the first seed's depth models"
        )
    if p.loops:
        files.append(
            "`eval/R*/results.json`: the code models' per-item outcomes; `diagnostics/`: their full diagnostics report"
        )
    lines += ["## Files", "", *[f"- {f}" for f in files], ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    return report


def code_section(study: Any) -> tuple[list[str], dict[str, Any]]:
    """The code language model's part of the report, and its figures for summary.json."""
    d = StudyData(study)
    p = study.p
    out = Path(study.out)
    comps = comparisons(d)
    best, reasons = recommend_loops(d, comps)
    plots = write_plots(d, out / "plots")
    manifest = study.results["data"]["manifest"]  # the build's split sizes, kept by the data stage
    extra = f" plus {p.pretrain_reasoning} synthetic `{p.family}` programs" if p.pretrain_reasoning else ""
    sft_extra = f" plus {p.sft_reasoning} `{p.family}` programs as chat" if p.sft_reasoning else ""
    evals = [
        f"HumanEval pass@1 (greedy, sandboxed, {p.humaneval_limit or 164} problems)",
        "bits per byte on the held-out code split",
    ]
    if d.has_reasoning:
        evals.insert(
            0,
            f"{p.eval_reasoning_n} held-out `{p.family}` programs per difficulty "
            f"({', '.join(map(str, p.eval_steps))} dependent steps; disjoint from training by "
            f"construction)",
        )
    lines = [
        "## The code language model",
        "",
        f"Loop counts R = {', '.join(map(str, d.loops))}, matched in everything else: the same data in the same "
        f"order, the same steps, seed and optimiser, the same layers (weights are shared across loops; R >= 2 "
        f"adds one gate per layer), the same instruction tuning and the same held-out evaluation.",
        "",
        f"- Data: {p.source}{extra}, byte-level BPE with {p.vocab_size} tokens ({_tokens(manifest)}); "
        f"instruction tuning on the built-in instruction set{sft_extra}.",
        f"- Training: {p.pretrain.model.layers} layers of width {p.pretrain.model.hidden_size}, "
        f"{p.pretrain.train.steps} pretraining steps of {p.pretrain.train.global_batch_size} × "
        f"{p.pretrain.data.seq_len or p.build_seq_len} tokens and {p.sft.train.steps} instruction-tuning steps "
        f"per model.",
        f"- Evaluation: {'; '.join(evals)}.",
        "",
        "### Results per loop count",
        "",
    ]
    header = [
        "R",
        "parameters",
        "pretrain val bpb",
        "HumanEval pass@1",
        "held-out bpb",
        "pretrain time",
        "decode ms (b=1)",
        "KV KiB/token",
    ]
    if d.has_reasoning:
        header[3:3] = ["reasoning accuracy [95 % CI]", "answer NLL [95 % CI]"]
    rows = []
    for R in d.loops:
        he = d.eval[R]["tasks"]["humaneval"]
        row = [
            f"{R}",
            f"{d.cost[R]['params'] / 1e6:.2f}M",
            _fmt(d.pretrain[R]["val_bpb"]),
            f"{100 * he['pass_at_k']['pass@1']:.1f}% ({he['solved_any']}/{he['problems_total']})",
            _fmt(d.eval[R]["tasks"]["bpb"]["bits_per_byte"]),
            f"{d.pretrain[R]['train_s'] / 60:.1f} min",
            f"{d.cost[R]['latency_ms']['1']:.2f}",
            f"{d.cost[R]['kv_bytes_per_token_at_context'] / 1024:.1f}",
        ]
        if d.has_reasoning:
            rs = d.reasoning(R)["overall"]
            nll = rs["answer_nll"]
            row[3:3] = [
                percent(rs["accuracy"], *rs["ci95"]),
                f"{nll['mean']:.3f} [{nll['ci95'][0]:.3f}, {nll['ci95'][1]:.3f}]",
            ]
        rows.append(row)
    lines += [*markdown_table(header, rows), ""]
    if d.has_reasoning:
        lines += [
            "### Code reasoning by number of dependent steps",
            "",
            f"Exact-match accuracy on held-out programs (95 % Wilson interval), primary prompt style "
            f"`{d.eval[d.loops[0]]['tasks']['reasoning']['primary_style']}`. "
            "Chance is about 10 % (one-digit answers).",
            "",
        ]
        steps = sorted(d.reasoning(d.loops[0])["by_steps"], key=int)
        lines += markdown_table(
            ["steps"] + [f"R={R}" for R in d.loops],
            [
                [s]
                + [
                    percent(d.reasoning(R)["by_steps"][s]["accuracy"], *d.reasoning(R)["by_steps"][s]["ci95"])
                    for R in d.loops
                ]
                for s in steps
            ],
        )
        lines += ["", "![reasoning](plots/reasoning.png)", ""]
    lines += [
        "### Does each extra loop help? Paired comparisons",
        "",
        "Differences are taken item by item on the same held-out items (bootstrap interval for "
        "accuracy, t interval otherwise). For answer NLL and bits per byte, negative is better.",
        "",
    ]
    for name, comp in comps.items():
        lines += [f"**{name}**", ""]
        for metric, diff in comp.items():
            pct = "accuracy" in metric or "pass" in metric  # shares, shown in percentage points
            text = diff.describe(scale=100, unit=" points", digits=1) if pct else diff.describe(digits=4)
            lines.append(f"- {metric}: {text}")
        lines.append("")
    first = comps.get(f"R={d.loops[1]} vs R={d.loops[0]}") if len(d.loops) > 1 else None
    if first:
        clear = [m for m, diff in first.items() if diff.clear]
        verdict = (
            f"distinguishable from noise on {', '.join(clear)}"
            if clear
            else "not distinguishable from noise on any metric"
        )
        lines += [f"**R={d.loops[1]} vs R={d.loops[0]} is {verdict}** at this budget.", ""]
    if len(d.loops) > 2:
        lines += ["### Is the effect of R monotonic?", ""]
        for metric in HIGHER_IS_BETTER:
            if metric in next(iter(comps.values())):
                diffs = [comp[metric] for comp in comps.values()]
                lines.append(f"- {metric}: {trend(diffs, HIGHER_IS_BETTER[metric])}.")
        lines.append("")
    lines += ["### What each loop count costs", ""]
    cost_rows = []
    for R in d.loops:
        c = d.cost[R]
        cost_rows.append(
            [f"{R}", f"{d.pretrain[R]['train_s'] / 60:.1f} min", f"{d.sft[R]['train_s'] / 60:.1f} min"]
            + [f"{c['latency_ms'][str(b)]:.2f} ms" for b in p.decode_batches]
            + [f"{c['kv_bytes_per_token_at_context'] / 1024:.1f} KiB"]
        )
    lines += markdown_table(
        ["R", "pretraining", "instruction tuning"]
        + [f"decode step, batch {b}" for b in p.decode_batches]
        + [f"KV per token (bf16, T={p.decode_context})"],
        cost_rows,
    )
    lines += [
        "",
        "Decode latency is the single-pass engine on this machine (all loops of a token in one batched "
        "pass); KV memory follows 2·L·kv_heads·head_dim·(T + (R−1)(w+1)) bytes per sequence.",
        "",
        "![cost](plots/cost.png)",
        "",
        "### Training",
        "",
        "![training](plots/training.png)",
        "",
    ]
    lines += _diagnostics_section(d)
    lines += ["### Recommendation for the code model", "", f"**Recommended loop count at this scale: R = {best}.**", ""]
    lines += [f"- {r}" for r in reasons] + [""]
    summary = {
        "loops": d.loops,
        "recommended_loops": best,
        "reasons": reasons,
        "comparisons": {k: {m: diff.to_dict() for m, diff in v.items()} for k, v in comps.items()},
        "per_loop": {
            str(R): {
                "pretrain": d.pretrain[R],
                "sft": d.sft[R],
                "cost": d.cost[R],
                "reasoning": (
                    {k: v for k, v in d.reasoning(R).items() if k != "examples"} if d.has_reasoning else None
                ),
                "humaneval": d.eval[R]["tasks"]["humaneval"]["pass_at_k"],
                "bpb": d.eval[R]["tasks"]["bpb"]["bits_per_byte"],
            }
            for R in d.loops
        },
        "diagnostics": d.diag,
        "plots": plots,
    }
    return lines, summary


def _diagnostics_section(d: StudyData) -> list[str]:
    lines = [
        "### Loop diagnostics, side by side",
        "",
        "Per loop r of each model, mean [95 % CI] over held-out samples (definitions: docs/diagnostics.md, "
        "spec section 3). The full report with every measure and per-layer tables is "
        "[diagnostics/report.md](diagnostics/report.md).",
        "",
    ]
    models = [m for m in d.diag_models if m["num_loops"] > 1]
    if not models:
        return [*lines, "(No model with more than one loop: per-loop measures do not apply.)", ""]
    header = ["measure"] + [f"{m['name']} loop {r}" for m in models for r in range(1, m["num_loops"] + 1)]
    rows = []
    for key, label in DIAG_ROWS:
        row = [label]
        for m in models:
            for cell in m["measures"].get(key, {}).get("per_loop", []):
                row.append("n/a" if "na" in cell or cell.get("mean") is None else _fmt(cell["mean"], 3))
        rows.append(row)
    lines += markdown_table(header, rows)
    rec = d.diag.get("recommendation", {})
    lines += [
        "",
        f"The diagnostic rule recommends **R = {rec.get('loops', '?')}**: " + _rule_reasons(rec.get("reasons", [])),
        "",
        "![scissors](diagnostics/plots/scissors.png)",
        "",
    ]
    return lines


def _rule_reasons(reasons: list[str]) -> str:
    """The rule's reasons (fragments, the first ending in a colon) as one sentence."""
    if not reasons:
        return ""
    head, *rest = reasons
    text = f"{head} {'; '.join(rest)}" if head.endswith(":") and rest else "; ".join(reasons)
    return text.rstrip(".") + "."


def _tokens(stats: dict[str, Any]) -> str:
    splits = stats.get("splits") or {}
    try:
        return ", ".join(f"{name} {info['tokens'] / 1e6:.2f}M tokens" for name, info in splits.items())
    except (KeyError, TypeError):
        return "see data/build/manifest.json"
