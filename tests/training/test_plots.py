"""Training curves as a PNG: RUN/curves.png redrawn at each validation, and `loopcoder plot` of several runs
(the figure's data is checked, not its pixels)."""

from __future__ import annotations

import pytest

from loopcoder.cli import main
from loopcoder.training import pretrain
from loopcoder.training import trainer as trainer_module
from loopcoder.training.plots import CURVES, curve_figure, plot_runs
from loopcoder.utils.errors import LoopcoderError
from support.training import in_process_overrides as overrides
from support.training import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
PNG = b"\x89PNG\r\n\x1a\n"


def lines_by_label(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("curves")
    common = {"train.steps": 6, "eval.every": 2, "checkpoint.every": 0}
    return [
        pretrain(None, overrides(root / "slow", **common, **{"optim.lr": 1e-3})).run_dir,
        pretrain(None, overrides(root / "fast", **common, **{"optim.lr": 1e-2})).run_dir,
    ]


def test_the_run_directory_png_appears_and_changes_at_each_validation(tmp_path, monkeypatch):
    drawn = []
    real = trainer_module.write_run_curves

    def spy(run_dir, records):
        path = real(run_dir, records)
        drawn.append(([r["step"] for r in records if r["kind"] == "val"], path.read_bytes()))
        return path

    monkeypatch.setattr(trainer_module, "write_run_curves", spy)
    out = tmp_path / "run"
    pretrain(None, overrides(out, **{"train.steps": 6, "eval.every": 2, "checkpoint.every": 0}))
    # after each validation (steps 2, 4, 6); the end adds no record after step 6's, so nothing is redrawn
    assert [steps for steps, _ in drawn] == [[2], [2, 4], [2, 4, 6]]
    images = [png for _, png in drawn]
    assert all(png.startswith(PNG) for png in images)
    assert len(set(images)) == 3  # each validation changed the picture
    assert (out / CURVES).read_bytes() == images[-1]
    assert not [p for p in out.iterdir() if p.name.startswith(f".{CURVES}")]  # no temporary file left

    off = tmp_path / "off"
    pretrain(None, overrides(off, **{"train.steps": 2, "eval.every": 1, "logging.curves": False}))
    assert not (off / CURVES).exists()


def test_the_curves_hold_each_series_of_the_run(runs):
    records = read_metrics(runs[0], "train")
    val = read_metrics(runs[0], "val")
    fig = curve_figure({"slow": records + val})
    loss, bpb, lr = fig.axes
    assert lines_by_label(loss) == {
        "slow train": ([r["step"] for r in records], [r["loss"] for r in records]),
        "slow val": ([v["step"] for v in val], [v["val_loss"] for v in val]),
    }
    assert lines_by_label(bpb) == {"slow bpb": ([2, 4, 6], [v["val_bpb"] for v in val])}
    assert lines_by_label(lr) == {"slow lr": ([r["step"] for r in records], [r["lr"] for r in records])}


def test_plot_draws_one_line_per_run_and_series(runs, tmp_path, capsys):
    out = tmp_path / "both.png"
    assert main(["plot", *map(str, runs), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG)
    assert "2 run(s), 8 lines" in capsys.readouterr().out
    fig = plot_runs(runs, tmp_path / "again.png", names=["a", "b"])
    loss, bpb, lr = fig.axes
    assert sorted(lines_by_label(loss)) == ["a train", "a val", "b train", "b val"]
    assert sorted(lines_by_label(bpb)) == ["a bpb", "b bpb"] and sorted(lines_by_label(lr)) == ["a lr", "b lr"]
    for name, run in zip("ab", runs):
        assert lines_by_label(lr)[f"{name} lr"][1] == [r["lr"] for r in read_metrics(run)]
    # the runs' own LRs differ, and so do their lines
    assert lines_by_label(lr)["a lr"][1] != lines_by_label(lr)["b lr"][1]


def test_plot_bad_input_is_one_line_and_a_torn_last_record_is_left_out(runs, tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    assert "has no training metrics" in capsys.readouterr().err
    with pytest.raises(LoopcoderError, match="1 name"):
        plot_runs(runs, tmp_path / "x.png", names=["only-one"])
    torn = tmp_path / "torn"
    torn.mkdir()
    text = (runs[0] / "metrics.jsonl").read_text()
    (torn / "metrics.jsonl").write_text(text + '{"kind": "train", "st')  # killed while appending
    assert main(["plot", str(torn), "--out", str(tmp_path / "torn.png")]) == 0
    (torn / "metrics.jsonl").write_text('{"kind": "tr\n' + text)
    assert main(["plot", str(torn), "--out", str(tmp_path / "torn.png")]) == 2
    assert "metrics.jsonl:1: not a JSON record" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
