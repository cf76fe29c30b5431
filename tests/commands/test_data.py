"""`loopcoder data ...` through the CLI: output, files, and exit status 2 with one line for bad input."""

from __future__ import annotations

import json

import pytest

from loopcoder.cli import main
from loopcoder.data.shards import ShardDataset
from support.data import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("cli") / "corpus", n_files=30)


def _build_args(src, out, *extra):
    return [
        "data",
        "build",
        "--source",
        str(src),
        "--out",
        str(out),
        "--vocab-size",
        "400",
        "--seq-len",
        "64",
        "--val-fraction",
        "0.25",
        *extra,
    ]


def test_build_prints_statistics_and_rerun_is_up_to_date(corpus, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(_build_args(corpus, out, "--ignore", "vendored")) == 0
    cap = capsys.readouterr()
    assert "bytes/token" in cap.out and "train" in cap.out and "validation" in cap.out and f"wrote {out}" in cap.out
    assert "35 seen, 30 kept" in cap.out  # 30 modules, the copy and 4 to skip; vendored/ is ignored
    assert "encoding:" in cap.err  # progress goes to stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["corpus"]["ignore"] == ["vendored"]
    assert len(ShardDataset(out, "train")) == manifest["statistics"]["splits"]["train"]["sequences"]
    assert main(_build_args(corpus, out, "--ignore", "vendored")) == 0
    cap = capsys.readouterr()
    assert f"up to date {out}" in cap.out and "encoding:" not in cap.err
    assert main(_build_args(corpus, out, "--ignore", "vendored", "--force")) == 0
    assert f"wrote {out}" in capsys.readouterr().out


def test_build_refuses_to_replace_a_data_directory_built_from_other_inputs_unless_forced(corpus, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(_build_args(corpus, out)) == 0
    assert main(["data", "instructions", "--data", str(out), "--max-tokens", "4000"]) == 0
    capsys.readouterr()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert any(p.parts[0] == "instructions" for p in before)
    assert main(_build_args(corpus, out, "--seq-len", "32")) == 2  # other settings: a different build
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "built from other inputs (and instructions, which would be lost)" in err[0], err
    assert "--force" in err[0]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(_build_args(corpus, out, "--seq-len", "32", "--force")) == 0
    assert ShardDataset(out, "train").seq_len == 32 and not (out / "instructions").exists()


def test_build_from_jsonl_with_a_text_field(tmp_path, capsys):
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"code": f"def f{i}(x):\n    return x * {i}\n" * 5}) + "\n" for i in range(80)))
    assert (
        main(
            [
                "data",
                "build",
                "--source",
                str(f),
                "--out",
                str(tmp_path / "d"),
                "--vocab-size",
                "300",
                "--seq-len",
                "32",
                "--text-field",
                "code",
                "--val-fraction",
                "0.1",
            ]
        )
        == 0
    )
    assert "80 kept" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "source '{tmp}/missing' does not exist"),
        ("empty", "has no usable documents (1 seen; skipped: 0 duplicate, 0 too large, 1 empty"),
        ("field", "c.jsonl:1: no text field 'text' (fields: body); choose one with --text-field"),
        ("vocab", "vocabulary size 100 is too small: 12 special/added tokens + 256 byte tokens need at least 268"),
        ("fraction", "val_fraction 1.5 must be in [0, 1)"),
    ],
)
def test_build_bad_input_exits_2_with_one_line(case, message, corpus, tmp_path, capsys):
    src, extra = corpus, []
    if case == "missing":
        src = tmp_path / "missing"
    elif case == "empty":
        src = tmp_path / "empty"
        src.mkdir()
        (src / "a.py").write_text("\n")
    elif case == "field":
        src = tmp_path / "c.jsonl"
        src.write_text(json.dumps({"body": "x = 1"}) + "\n")
    elif case == "vocab":
        extra = ["--vocab-size", "100"]
    elif case == "fraction":
        extra = ["--val-fraction", "1.5"]
    assert main(_build_args(src, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("loopcoder data: error: ")
    assert message.format(tmp=tmp_path) in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists()


def test_instructions_and_reasoning_commands(corpus, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(_build_args(corpus, out, "--seq-len", "256")) == 0
    capsys.readouterr()
    assert main(["data", "instructions", "--data", str(out), "--max-tokens", "4000"]) == 0
    text = capsys.readouterr().out
    assert "documented functions and methods" in text and str(out / "instructions" / "train.jsonl") in text
    assert json.loads((out / "instructions" / "train.jsonl").read_text().splitlines()[0])["messages"]

    f = tmp_path / "r.jsonl"
    assert (
        main(["data", "reasoning", "--n", "12", "--steps", "2-3", "--split", "eval", "--seed", "4", "--out", str(f)])
        == 0
    )
    assert "wrote 12 eval examples" in capsys.readouterr().out
    recs = [json.loads(line) for line in f.read_text().splitlines()]
    assert len(recs) == 12 and {r["steps"] for r in recs} <= {2, 3} and all(r["split"] == "eval" for r in recs)
    for fmt, key in (("chat", "messages"), ("cruxeval", "text"), ("completion", "text")):
        assert main(["data", "reasoning", "--n", "3", "--format", fmt, "--out", str(f)]) == 0
        assert all(key in json.loads(line) for line in f.read_text().splitlines())
    capsys.readouterr()
    assert main(["data", "reasoning", "--n", "3", "--steps", "0-2", "--out", str(f)]) == 2
    assert "each step count must be in [1, 12]" in capsys.readouterr().err
    assert main(["data", "instructions", "--data", str(tmp_path / "nope")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_a_killed_build_leaves_a_temporary_directory_that_the_next_build_removes(tmp_path, capsys):
    """SIGKILL `data build` while it writes (its `.d.tmp-PID-*` sibling exists), then build again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from support.training import SRC

    big = make_corpus(tmp_path / "corpus", n_files=400)  # a build of seconds: time to catch it mid-way
    out = tmp_path / "d"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loopcoder", *_build_args(big, out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while not list(tmp_path.glob(".d.tmp-*")):
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    (stale,) = tmp_path.glob(".d.tmp-*")
    assert stale.name.startswith(f".d.tmp-{proc.pid}-") and not out.exists()
    assert main(_build_args(big, out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "d"]  # the leftover is gone
    assert ShardDataset(out, "train").seq_len == 64
