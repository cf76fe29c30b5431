"""The depth probe: the statements' logic on hand-made numbers, and the stage end to end (smoke preset):
matched runs through the training engine, the same held-out items for every model, the report."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from loopcoder.study import Study
from loopcoder.study.stats import compare_in_words, crossed_difference, effective_depth
from loopcoder.utils.stats import Difference


# ----------------------------------------------------------------------------- statements and statistics
def test_compare_in_words_claims_only_what_the_intervals_support():
    above = Difference(0.30, 0.20, 0.40, 400)
    straddles = Difference(0.05, -0.02, 0.12, 400)
    below = Difference(-0.10, -0.15, -0.05, 400)
    text = compare_in_words("PLT-2", "R=1", {2: straddles, 3: above, 4: above, 5: below})
    assert text.startswith("PLT-2 beats R=1 beyond noise at k = 3, 4 (k=3: +30.0 points [+20.0, +40.0]")
    assert "PLT-2 is worse than R=1 beyond noise at k = 5 (k=5: -10.0 points [-15.0, -5.0])" in text
    assert text.endswith("within noise at k = 2")
    none = compare_in_words("PLT-3", "PLT-2", {2: straddles, 3: Difference(-0.08, -0.2, 0.01, 400)})
    assert "beyond noise" not in none.replace("do not differ beyond noise", "")
    assert none == ("PLT-3 and PLT-2 do not differ beyond noise at any k (largest gap k=3: -8.0 points [-20.0, +1.0])")
    # an interval touching 0 is not "beyond noise"
    edge = compare_in_words("b", "a", {3: Difference(0.2, 0.0, 0.4, 10)})
    assert "do not differ" in edge


def test_crossed_difference_carries_the_seed_spread():
    rng = np.random.default_rng(0)
    a = (rng.random((3, 400)) < 0.5).astype(float)
    consistent = np.clip(a + (rng.random((3, 400)) < 0.4), 0, 1)  # every seed better
    d = crossed_difference(a, consistent)
    assert d.clear and d.low > 0 and d.mean == pytest.approx((consistent - a).mean())
    one_seed = a.copy()
    one_seed[0] = 1.0  # a large gain in one seed only: not a finding about the architecture
    d1 = crossed_difference(a, one_seed)
    assert d1.mean > 0.1 and not d1.clear
    # with one seed it is the items' bootstrap: the same large gain is then beyond noise
    assert crossed_difference(a[:1], one_seed[:1]).clear
    assert not crossed_difference(a, a).clear and crossed_difference(a, a).mean == 0
    with pytest.raises(ValueError):
        crossed_difference(np.zeros(3), np.zeros(3))


def test_effective_depth_is_the_longest_solved_prefix():
    assert effective_depth({1: 1.0, 2: 0.95, 3: 0.9, 4: 0.5, 5: 0.95}) == 3
    assert effective_depth({1: 0.89, 2: 1.0}) == 0
    assert effective_depth({1: 1.0, 2: 1.0}) == 2
    assert effective_depth({2: 1.0, 3: 1.0}) == 0  # k = 1 not measured: nothing is established


# ----------------------------------------------------------------------------- the stage
def _config(run_dir: str) -> dict:
    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())


@pytest.mark.slow
def test_runs_are_matched_except_for_the_architecture(study_run):
    preset, out, _, _ = study_run
    s = preset.depth
    results = {
        f"{m.key}-s{seed}": json.loads((out / "stages" / f"depth-{m.key}-s{seed}.json").read_text())["result"]
        for m in s.models
        for seed in s.seeds
    }
    for seed in s.seeds:
        configs = {m.key: _config(results[f"{m.key}-s{seed}"]["run_dir"]) for m in s.models}
        for m in s.models:
            c = configs[m.key]
            assert (c["model"]["loops"], c["model"]["architecture"], c["model"]["loop_offset"]) == (
                m.loops,
                m.architecture,
                m.loop_offset,
            )
            assert c["seed"] == seed and c["stage"] == "pretrain"
            for key in ("loops", "architecture", "loop_offset"):
                c["model"].pop(key)
            c.pop("out")
        first = configs[s.models[0].key]
        assert all(c == first for c in configs.values())  # steps, batch, LR, schedule, shape: identical
    for r in results.values():  # trained by the training engine to the end, with a validation curve
        assert r["step"] == s.train.train.steps
        metrics = [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert sum(m["kind"] == "val" for m in metrics) >= 2


@pytest.mark.slow
def test_every_model_answers_the_same_held_out_items(study_run):
    preset, out, _, _ = study_run
    s = preset.depth
    files = json.loads((out / "stages" / "depth-eval.json").read_text())["result"]["files"]
    assert set(files) == {f"{m.key}-s{seed}" for m in s.models for seed in s.seeds}
    sizes = {
        key: {k: len(v["correct"]) for k, v in json.loads(Path(f).read_text()).items()} for key, f in files.items()
    }
    assert len({tuple(sorted(v.items())) for v in sizes.values()}) == 1
    assert set(next(iter(sizes.values()))) == {str(k) for k in s.eval_lengths}


@pytest.mark.slow
def test_cost_counts_passes_and_kv(study_run):
    preset, out, _, _ = study_run
    cost = json.loads((out / "stages" / "depth-cost.json").read_text())["result"]
    assert cost["r1"]["passes"] == 1 and cost["plt2"]["passes"] == 1  # single pass
    assert cost["plt2-no-offset"]["passes"] == 2 and cost["vanilla2"]["passes"] == 2  # one pass per loop
    assert all(c["latency_s"] > 0 for c in cost.values())
    T, w = preset.depth.decode_context, preset.depth.train.model.window
    per_entry = cost["r1"]["kv_bytes_per_sequence"] // T
    assert cost["plt2"]["kv_bytes_per_sequence"] == per_entry * (T + min(w + 1, T))  # T + (R-1)(w+1)
    assert cost["plt2-no-offset"]["kv_bytes_per_sequence"] == cost["plt2"]["kv_bytes_per_sequence"]
    assert cost["vanilla2"]["kv_bytes_per_sequence"] == 2 * per_entry * T


@pytest.mark.slow
def test_report_leads_with_the_depth_probe_and_its_claims_match_the_intervals(study_run):
    preset, out, report, _ = study_run
    text = report.read_text()
    assert text.index("## What a second loop buys") < text.index("## The code language model")
    assert "![accuracy by k](plots/depth.png)" in text and (out / "plots" / "depth.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())["depth"]
    assert set(summary["accuracy"]) == {m.key for m in preset.depth.models}
    for finding in summary["findings"]:
        assert finding in text
    comps = summary["comparisons"]
    claimed = re.search(r"PLT-2 beats R=1 beyond noise at k = ([\d, ]+)", text)
    clear = sorted(
        int(k) for k, v in comps["plt2 - r1"].items() if k != "fresh" and v["distinguishable"] and v["mean"] > 0
    )
    assert (claimed is None and not clear) or [int(k) for k in claimed.group(1).split(", ")] == clear
    assert "**Does PLT-2 beat R = 1?**" in text and "**PLT-2 against its no-offset twin:**" in text
    assert "effective depth" in text and "passes per token" in text and "Convergence: validation answer loss" in text
    diag = summary["diagnostics"]
    assert set(diag["rule_picks"]) == {str(seed) for seed in preset.depth.seeds}


@pytest.mark.slow
def test_a_second_run_trains_nothing(study_run):
    preset, out, _, first_log = study_run
    # the pool's announcement (`Study.parallel`): present in the first run, so its absence below means something
    trained = re.compile(r"training \d+ runs, \d+ at a time")
    assert trained.search(first_log) and "depth-plt2-s0: finished" in first_log
    log = io.StringIO()
    Study(preset, out, log=log).run()
    assert "depth probe: training" not in log.getvalue()
    assert not trained.search(log.getvalue()) and "depth-plt2-s0: done earlier, skipped" in log.getvalue()
    assert "depth-eval: done earlier, skipped" in log.getvalue()


def _made_up(acc: dict[str, dict[int, list[float]]], items: int = 200):
    """DepthData whose models answer a fixed share of `items` items correctly, per seed and k."""
    from loopcoder.study.depth_report import DepthData
    from loopcoder.study.presets import PLT2, PLT2_NO_OFFSET, PLT3, R1, DepthSettings

    models = (R1, PLT2, PLT3, PLT2_NO_OFFSET)
    s = DepthSettings(models=models, seeds=(0, 1, 2), eval_lengths=(1, 2, 3))
    correct = {}
    for key, by_k in acc.items():
        correct[key] = {
            k: np.array([(np.arange(items) < share * items).astype(float) for share in shares])
            for k, shares in by_k.items()
        }
    cost = {m.key: {"latency_s": 1e-3 * (1 if m.single_pass else m.loops)} for m in models}
    return DepthData(s, correct, {}, cost, {})


def test_findings_on_made_up_results():
    from loopcoder.study.depth_report import comparisons, findings

    d = _made_up(
        {
            "r1": {1: [1, 1, 1], 2: [0.9, 0.9, 0.9], 3: [0.2, 0.25, 0.2]},
            "plt2": {1: [1, 1, 1], 2: [0.9, 0.95, 0.9], 3: [0.7, 0.6, 0.8]},  # better at k = 3 in every seed
            "plt3": {1: [1, 1, 1], 2: [0.6, 0.5, 0.55], 3: [0.3, 0.3, 0.35]},  # worse than PLT-2
            "plt2-no-offset": {1: [1, 1, 1], 2: [0.9, 0.95, 0.9], 3: [0.9, 0.2, 0.7]},  # seed-dependent
        }
    )
    diffs = {(a, b): d.difference(a, b) for a, b, _ in comparisons(d)}
    text = "\n".join(findings(d, diffs))
    assert "PLT-2 beats R=1 beyond noise at k = 3 " in text and "within noise at k = 1, 2" in text
    assert "Over all fresh items PLT-3 regresses from PLT-2" in text
    assert "PLT-3 is worse than PLT-2 beyond noise at k = 2, 3" in text
    # the twin differs from PLT-2 a lot in single seeds, in both directions: no claim either way
    assert "the offset's cost in accuracy is within noise" in text
    assert "decodes all 2 loops in one pass, the twin in 2 passes" in text
