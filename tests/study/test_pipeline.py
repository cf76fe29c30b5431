"""The loop-count study end to end on a seconds-sized preset: every stage, the report, caching, resume.
(The depth probe's own checks: test_depth.py.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from loopcoder.cli import main
from loopcoder.study import Study, get_preset
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.stats import paired_difference, trend

pytestmark = pytest.mark.slow  # end-to-end: seconds each


def test_every_stage_runs_and_the_report_has_every_section(study_run):
    preset, out, report, _log = study_run
    assert report == out / "report.md" and report.is_file()
    text = report.read_text()
    sections = [
        "## What a second loop buys: the depth probe",
        "### Gain against cost",
        "### The loop diagnostics on the depth models",
        "## The code language model",
        "### Results per loop count",
        "### Code reasoning by number of dependent steps",
        "### Does each extra loop help? Paired comparisons",
        "### Is the effect of R monotonic?",
        "### What each loop count costs",
        "### Loop diagnostics, side by side",
        "### Recommendation for the code model",
        "## Files",
    ]
    at = [text.index(section) for section in sections]
    assert at == sorted(at)  # the depth probe leads
    assert "R=2 vs R=1" in text and ("distinguishable from noise" in text or "within noise" in text)
    for name in ("depth.png", "reasoning.png", "training.png", "cost.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert (out / "diagnostics" / "report.md").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loops"] == [1, 2, 3] and summary["recommended_loops"] in (1, 2, 3)
    assert set(summary["comparisons"]) == {"R=2 vs R=1", "R=3 vs R=2"}
    for R in ("1", "2", "3"):
        row = summary["per_loop"][R]
        assert row["pretrain"]["step"] == preset.pretrain.train.steps
        assert row["sft"]["step"] == preset.sft.train.steps
        assert set(row["reasoning"]["by_steps"]) == {"1", "2"}
        assert row["cost"]["latency_ms"]["1"] > 0


def test_models_are_matched_except_for_the_loop_count(study_run):
    _, out, _, _ = study_run
    configs = {}
    for R in (1, 2, 3):
        ckpt = json.loads((out / "stages" / f"sft-R{R}.json").read_text())["result"]["final_checkpoint"]
        configs[R] = json.loads((Path(ckpt) / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        assert len({configs[R][key] for R in configs}) == 1, key
    assert [configs[R]["plt_num_loops"] for R in (1, 2, 3)] == [1, 2, 3]
    items = [json.loads((out / "eval" / f"R{R}" / "results.json").read_text())["tasks"]["reasoning"] for R in (1, 2, 3)]
    ids = [
        [row["id"] for k in sorted(t["styles"]["chat"]["examples"]) for row in t["styles"]["chat"]["examples"][k]]
        for t in items
    ]
    assert ids[0] == ids[1] == ids[2]  # the same held-out items for every R: paired comparisons are valid


def test_rerun_skips_finished_stages_and_redoes_a_missing_one(study_run):
    preset, out, _, _ = study_run
    (out / "stages" / "eval-R2.json").unlink()  # as if the study had stopped during that stage
    log = io.StringIO()
    Study(preset, out, log=log).run()
    lines = log.getvalue().splitlines()
    assert any("pretrain-R1: done earlier, skipped" in ln for ln in lines)
    assert any("diagnostics: done earlier, skipped" in ln for ln in lines)
    assert any("eval-R2: running" in ln for ln in lines)
    assert not any("eval-R1: running" in ln or "sft-R3: running" in ln for ln in lines)


def test_a_changed_setting_reruns_only_what_depends_on_it(study_run):
    preset, out, _, _ = study_run
    changed = get_preset("smoke", source=preset.source)
    changed.decode_batches = (1, 3)
    log = io.StringIO()
    Study(changed, out, log=log).run()
    text = log.getvalue()
    assert "cost-R1: settings changed, starting it over" in text
    assert "sft-R1: done earlier, skipped" in text and "eval-R1: done earlier, skipped" in text


def test_study_does_not_import_benchmarks():
    import subprocess
    import sys

    code = (
        "import sys, loopcoder.study.pipeline, loopcoder.study.report, loopcoder.study.cost; "
        "print([m for m in sys.modules if m.startswith('loopcoder.bench')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_paired_difference_and_trend():
    a = [0, 0, 1, 1, 0, 1, 0, 0] * 10
    b = [1, 1, 1, 1, 1, 1, 0, 1] * 10
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(0.5) and d.clear and d.low > 0
    same = paired_difference([0.5, 1.0, 2.0, 0.1], [0.5, 1.0, 2.0, 0.1])
    assert same.mean == 0 and not same.clear
    noisy = paired_difference([1.0, 2.0, 3.0, 4.0], [1.1, 1.9, 3.2, 3.9])
    assert not noisy.clear and noisy.low < 0 < noisy.high
    assert "no step" in trend([same], higher_is_better=True)
    assert "monotonic" in trend([d, d], higher_is_better=True)


def test_bad_preset_and_loops_are_clear_errors(tmp_path, capsys):
    with pytest.raises(LoopcoderError, match="unknown study preset"):
        get_preset("huge")
    assert get_preset("tiny", loops=(3, 2)).loops == (1, 2, 3)  # the baseline is always included
    assert main(["study", "--preset", "huge", "--out", str(tmp_path / "s")]) == 2
    assert "unknown study preset" in capsys.readouterr().err
    assert main(["study", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2
