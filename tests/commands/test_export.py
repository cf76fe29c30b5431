"""`loopcoder export`: a copy or the directory itself gets the remote-code files; one-line errors, exit 2.

A copy holds only what a model needs, is checked before it is declared good (a broken model is refused
and nothing is left at --out), and never replaces a non-empty --out without --force, nor anything that
is not a model directory even with it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loopcoder.cli import main
from loopcoder.data import tokenizer as T
from loopcoder.model.export import AUTO_MAP, remote_code_files
from loopcoder.model.identity import IDENTITY_FILE
from support.models import released_style_dir

SMALL = ["--hidden-size", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--window", "4"]


def init(out, *extra) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["init", "--out", str(out), *SMALL, "--max-positions", "64", *extra]) == 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A model made by init (vocabulary 300), another one with a tokenizer of 400 tokens, and a
    tokenizer of 300 tokens that is not the first model's."""
    tmp = tmp_path_factory.mktemp("export-models")
    init(tmp / "model", "--vocab-size", "300")
    init(tmp / "other", "--vocab-size", "400")
    # a tokenizer of 300 tokens too, trained on other text: the same size, other ids
    texts = [Path(m.__file__).read_text() for m in (json, shutil, contextlib)]
    T.save_tokenizer(T.train_tokenizer(texts, 300), tmp / "same-size")
    return tmp


def one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("loopcoder export: error: "), (code, err)
    return err[0]


def test_export_to_a_copy_and_in_place(tmp_path, capsys):
    src = tmp_path / "released"
    src.mkdir()
    released_style_dir(src)
    assert main(["export", "--model", str(src), "--out", str(tmp_path / "out"), "--no-tokenizer"]) == 0
    assert "modeling_loopcoder.py" in capsys.readouterr().out
    out = tmp_path / "out"
    files = [*remote_code_files(), "config.json", "model.safetensors", IDENTITY_FILE]
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert not list(src.glob("*.py"))  # the source is untouched
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert main(["export", "--model", str(src), "--in-place", "--no-tokenizer"]) == 0
    assert sorted(p.name for p in src.glob("*.py")) == sorted(remote_code_files())


def test_a_model_without_a_tokenizer_needs_no_tokenizer_to_be_said(tmp_path, capsys):
    src = tmp_path / "released"
    src.mkdir()
    released_style_dir(src)
    message = one_line_error(["export", "--model", str(src), "--out", str(tmp_path / "out")], capsys)
    assert "has no tokenizer" in message and "--no-tokenizer" in message
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/config.json").write_text(json.dumps({"model_type": "iquestpltcoder", "plt_num_loops": 0}))
    (tmp_path / "bad/model.safetensors").write_bytes(b"")
    assert main(["export", "--model", str(tmp_path / "bad"), "--in-place", "--no-tokenizer"]) == 2
    assert "plt_num_loops" in capsys.readouterr().err


def test_a_non_empty_out_needs_force_and_unrelated_files_are_never_deleted(models, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for force in ([], ["--force"]):
        message = one_line_error(["export", "--model", str(models / "model"), "--out", str(mine), *force], capsys)
        assert "is not empty (thesis.tex)" in message and "not a model directory" in message
        assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    out = tmp_path / "exported"
    assert main(["export", "--model", str(models / "model"), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    message = one_line_error(["export", "--model", str(models / "other"), "--out", str(out)], capsys)
    assert "is not empty" in message and "--force" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["export", "--model", str(models / "other"), "--out", str(out), "--force"]) == 0
    assert (out / "tokenizer.json").read_bytes() == (models / "other" / "tokenizer.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "mine"]  # no temporary left behind


def test_a_copy_holds_only_what_a_model_needs_readable_by_all(models, tmp_path, capsys):
    run = shutil.copytree(models / "model", tmp_path / "checkpoint")  # a training checkpoint's extra files
    (run / "trainer_state.pt").write_bytes(os.urandom(4096))
    (run / "checkpoint.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    (run / "scratch").mkdir()
    old = os.umask(0o022)
    try:
        capsys.readouterr()
        assert main(["export", "--model", str(run), "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    assert "left out (not part of a model): checkpoint.json, notes.txt, scratch/, trainer_state.pt" in (
        capsys.readouterr().err
    )
    out = tmp_path / "out"
    want = [
        *remote_code_files(),
        "config.json",
        "generation_config.json",
        "model.safetensors",
        IDENTITY_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(want)
    for d in (models / "model", out):  # init's files and export's: 0644 under umask 022, as files usually are
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}
        assert set(modes.values()) == {0o644}, modes


def _truncate(d):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:5000])


def _empty(d):
    (d / "model.safetensors").write_bytes(b"")


def _flip_data(d):  # bytes past the header: still a loadable file, only the checksum can tell
    w = d / "model.safetensors"
    raw = bytearray(w.read_bytes())
    for i in range(len(raw) - 64, len(raw) - 32):
        raw[i] ^= 0x5A
    w.write_bytes(bytes(raw))


def _flip_header(d):  # a model written by other tools (no identity file): the loader must catch it
    (d / IDENTITY_FILE).unlink()
    w = d / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[10:30] = b"\xff" * 20
    w.write_bytes(bytes(raw))


def _nan(d):  # NaN weights, written by another tool (so no checksum stands in the way)
    (d / IDENTITY_FILE).unlink()
    tensors = load_file(d / "model.safetensors")
    name = sorted(tensors)[3]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _config(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (d / "config.json").write_text(json.dumps(cfg))


def _no_tokenizer(d):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()


def _garbage_tokenizer(d):
    (d / "tokenizer.json").write_bytes(os.urandom(300))


def _other_vocabulary(d, models):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(models / "other" / name, d / name)


BROKEN = {
    "truncated": (_truncate, "has 5,000 bytes"),
    "empty": (_empty, "has 0 bytes"),
    "byte-flipped": (_flip_data, "does not match the checksum recorded when it was written"),
    "byte-flipped header": (_flip_header, "truncated or corrupted"),
    "NaN weights": (_nan, "NaN or infinite value(s)"),
    "config against weights": (_config, "mis-shaped tensor(s)"),
    "missing tokenizer": (_no_tokenizer, "has no tokenizer"),
    "garbage tokenizer": (_garbage_tokenizer, "not a valid tokenizer.json"),
    "another vocabulary": (_other_vocabulary, "(300) is smaller than its tokenizer's (400)"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_model_is_refused_with_one_line_and_nothing_is_written(models, tmp_path, capsys, case):
    breaks, expected = BROKEN[case]
    src = shutil.copytree(models / "model", tmp_path / "model")
    breaks(*((src, models) if breaks is _other_vocabulary else (src,)))
    message = one_line_error(["export", "--model", str(src), "--out", str(tmp_path / "out")], capsys)
    assert expected in message and str(src) in message, message
    assert ".tmp-" not in message  # the message names the model given, not the temporary copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no --out, no temporary directory


def test_a_tokenizer_of_the_same_size_but_other_ids_is_refused_unless_allowed(models, tmp_path, capsys):
    src = shutil.copytree(models / "model", tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # 300 tokens too, trained on other text
        shutil.copyfile(models / "same-size" / name, src / name)
    message = one_line_error(["export", "--model", str(src), "--out", str(tmp_path / "out")], capsys)
    assert f"tokenizer mismatch: {str(src)!r} has tokenizer" in message and "--allow-tokenizer-mismatch" in message
    assert not (tmp_path / "out").exists()
    argv = ["export", "--model", str(src), "--out", str(tmp_path / "out"), "--allow-tokenizer-mismatch"]
    assert main(argv) == 0 and (tmp_path / "out" / "model.safetensors").is_file()


def test_nan_weights_in_a_model_of_our_own_are_refused_too(models, tmp_path, capsys):
    src = shutil.copytree(models / "model", tmp_path / "model")
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("inf"))
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    message = one_line_error(["export", "--model", str(src), "--out", str(tmp_path / "out")], capsys)
    assert "does not match the checksum" in message  # the recorded checksum speaks first
    (src / IDENTITY_FILE).unlink()
    message = one_line_error(["export", "--model", str(src), "--out", str(tmp_path / "out")], capsys)
    assert "weight model.norm.weight has 32 NaN or infinite value(s)" in message
