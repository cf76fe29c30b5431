"""`loopcoder init`: a model directory that `generate` can use at once, and no silent data loss."""

from __future__ import annotations

import pytest

from loopcoder import checkpoint
from loopcoder.checkpoint import load_model
from loopcoder.cli import main
from loopcoder.runtime import load_for_inference

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
