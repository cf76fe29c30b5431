"""The depth probe's part of the report: accuracy against k, the comparisons in words, gain against cost
and the diagnostics, from the cached stage results (docs/study.md says how to read them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from loopcoder.diagnostics.report import markdown_table
from loopcoder.study.figures import pyplot, save
from loopcoder.study.presets import DepthModel, DepthSettings
from loopcoder.study.stats import compare_in_words, crossed_difference, effective_depth
from loopcoder.training.metrics import read_metrics
from loopcoder.utils.stats import Difference, wilson_interval

COLORS = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb"]


@dataclass
class DepthData:
    """Per model: correctness (seeds, items) per k, training and cost results, diagnostics."""

    s: DepthSettings
    correct: dict[str, dict[int, np.ndarray]]  # model key -> k -> (seeds, items) of 0/1
    train: dict[str, list[dict[str, Any]]]  # model key -> one training result per seed
    cost: dict[str, dict[str, Any]]
    diag: dict[str, Any]

    @classmethod
    def load(cls, s: DepthSettings, results: dict[str, Any]) -> DepthData:
        files = results["depth-eval"]["files"]
        correct: dict[str, dict[int, np.ndarray]] = {}
        for m in s.models:
            per_seed = [json.loads(Path(files[f"{m.key}-s{seed}"]).read_text()) for seed in s.seeds]
            correct[m.key] = {
                k: np.array([r[str(k)]["correct"] for r in per_seed], dtype=np.float64) for k in s.eval_lengths
            }
        train = {m.key: [results[f"depth-{m.key}-s{seed}"] for seed in s.seeds] for m in s.models}
        return cls(s, correct, train, results["depth-cost"], results["depth-diagnostics"])

    @cached_property
    def val_curves(self) -> dict[str, list[dict[int, float]]]:
        """Per model: each seed's validation loss by step (runs that logged none left out), read once."""
        return {key: [c for c in (_val_curve(r["run_dir"]) for r in runs) if c] for key, runs in self.train.items()}

    def model(self, key: str) -> DepthModel:
        return next(m for m in self.s.models if m.key == key)

    def has(self, key: str) -> bool:
        return key in self.correct

    def accuracy(self, key: str, k: int) -> tuple[float, float, float]:
        """Over every seed and item: the share correct and its 95 % Wilson interval."""
        c = self.correct[key][k]
        low, high = wilson_interval(int(c.sum()), c.size)
        return float(c.mean()), low, high

    def fresh(self, key: str) -> np.ndarray:
        """(seeds, items) over every k >= 2: the items never seen in training."""
        return np.concatenate([self.correct[key][k] for k in self.s.eval_lengths if k >= 2], axis=1)

    def depth(self, key: str, seed_index: int | None = None) -> int:
        acc = {k: float(c.mean() if seed_index is None else c[seed_index].mean()) for k, c in self.correct[key].items()}
        return effective_depth(acc)

    def difference(self, a: str, b: str) -> dict[Any, Difference]:
        """b - a per k and over all fresh items ("fresh")."""
        out: dict[Any, Difference] = {
            k: crossed_difference(self.correct[a][k], self.correct[b][k]) for k in self.s.eval_lengths
        }
        out["fresh"] = crossed_difference(self.fresh(a), self.fresh(b))
        return out


def comparisons(d: DepthData) -> list[tuple[str, str, str]]:
    """(a, b, why) pairs the report compares as b - a, when both models were trained."""
    pairs = [("r1", "plt2", "what a second loop buys"), ("plt2", "plt3", "what a third loop adds")]
    for R in (2, 3):
        pairs.append((f"plt{R}-no-offset", f"plt{R}", "what CLP's offset costs"))
        pairs.append((f"vanilla{R}", f"plt{R}", "against the classic looped transformer"))
    pairs.append(("r1", "vanilla2", "whether vanilla loops help at all"))
    return [(a, b, why) for a, b, why in pairs if d.has(a) and d.has(b)]


def percent(p: float, low: float | None = None, high: float | None = None) -> str:
    """A share as a percentage, with its interval when given: `61.2% [55.0, 67.1]`."""
    return f"{100 * p:.1f}%" + ("" if low is None else f" [{100 * low:.1f}, {100 * high:.1f}]")


def _points(diff: Difference) -> str:
    return (
        diff.describe(unit="", scale=100, digits=1)
        .replace(" (distinguishable from noise)", " ✓")
        .replace(" (within noise)", "")
    )


def findings(d: DepthData, diffs: dict[tuple[str, str], dict[Any, Difference]]) -> list[str]:
    """The report's statements in words, each claiming only what its intervals support."""
    name = {m.key: m.name for m in d.s.models}
    by_k = lambda a, b: {k: v for k, v in diffs[(a, b)].items() if k != "fresh"}
    out = []

    def overall(a: str, b: str) -> str:
        f = diffs[(a, b)]["fresh"]
        verdict = (
            "higher beyond noise"
            if f.clear and f.mean > 0
            else "lower beyond noise"
            if f.clear
            else "not distinguishable from noise"
        )
        return f"over all fresh items (k ≥ 2) {name[b]} is {verdict}: {_points(f)} points"

    if ("r1", "plt2") in diffs:
        out.append(
            f"**Does PLT-2 beat R = 1?** {compare_in_words('PLT-2', 'R=1', by_k('r1', 'plt2'))}; "
            f"{overall('r1', 'plt2')}."
        )
    if ("plt2", "plt3") in diffs:
        f = diffs[("plt2", "plt3")]["fresh"]
        verdict = (
            "adds to PLT-2"
            if f.clear and f.mean > 0
            else "regresses from PLT-2"
            if f.clear
            else "neither adds to nor regresses from PLT-2 beyond noise"
        )
        out.append(
            f"**Does PLT-3 add to PLT-2?** Over all fresh items PLT-3 {verdict} ({_points(f)} points). "
            f"By k: {compare_in_words('PLT-3', 'PLT-2', by_k('plt2', 'plt3'))}."
        )
    for R in (2, 3):
        a, b = f"plt{R}-no-offset", f"plt{R}"
        if (a, b) in diffs:
            f = diffs[(a, b)]["fresh"]
            cost = (
                "the offset costs accuracy beyond noise"
                if f.clear and f.mean < 0
                else "the offset gains accuracy beyond noise"
                if f.clear
                else "the offset's cost in accuracy is within noise"
            )
            lat = _latency_ratio(d, a, b)
            out.append(
                f"**PLT-{R} against its no-offset twin:** {cost} ({_points(f)} points over fresh items; "
                f"{compare_in_words(f'PLT-{R}', f'PLT-{R} no offset', by_k(a, b))}). In exchange, PLT-{R} "
                f"decodes all {R} loops in one pass, the twin in {R} passes{lat}."
            )
        a = f"vanilla{R}"
        if (a, b) in diffs:
            out.append(
                f"**PLT-{R} against vanilla-{R}:** {compare_in_words(f'PLT-{R}', f'vanilla-{R}', by_k(a, b))}; "
                f"{overall(a, b)}."
            )
    if ("r1", "vanilla2") in diffs:
        out.append(f"**Vanilla-2 against R = 1:** {overall('r1', 'vanilla2')}.")
    return out


def _latency_ratio(d: DepthData, a: str, b: str) -> str:
    ca, cb = d.cost.get(a), d.cost.get(b)
    if not ca or not cb:
        return ""
    return f" (decode step {1e3 * cb['latency_s']:.2f} ms against {1e3 * ca['latency_s']:.2f} ms here)"


def write_plot(d: DepthData, out: Path) -> str:
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ks = list(d.s.eval_lengths)
    for i, m in enumerate(d.s.models):
        acc = [d.accuracy(m.key, k) for k in ks]
        style = "-" if m.architecture == "plt" and m.loop_offset else ("--" if m.architecture == "plt" else ":")
        axes[0].errorbar(
            ks,
            [100 * a for a, _, _ in acc],
            yerr=[[100 * (a - lo) for a, lo, _ in acc], [100 * (hi - a) for a, _, hi in acc]],
            marker="o",
            capsize=3,
            linestyle=style,
            color=COLORS[i % len(COLORS)],
            label=m.name,
        )
        curves = d.val_curves.get(m.key, [])
        if curves:
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            axes[1].plot(
                steps,
                [np.mean([c[s] for c in curves]) for s in steps],
                marker=".",
                linestyle=style,
                color=COLORS[i % len(COLORS)],
                label=m.name,
            )
    axes[0].axhline(100 / d.s.symbols, color="grey", linewidth=0.8, linestyle=":")
    axes[0].axvline(1.5, color="grey", linewidth=0.5)
    axes[0].set(
        xlabel="steps k (k = 1: trained items; k ≥ 2: held out)",
        ylabel="accuracy (%)",
        title=f"Permutation composition: accuracy by k ({len(d.s.seeds)} seeds, 95 % Wilson)",
        ylim=(0, 102),
    )
    axes[1].set(
        xlabel="training step", ylabel="answer loss on validation rows (nats)", title="Training (mean over seeds)"
    )
    save(fig, axes, out / "depth.png")
    return "plots/depth.png"


def convergence(d: DepthData) -> dict[str, tuple[float, float, bool]]:
    """Per model: the validation loss (mean over seeds) at the evaluation nearest 3/4 of training and at
    the end, and whether it fell by more than 5 % in between."""
    out = {}
    for m in d.s.models:
        curves = d.val_curves.get(m.key, [])
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if len(steps) < 2:
            continue
        end = steps[-1]
        mid = min(steps[:-1], key=lambda x: abs(x - 0.75 * end))
        a, b = (float(np.mean([c[x] for c in curves])) for x in (mid, end))
        out[m.name] = (a, b, b < 0.95 * a)
    return out


def _val_curve(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if r.get("kind") == "val"}


def depth_section(d: DepthData, out: Path) -> tuple[list[str], dict[str, Any]]:
    """The report's lines on the depth probe, and everything in them for summary.json."""
    s = d.s
    t = s.train
    pairs = comparisons(d)
    diffs = {(a, b): d.difference(a, b) for a, b, _ in pairs}
    plot = write_plot(d, out / "plots")
    ks = list(s.eval_lengths)
    lines = [
        "## What a second loop buys: the depth probe",
        "",
        f"The task (docs/study.md): {s.functions} fixed random permutations of {s.symbols} symbols, never shown "
        f"in context; an item `x a_1 … a_k{' =' if s.equals else ''}` asks for f_(a_k)(…f_(a_1)(x)), so each step "
        f"needs the previous one's result. Items of k = 1 are the permutation tables (all trained on); every item "
        f"of k ≥ 2 evaluated here was held out of training ({100 * s.eval_share:.0f} % of each k, by a fixed hash). "
        f"Every model has {t.model.layers} layer{'' if t.model.layers == 1 else 's'} of width {t.model.hidden_size} "
        f"and is trained through the "
        f"training engine for {t.train.steps} steps of {t.train.global_batch_size} × {s.seq_len} tokens "
        f"(items of k = {min(s.train_lengths)}–{max(s.train_lengths)}, loss on answers only, peak LR "
        f"{t.optim.lr:g}), with seeds {', '.join(map(str, s.seeds))}: each seed fixes the initialisation, the "
        f"training rows and their order, the same for every model. Only the loop architecture differs.",
        "",
        f"![accuracy by k]({plot})",
        "",
        f"Accuracy over {len(s.seeds)} seeds × up to {s.eval_items} items per k, with its 95 % Wilson interval; "
        f"effective depth is the largest k up to which every k is solved at ≥ 90 % (per seed in brackets). "
        f"Chance is {100 / s.symbols:.1f} %.",
        "",
    ]
    rows = []
    for m in s.models:
        acc = [d.accuracy(m.key, k) for k in ks]
        seeds = ", ".join(str(d.depth(m.key, i)) for i in range(len(s.seeds)))
        rows.append([m.name] + [percent(*a) for a in acc] + [f"{d.depth(m.key)} ({seeds})"])
    lines += markdown_table(["model"] + [f"k={k}" for k in ks] + ["effective depth"], rows)
    conv = convergence(d)
    if conv:
        still = [name for name, (_, _, falling) in conv.items() if falling]
        lines += [
            "",
            "Convergence: validation answer loss over the last quarter of training, mean over seeds: "
            + "; ".join(f"{name} {a:.3f} → {b:.3f}" for name, (a, b, _) in conv.items())
            + ". "
            + (
                f"{', '.join(still)} {'was' if len(still) == 1 else 'were'} still improving (the loss fell "
                "by more than 5 %) when training stopped: the comparisons describe this budget, and longer "
                "training could change them."
                if still
                else "No model's loss fell by more than 5 % over that span."
            ),
        ]
    stated = findings(d, diffs)
    lines += ["", "### In words", ""]
    lines += [f"- {f}" for f in stated]
    lines += [
        "",
        "Each difference is b − a on the same items and seeds, in points, with a 95 % bootstrap interval "
        "that resamples seeds and items together (so it carries the seed-to-seed spread); ✓ marks an "
        "interval that excludes 0. With this many k and comparisons, expect about one spurious ✓ in twenty "
        "cells: a claim resting on a single k is weak.",
        "",
    ]
    header = ["b − a", "why"] + [f"k={k}" for k in ks] + ["all fresh (k ≥ 2)"]
    name = {m.key: m.name for m in s.models}
    lines += markdown_table(
        header,
        [
            [f"{name[b]} − {name[a]}", why]
            + [_points(diffs[(a, b)][k]) for k in ks]
            + [_points(diffs[(a, b)]["fresh"])]
            for a, b, why in pairs
        ],
    )
    lines += ["", "Accuracy per seed (a seed is one initialisation and data order, shared by the models):", ""]
    seed_rows = [
        [m.name, str(seed)] + [f"{100 * d.correct[m.key][k][i].mean():.0f}" for k in ks]
        for m in s.models
        for i, seed in enumerate(s.seeds)
    ]
    lines += markdown_table(["model", "seed"] + [f"k={k}" for k in ks], seed_rows)
    cost_lines, cost = cost_table(d)
    diag_lines, diag = diagnostics_section(d, diffs)
    lines += ["", *cost_lines, *diag_lines]
    summary = {
        "eval_lengths": list(ks),
        "seeds": list(s.seeds),
        "names": {m.key: m.name for m in s.models},
        "accuracy": {m.key: {str(k): d.accuracy(m.key, k) for k in ks} for m in s.models},
        "accuracy_per_seed": {
            m.key: {
                str(seed): {str(k): float(d.correct[m.key][k][i].mean()) for k in ks} for i, seed in enumerate(s.seeds)
            }
            for m in s.models
        },
        "effective_depth": {m.key: d.depth(m.key) for m in s.models},
        "comparisons": {f"{b} - {a}": {str(k): v.to_dict() for k, v in diffs[(a, b)].items()} for a, b, _ in pairs},
        "findings": stated,
        "cost": cost,
        "diagnostics": diag,
        "plot": plot,
        "convergence": {
            name: {"loss_at_three_quarters": a, "loss_at_end": b, "still_falling": f}
            for name, (a, b, f) in conv.items()
        },
    }
    return lines, summary


def cost_table(d: DepthData) -> tuple[list[str], dict[str, Any]]:
    s = d.s
    base = d.train["r1"] if d.has("r1") else next(iter(d.train.values()))
    base_cpu = np.mean([r["cpu_s"] for r in base])
    rows, cost = [], {}
    for m in s.models:
        c = d.cost[m.key]
        cpu = float(np.mean([r["cpu_s"] for r in d.train[m.key]]))
        wall = float(np.mean([r["train_s"] for r in d.train[m.key]]))
        fresh = d.fresh(m.key).mean()
        cost[m.key] = {
            "params": c["params"],
            "effective_depth": d.depth(m.key),
            "fresh_accuracy": float(fresh),
            "train_cpu_s": cpu,
            "train_wall_s": wall,
            "decode_ms": 1e3 * c["latency_s"],
            "passes": c["passes"],
            "kv_bytes": c["kv_bytes_per_sequence"],
        }
        rows.append(
            [
                m.name,
                f"{c['params'] / 1e3:.1f}k",
                str(d.depth(m.key)),
                f"{100 * fresh:.1f}%",
                f"{cpu:.0f} s ({cpu / base_cpu:.2f}×)",
                f"{wall:.0f} s",
                f"{1e3 * c['latency_s']:.2f} ms",
                str(c["passes"]),
                f"{c['kv_bytes_per_sequence'] / 1024:.1f} KiB",
            ]
        )
    lines = [
        "### Gain against cost",
        "",
        f"Training time is per run, the mean over seeds: CPU seconds (one thread; the figure a quiet "
        f"machine's wall time approaches) and wall seconds (runs shared the machine, "
        f"{base[0].get('pool_size', 1)} at a time). "
        f"Decode is the engine's median step for one sequence after a {s.decode_context}-token prompt (one "
        f"thread, the models taking turns for {s.decode_rounds} rounds); KV is the cache one sequence needs "
        f"at that length (fp32).",
        "",
    ]
    lines += markdown_table(
        [
            "model",
            "parameters",
            "effective depth",
            "fresh accuracy (k ≥ 2)",
            "training CPU",
            "training wall",
            "decode step",
            "passes per token",
            f"KV at T={s.decode_context}",
        ],
        rows,
    )
    return [*lines, ""], cost


def diagnostics_section(
    d: DepthData, diffs: dict[tuple[str, str], dict[Any, Difference]]
) -> tuple[list[str], dict[str, Any]]:
    """Does the paper's diagnostic rule pick the loop count that wins on accuracy?"""
    per_seed = d.diag["per_seed"]
    family = [m for m in d.s.models if m.architecture == "plt" and m.loop_offset]
    lines = [
        "### The loop diagnostics on the depth models",
        "",
        "The paper's rule (spec section 3, docs/diagnostics.md) run on the same models, on rows of training "
        "items; it is decided by the PLT model with the most loops, per seed.",
    ]
    out: dict[str, Any] = {"per_seed": per_seed}
    if len(family) < 2:
        return [*lines, "", "(Fewer than two PLT loop counts: nothing to choose between.)", ""], out
    best = max(family, key=lambda m: d.fresh(m.key).mean())
    tied = [m for m in family if m is best or not d_clear(d, m.key, best.key)]
    picks = {seed: entry["recommendation"]["loops"] for seed, entry in per_seed.items() if entry["recommendation"]}
    winners = {m.loops for m in tied}
    agree = [seed for seed, r in picks.items() if r in winners]
    tied_names = ", ".join(m.name for m in tied if m is not best)
    lines += [
        "",
        f"- On accuracy over fresh items, **{best.name}** is best"
        + (f" ({tied_names} within noise of it)" if tied_names else " (beyond noise)")
        + ".",
        "- The rule picks "
        + ", ".join(f"R = {r} (seed {seed})" for seed, r in picks.items())
        + f": it picks a loop count that wins on accuracy in {len(agree)} of {len(picks)} seeds.",
    ]
    verdicts = {
        m.key: [per_seed[str(seed)]["verdicts"].get(m.key) for seed in d.s.seeds] for m in d.s.models if m.loops > 1
    }
    lines += [
        "- Each model's own verdict (loops worth it, by seed): "
        + "; ".join(f"{d.model(k).name}: {', '.join(map(str, v))}" for k, v in verdicts.items())
        + "."
    ]
    first = per_seed[str(d.s.seeds[0])]
    if first.get("dir"):
        lines += [
            f"- The full diagnostics of seed {d.s.seeds[0]}'s models: "
            f"[depth/diagnostics/report.md](depth/diagnostics/report.md)."
        ]
    lines.append("")
    out.update(
        {
            "accuracy_best": best.key,
            "within_noise_of_best": [m.key for m in tied],
            "rule_picks": picks,
            "agreeing_seeds": agree,
            "verdicts": verdicts,
        }
    )
    return lines, out


def d_clear(d: DepthData, a: str, b: str) -> bool:
    """Whether b's fresh accuracy differs from a's beyond noise."""
    return crossed_difference(d.fresh(a), d.fresh(b)).clear
