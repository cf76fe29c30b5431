"""`loopcoder init`: a model directory that `generate` can use at once, and no silent data loss."""

from __future__ import annotations

import pytest

from loopcoder.cli import main
from loopcoder.model import checkpoint
from loopcoder.model.checkpoint import load_model
from loopcoder.model.loading import load_for_inference
from support.training import can_mount_a_tmpfs, in_a_small_tmpfs

SMALL = ["--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--window", "4"]


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_init_then_generate_works_and_the_vocabulary_matches_the_tokenizer(tmp_path, capsys):
    out = tmp_path / "m"
    code, printed, err = run(["init", "--out", str(out), *SMALL, "--vocab-size", "400"], capsys)
    assert code == 0, err
    assert "vocabulary 400" in printed
    model, tok = load_for_inference(str(out))
    assert model.config.vocab_size == len(tok) == 400
    text = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    assert tok.chat_template  # `generate --chat` and the server's chat endpoint work too
    code, printed, err = run(
        ["generate", "--model", str(out), "--prompt", "def f(", "--max-new-tokens", "4", "--threads", "1"], capsys
    )
    assert code == 0 and "4 tokens" in err, err


def test_init_reuses_a_given_tokenizer(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert run(["init", "--out", str(first), *SMALL, "--vocab-size", "300"], capsys)[0] == 0
    assert run(["init", "--out", str(second), *SMALL, "--tokenizer", str(first)], capsys)[0] == 0
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert load_model(second).config.vocab_size == 300


def test_a_non_empty_out_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "trained"
    assert run(["init", "--out", str(out), *SMALL, "--vocab-size", "300", "--seed", "1"], capsys)[0] == 0
    (out / "trainer_state.pt").write_bytes(b"a trained run's state")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run(["init", "--out", str(out), *SMALL, "--vocab-size", "300"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "is not empty" in lines[0] and "--force" in lines[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, _, err = run(["init", "--out", str(mine), *SMALL, "--vocab-size", "300", "--force"], capsys)
    assert code == 2 and "not a model directory" in err and (mine / "thesis.tex").read_text() == "years of work"


def test_force_replaces_a_model_directory_atomically(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m"
    assert run(["init", "--out", str(out), *SMALL, "--vocab-size", "300", "--seed", "1"], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_random_model", fail)  # the new model cannot be written
    code, _, err = run(["init", "--out", str(out), *SMALL, "--vocab-size", "300", "--force"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "No space left" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the failed overwrite lost nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # and left no temporary directory behind
    monkeypatch.undo()
    assert run(["init", "--out", str(out), *SMALL, "--vocab-size", "300", "--seed", "2", "--force"], capsys)[0] == 0
    assert not (out / "notes.txt").exists() and (out / "tokenizer.json").is_file()
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


@pytest.mark.parametrize("where", ["file", "file/child", "proc"])
def test_an_unwritable_out_is_one_line(tmp_path, capsys, where):
    (tmp_path / "file").write_text("not a directory")
    out = "/proc/loopcoder-test" if where == "proc" else str(tmp_path / where)
    code, _, err = run(["init", "--out", out, *SMALL, "--vocab-size", "300"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loopcoder init: error: "), err
    assert (tmp_path / "file").read_text() == "not a directory"


# ----------------------------------------------------------------------------- the tokenizer and the shape
def test_init_data_makes_a_model_for_a_data_directory(tmp_path, capsys):
    from loopcoder.data.build import read_manifest
    from loopcoder.model.identity import read_identity, tokenizer_fingerprint
    from support.data import small_build

    data, _ = small_build(tmp_path, seq_len=32)
    out = tmp_path / "m"
    assert run(["init", "--out", str(out), *SMALL, "--data", str(data)], capsys)[0] == 0
    fingerprint = tokenizer_fingerprint(data)
    assert read_identity(out)["tokenizer"]["fingerprint"] == fingerprint == tokenizer_fingerprint(out)
    assert read_manifest(data)["tokenizer"]["fingerprint"] == fingerprint  # `data build` records it
    code, _, err = run(["init", "--out", str(tmp_path / "x"), "--data", str(data), "--tokenizer", str(out)], capsys)
    assert code == 2 and "give --tokenizer or --data, not both" in err


def test_the_default_shape_is_the_tiny_presets(tmp_path, capsys):
    from loopcoder.model.config import PLTConfig
    from loopcoder.training.config import load_config

    assert run(["init", "--out", str(tmp_path / "m"), "--vocab-size", "300"], capsys)[0] == 0
    config, tiny = PLTConfig.from_pretrained(tmp_path / "m"), load_config("tiny").model
    got = (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.window,
    )
    assert got == (tiny.hidden_size, tiny.layers, tiny.heads, tiny.kv_heads, tiny.intermediate_size, tiny.window)
    assert got == (128, 4, 4, 2, 352, 64) and config.plt_num_loops == 2
    # a changed hidden size gets its own MLP width, not the preset's
    assert run(["init", "--out", str(tmp_path / "w"), "--vocab-size", "300", "--hidden-size", "64"], capsys)[0] == 0
    assert PLTConfig.from_pretrained(tmp_path / "w").intermediate_size == 192


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hidden-size", "1000000"], "of memory and"),
        (["--max-positions", "1"], "--max-positions 1 cannot hold a prompt and one generated token"),
        (["--max-positions", "0"], "cannot hold a prompt"),
        (["--layers", "0"], "--layers must be >= 1"),
        (["--heads", "0"], "--heads must be >= 1"),
        (["--window", "-1"], "--window must be >= 0"),
        (["--kv-heads", "3"], "num_key_value_heads=3: must divide num_attention_heads=4"),
    ],
)
def test_a_shape_that_cannot_work_is_refused_before_anything_is_made(tmp_path, capsys, flags, message):
    out = tmp_path / "m"
    code, _, err = run(["init", "--out", str(out), "--vocab-size", "300", *flags], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_model_larger_than_the_disk_is_refused_up_front(tmp_path, capsys, monkeypatch):
    from collections import namedtuple

    from loopcoder.model import checkpoint

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(1 << 20, (1 << 20) - 4096, 4096))
    code, _, err = run(["init", "--out", str(tmp_path / "m"), *SMALL, "--vocab-size", "300"], capsys)
    assert code == 2 and "this model's weights take" in err and "has 0.0 MiB free" in err, err
    assert not (tmp_path / "m").exists()


FULL_DISK = """
import collections, sys
from loopcoder.model import checkpoint
from loopcoder.cli import main
if sys.argv[1] == "hide-the-free-space":  # the up-front check passes, so the write itself meets ENOSPC
    usage = collections.namedtuple("usage", "total used free")
    checkpoint.shutil.disk_usage = lambda p: usage(1 << 40, 0, 1 << 40)
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(not can_mount_a_tmpfs(), reason="cannot mount a tmpfs in a user namespace here")
@pytest.mark.parametrize("how", ["hide-the-free-space", "as-it-is"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, how):
    """A 64 KiB tmpfs (a private mount in a user namespace) cannot hold the weights (130 KB)."""
    import sys

    mnt = tmp_path / "small"
    mnt.mkdir()
    (tmp_path / "full_disk.py").write_text(FULL_DISK)
    argv = ["init", "--out", str(mnt / "m"), *SMALL, "--vocab-size", "300"]
    python = f"OMP_NUM_THREADS=1 {sys.executable} {tmp_path / 'full_disk.py'}"
    script = f"{python} {how} {' '.join(argv)}; echo rc=$?; ls -A {mnt}"
    r = in_a_small_tmpfs(mnt, "64k", script)
    lines = r.stderr.strip().splitlines()
    assert "rc=2" in r.stdout and len(lines) == 1 and lines[0].startswith("loopcoder init: error: "), (
        r.stdout,
        r.stderr,
    )
    expected = "No space left on device" if how == "hide-the-free-space" else "this model's weights take"
    assert expected in lines[0], lines
    assert r.stdout.strip().splitlines()[-1] == "rc=2"  # and `ls -A` found nothing left in the mount


# ----------------------------------------------------------------------------- leftovers of killed runs
def dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_force_removes_what_a_killed_init_left_and_nothing_else(tmp_path, capsys):
    import os

    out = tmp_path / "m"
    assert run(["init", "--out", str(out), *SMALL, "--vocab-size", "300"], capsys)[0] == 0
    stale = [tmp_path / f".m.tmp-{dead_pid()}-k1ll3d", tmp_path / f".m.old-{dead_pid()}"]
    alive = tmp_path / f".m.tmp-{os.getpid()}-running"  # a writer that still runs: left alone
    legacy, other = tmp_path / ".m.tmp-abc123", tmp_path / f".other.tmp-{dead_pid()}-x"  # not ours to judge
    for d in (*stale, alive, legacy, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    assert run(["init", "--out", str(out), *SMALL, "--vocab-size", "300", "--force"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", alive.name, legacy.name, other.name])
