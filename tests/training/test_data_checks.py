"""What a run checks before it trains: that the model and the data share one tokenizer (by fingerprint,
not size), that the data directory is whole (index.json, every shard's file, size and checksum, no path
outside it), and that a checkpoint's trainer state is readable. Each problem is one line, exit status 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from loopcoder.cli import main
from loopcoder.data import tokenizer as T
from loopcoder.model.identity import read_identity, tokenizer_fingerprint
from support.training import data_dir, tiny_overrides
from support.training import one_line_error as support_one_line_error

QUIET = {"train.threads": 1, "train.deterministic": False, "logging.progress": "off"}


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def one_line_error(argv, capsys) -> str:
    return support_one_line_error(argv, capsys, progress="verify: ")


def train_argv(data, out, **extra) -> list[str]:
    return ["train", *tiny_overrides(data, out, **{**QUIET, "train.steps": 2, "eval.every": 0, **extra})]


def init_model(out, *extra) -> None:
    flags = ["--hidden-size", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--window", "8"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["init", "--out", str(out), *flags, "--max-positions", "256", *extra]) == 0


# ----------------------------------------------------------------------------- one tokenizer
def test_sft_refuses_an_init_model_made_for_another_tokenizer(tmp_path, capsys):
    """The README's `init` (a tokenizer trained on the package's source) then SFT on a data directory of
    another tokenizer of the very same size: only the fingerprint tells them apart."""
    data = data_dir()
    random = tmp_path / "random"
    init_model(random, "--vocab-size", "300")
    assert T.load_raw_tokenizer(random).get_vocab_size() == T.load_raw_tokenizer(data).get_vocab_size() == 300
    argv = ["sft", "--init", str(random), *tiny_overrides(data, tmp_path / "sft", **{**QUIET, "train.steps": 1})]
    message = one_line_error(argv, capsys)
    assert f"the data's tokenizer {str(data / 'tokenizer')!r} has tokenizer" in message
    assert f"the model {str(random)!r} (model_identity.json) was made with tokenizer" in message
    assert "data.allow_tokenizer_mismatch=true" in message and "init --data" in message
    assert not (tmp_path / "sft").exists()
    # whoever means it says so; the tuned model then records the tokenizer it was tuned with
    capsys.readouterr()
    assert main([*argv, "data.allow_tokenizer_mismatch=true"]) == 0, capsys.readouterr().err
    tuned = max((tmp_path / "sft" / "checkpoints").glob("step-*"))
    assert read_identity(tuned)["tokenizer"]["fingerprint"] == tokenizer_fingerprint(data)
    # and a model made for the data directory (`init --data`) is tuned without a word
    matched = tmp_path / "matched"
    init_model(matched, "--data", str(data))
    argv = ["sft", "--init", str(matched), *tiny_overrides(data, tmp_path / "sft2", **{**QUIET, "train.steps": 1})]
    assert main(argv) == 0, capsys.readouterr().err


def test_resuming_on_data_rebuilt_with_another_tokenizer_is_refused(tmp_path, capsys):
    data = shutil.copytree(data_dir(), tmp_path / "data")
    run = tmp_path / "run"
    assert main(train_argv(data, run)) == 0
    other = tmp_path / "other"
    init_model(other, "--vocab-size", "300")
    _swap_tokenizer(data, other)  # what a rebuild in place with another tokenizer looks like to the checkpoint
    message = one_line_error([*train_argv(data, run, **{"train.steps": 4}), "--resume"], capsys)
    assert "tokenizer mismatch" in message


def _swap_tokenizer(data, other, manifest_too=True):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(other / name, data / "tokenizer" / name)
    if manifest_too:
        manifest = json.loads((data / "manifest.json").read_text())
        manifest["tokenizer"]["fingerprint"] = tokenizer_fingerprint(other)
        (data / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("vocab", [300, 400])
def test_train_refuses_a_tokenizer_that_is_not_the_shards(tmp_path, capsys, vocab):
    """A data directory whose tokenizer/ was replaced: the shards' ids belong to another vocabulary."""
    data = shutil.copytree(data_dir(), tmp_path / "data")
    other = tmp_path / "other"
    init_model(other, "--vocab-size", str(vocab))
    _swap_tokenizer(data, other, manifest_too=False)
    message = one_line_error(train_argv(data, tmp_path / "run"), capsys)
    assert f"{str(data / 'tokenizer')!r} has tokenizer" in message and "(manifest.json)" in message, message
    assert "data.allow_tokenizer_mismatch=true" in message and not (tmp_path / "run").exists()
    if vocab != 300:  # a data directory of an older loopcoder (no fingerprint recorded): the size still tells
        manifest = json.loads((data / "manifest.json").read_text())
        del manifest["tokenizer"]["fingerprint"]
        (data / "manifest.json").write_text(json.dumps(manifest))
        message = one_line_error(train_argv(data, tmp_path / "run"), capsys)
        assert "has 400 tokens, but the shards" in message and "vocabulary of 300 (index.json)" in message


# ----------------------------------------------------------------------------- a damaged data directory
def _index(data):
    return json.loads((data / "index.json").read_text())


def _set_first_shard(data, path):
    index = _index(data)
    index["splits"]["train"]["shards"][0]["file"] = path
    (data / "index.json").write_text(json.dumps(index))


DAMAGE = {
    "truncated shard": (
        lambda d: (d / "train/00000.npy").write_bytes((d / "train/00000.npy").read_bytes()[:1000]),
        "shard {data}/train/00000.npy is damaged (not a readable .npy",
    ),
    "random-bytes shard": (
        lambda d: (d / "train/00000.npy").write_bytes(os.urandom((d / "train/00000.npy").stat().st_size)),
        "shard {data}/train/00000.npy is damaged (not a readable .npy",
    ),
    "a shard with bytes appended": (
        lambda d: (d / "train/00000.npy").open("ab").write(b"\0" * 64),
        "shard {data}/train/00000.npy has",
    ),
    "a shard of another dtype": (
        lambda d: np.save(d / "train/00000.npy", np.load(d / "train/00000.npy").astype(np.int32)),
        "shard {data}/train/00000.npy holds int32",
    ),
    "index.json that is not JSON": (
        lambda d: (d / "index.json").write_bytes(os.urandom(200)),
        "{data}/index.json is damaged (",
    ),
    "index.json without seq_len": (
        lambda d: (d / "index.json").write_text(json.dumps({**_index(d), "seq_len": "long"})),
        "{data}/index.json is damaged (seq_len 'long' is not an integer >= 2)",
    ),
    "index.json without shards": (
        lambda d: (d / "index.json").write_text(json.dumps({**_index(d), "splits": {"train": {}}})),
        "{data}/index.json is damaged (split 'train' has no shard list)",
    ),
    "a shard path out of the directory": (
        lambda d: _set_first_shard(d, "../../../../etc/passwd"),
        "shard path '../../../../etc/passwd' leaves the data directory",
    ),
    "an absolute shard path": (
        lambda d: _set_first_shard(d, "/etc/passwd"),
        "shard path '/etc/passwd' leaves the data directory",
    ),
    "manifest.json that is not JSON": (
        lambda d: (d / "manifest.json").write_text("{"),
        "{data}/manifest.json is damaged (",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_data_directory_is_one_line_before_training(tmp_path, capsys, case):
    data = shutil.copytree(data_dir(), tmp_path / "data")
    damage, expected = DAMAGE[case]
    damage(data)
    message = one_line_error(train_argv(data, tmp_path / "run"), capsys)
    assert expected.format(data=data) in message, message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_data_verify_hashes_every_shard_and_names_the_changed_one(tmp_path, capsys):
    data = shutil.copytree(data_dir(), tmp_path / "data")
    capsys.readouterr()
    assert main(["data", "verify", str(data)]) == 0
    assert "match their checksums" in capsys.readouterr().out
    shard = data / "validation" / "00000.npy"
    arr = np.load(shard, mmap_mode="r+")
    arr[0, 0] = (int(arr[0, 0]) + 1) % 300  # still a valid token id: only the checksum can tell
    arr.flush()
    del arr
    message = one_line_error(["data", "verify", str(data)], capsys)
    assert f"shard {shard} does not match its checksum in index.json" in message
    # a directory built before shards had their own checksums: the split's hash still tells
    index = _index(data)
    for split in index["splits"].values():
        for s in split["shards"]:
            del s["sha256"], s["bytes"]
    (data / "index.json").write_text(json.dumps(index))
    message = one_line_error(["data", "verify", str(data)], capsys)
    assert f"the validation shards of {data} do not match their checksum" in message


# ----------------------------------------------------------------------------- a damaged checkpoint
@pytest.mark.parametrize("content", [b"", b"garbage" * 100, "torch.save of a list"])
def test_a_damaged_trainer_state_is_one_line_on_resume(tmp_path, capsys, content):
    run = tmp_path / "run"
    assert main(train_argv(data_dir(), run)) == 0
    state = max((run / "checkpoints").glob("step-*")) / "trainer_state.pt"
    if isinstance(content, str):
        torch.save([1, 2, 3], state)
    else:
        state.write_bytes(content)
    message = one_line_error([*train_argv(data_dir(), run, **{"train.steps": 4}), "--resume"], capsys)
    assert str(state) in message and "the checkpoint is damaged" in message, message


def test_checkpoint_files_are_readable_by_all_and_record_their_identity(tmp_path):
    """safetensors writes 0600; a checkpoint is shared like any file the umask allows (0644 under 022)."""
    import stat

    old = os.umask(0o022)
    try:
        assert main(train_argv(data_dir(), tmp_path / "run")) == 0
    finally:
        os.umask(old)
    checkpoint = max((tmp_path / "run" / "checkpoints").glob("step-*"))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in checkpoint.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    identity = read_identity(checkpoint)
    assert identity["tokenizer"]["fingerprint"] == tokenizer_fingerprint(data_dir())
    assert set(identity["weights"]) == {"model.safetensors"}
