"""`loopcoder swe report`: several runs of the agent on the same tasks in one report.

Per run: the resolved rate with its 95 % Wilson interval, overall and by difficulty (lines and files
the gold patch changes); how episodes ended; turns, tokens, prefix-cache hits and time per task.
Between runs: the paired difference in resolved rate over the instances both ran (each run against the
first, e.g. R = 2 against R = 1), with the percentile-bootstrap interval of `stats.paired_difference`.
"""

from __future__ import annotations

import json
import statistics as pystats
from collections import Counter
from pathlib import Path
from typing import Any

from loopcoder.swe.taskset import difficulty_label
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.stats import paired_difference, wilson_interval


def load_run(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except OSError:
        raise LoopcoderError(f"{path}: no results.json (a directory from `loopcoder swe run`)") from None
    except ValueError as e:
        raise LoopcoderError(f"{f}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("instances"), dict):
        raise LoopcoderError(f"{f}: not the results of `loopcoder swe run`")
    data["path"] = str(path)
    return data


def _rate(resolved: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(resolved, n)
    return {"n": n, "resolved": resolved, "rate": resolved / n if n else float("nan"), "ci95": [low, high]}


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run (only instances with a score count)."""
    scored = {i: r for i, r in run["instances"].items() if "report" in r}
    resolved = {i for i, r in scored.items() if r["report"]["resolved"]}
    by_label: dict[str, list[str]] = {}
    for i, r in scored.items():
        by_label.setdefault(difficulty_label(r.get("difficulty")), []).append(i)

    def spread(key: str) -> dict[str, float] | None:
        values = [r[key] for r in scored.values() if r.get(key) is not None]
        if not values:
            return None
        return {"mean": pystats.fmean(values), "median": pystats.median(values), "max": max(values)}

    return {
        "name": run.get("name") or run.get("model"),
        "overall": _rate(len(resolved), len(scored)),
        "by_difficulty": {k: _rate(len(set(v) & resolved), len(v)) for k, v in sorted(by_label.items())},
        "exit_status": dict(Counter(r["exit_status"] for r in scored.values()).most_common()),
        "patch_applied": sum(1 for r in scored.values() if r["report"]["patch_successfully_applied"]),
        "errors": dict(Counter(r["report"]["error"] for r in scored.values() if r["report"]["error"]).most_common()),
        **{k: spread(k) for k in ("turns", "completion_tokens", "prompt_tokens", "cached_tokens", "seconds")},
        "resolved_ids": sorted(resolved),
    }


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run against the first, over the instances both scored: resolved (1/0) paired by instance."""
    out = []
    first = runs[0]
    for other in runs[1:]:
        a_runs, b_runs = first["instances"], other["instances"]
        common = sorted(i for i in a_runs if "report" in a_runs[i] and "report" in b_runs.get(i, {}))
        a = [float(a_runs[i]["report"]["resolved"]) for i in common]
        b = [float(b_runs[i]["report"]["resolved"]) for i in common]
        d = paired_difference(a, b)
        out.append(
            {"a": _name(first), "b": _name(other), "difference": d.to_dict(), "describe": d.describe(" points", 100, 1)}
        )
    return out


def _name(run: dict[str, Any]) -> str:
    return run.get("name") or run.get("model") or run["path"]


def _pct(r: dict[str, Any]) -> str:
    if not r["n"]:
        return "-"
    low, high = r["ci95"]
    return f"{r['resolved']}/{r['n']} = {100 * r['rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def _num(s: dict[str, float] | None, digits: int = 1) -> str:
    return "-" if s is None else f"{s['mean']:.{digits}f} ({s['median']:.{digits}f})"


def markdown(runs: list[dict[str, Any]]) -> str:
    """The report's text: summary table, by difficulty, paired differences, per task."""
    if not runs:
        raise LoopcoderError("no runs to report")
    sums = [summarize(r) for r in runs]
    lines = [
        "# SWE agent runs",
        "",
        "Resolved: every FAIL_TO_PASS test passes and every PASS_TO_PASS test still passes (SWE-bench's"
        " RESOLVED_FULL); 95 % Wilson intervals. Per task: mean (median).",
        "",
        "| run | resolved | patches applied (empty ones are not run) | exits | turns | tokens generated "
        "| prompt tokens | prefix-cache hits | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run, s in zip(runs, sums):
        exits = ", ".join(f"{k} {v}" for k, v in s["exit_status"].items())
        lines.append(
            f"| {_name(run)} | {_pct(s['overall'])} | {s['patch_applied']}/{s['overall']['n']} | {exits} "
            f"| {_num(s['turns'])} | {_num(s['completion_tokens'], 0)} | {_num(s['prompt_tokens'], 0)} "
            f"| {_num(s['cached_tokens'], 0)} | {_num(s['seconds'])} |"
        )
    labels = sorted({k for s in sums for k in s["by_difficulty"]})
    lines += ["", "By difficulty (lines and files the gold patch changes):", ""]
    lines += ["| run | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for run, s in zip(runs, sums):
        cells = [_pct(s["by_difficulty"][k]) if k in s["by_difficulty"] else "-" for k in labels]
        lines.append(f"| {_name(run)} | " + " | ".join(cells) + " |")
    if len(runs) > 1:
        lines += ["", "Paired difference in resolved rate (same instances; percentile bootstrap):", ""]
        for c in compare(runs):
            lines.append(f"- {c['b']} − {c['a']}: {c['describe']} over {c['difference']['n']} instances")
    ids = sorted({i for r in runs for i in r["instances"]})
    lines += ["", "Per task (resolved, turns, tokens generated, seconds; exit status):", ""]
    lines += ["| instance | difficulty | " + " | ".join(_name(r) for r in runs) + " |"]
    lines += ["|---|---|" + "---|" * len(runs)]
    for i in ids:
        cells, diff = [], None
        for r in runs:
            e = r["instances"].get(i)
            if e is None or "report" not in e:
                cells.append("-")
                continue
            diff = e.get("difficulty") or diff
            mark = "✓" if e["report"]["resolved"] else "✗"
            cells.append(f"{mark} {e['turns']} / {e['completion_tokens']} / {e['seconds']:.0f}s; {e['exit_status']}")
        lines.append(f"| {i} | {difficulty_label(diff)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
