"""Training when the machine or the data goes wrong: a disk that fills up while a checkpoint is saved, and a
corrupted shard. Each ends the run with one line that names the directory or the file, exit status 2."""

from __future__ import annotations

import errno
import shutil
import sys
from collections import namedtuple

import numpy as np
import pytest
import torch

from loopcoder.cli import main
from loopcoder.data.shards import ShardDataset
from loopcoder.model.checkpoint import load_model
from loopcoder.training import checkpoints as ckpt
from loopcoder.utils.errors import LoopcoderError
from support.training import (
    SRC,
    can_mount_a_tmpfs,
    data_dir,
    in_a_small_tmpfs,
    one_line_error,
    tiny_overrides,
)

IN_PROCESS = {"train.threads": 1, "train.deterministic": False, "logging.progress": "off"}


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- a full disk
Usage = namedtuple("Usage", "total used free")


def test_a_full_disk_while_saving_is_one_line_naming_the_directory_and_the_space(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", *tiny_overrides(data_dir(), out, **{**IN_PROCESS, "train.steps": 4, "checkpoint.every": 2})]
    save = torch.save
    saves = []

    def fills_the_disk(obj, f, *args, **kwargs):  # what torch.save says when the disk is full
        saves.append(f)
        if len(saves) > 1:
            monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: Usage(10 << 20, (10 << 20) - 4096, 4096))
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                "file data/3: file write failed"
            )
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", fills_the_disk)
    message = one_line_error(argv, capsys)
    assert f"no space left to save checkpoint step-000004 in {out / 'checkpoints'}" in message
    assert "MiB and 0.0 MiB are free" in message and "needs about" in message
    assert "`latest` (step-000002) are intact" in message
    # the earlier checkpoint is complete and loads, and nothing half-written is left
    assert ckpt.latest_checkpoint(out).name == "step-000002" == (out / "checkpoints" / "latest").read_text().strip()
    assert load_model(ckpt.latest_checkpoint(out)) is not None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000002"]


def test_enospc_is_named_even_when_space_seems_free(tmp_path):
    model = load_model(ckpt.resolve_model_dir(_finished_run(tmp_path)))

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt, "save_weights", enospc)
        with pytest.raises(LoopcoderError, match="no space left to save checkpoint step-000009"):
            ckpt.write_checkpoint(tmp_path / "run", 9, model.config, model.state_dict(), {}, None, 0, "5GB", {})
        mp.setattr(ckpt, "save_weights", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
        with pytest.raises(ValueError, match="a bug"):  # other failures are not dressed up as a full disk
            ckpt.write_checkpoint(tmp_path / "run", 9, model.config, model.state_dict(), {}, None, 0, "5GB", {})


def _finished_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides(data_dir(), out, **{**IN_PROCESS, "train.steps": 1})]) == 0
    return out


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_a_tmpfs(), reason="cannot mount a tmpfs in a user namespace here")
def test_a_real_full_disk_ends_the_run_with_one_line(tmp_path):
    """A 1 MiB tmpfs (a private mount in a user namespace): the first checkpoint fits, a later one does not."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    args = tiny_overrides(
        data_dir(),
        mnt / "run",
        **{"train.steps": 20, "checkpoint.every": 1, "eval.every": 0, "logging.progress": "off"},
    )
    python = f"PYTHONPATH={SRC} OMP_NUM_THREADS=1 {sys.executable} -m loopcoder"
    script = (
        f"{python} train {' '.join(args)}; echo rc=$?; "
        f"{python} generate --model {mnt / 'run'} --prompt x --max-new-tokens 2 >/dev/null && echo loads"
    )
    r = in_a_small_tmpfs(mnt, "1m", script)
    assert "rc=2" in r.stdout and "loads" in r.stdout, (r.stdout, r.stderr)  # the latest checkpoint still loads
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and "no space left to save checkpoint step-" in errors[0], r.stderr
    assert f"in {mnt / 'run' / 'checkpoints'}" in errors[0] and "are intact" in errors[0]


# ----------------------------------------------------------------------------- a corrupted shard
def corrupt_copy(tmp_path):
    data = shutil.copytree(data_dir(), tmp_path / "data")
    shard = data / "train" / "00000.npy"
    arr = np.load(shard, mmap_mode="r+")  # flip bytes after the .npy header: in every third row
    arr[1::3, 5:8] = np.iinfo(arr.dtype).max
    arr.flush()
    del arr
    return data, shard


def test_a_corrupted_shard_ends_training_with_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    data, shard = corrupt_copy(tmp_path)
    argv = [
        "train",
        *tiny_overrides(
            data, tmp_path / "run", **{**IN_PROCESS, "train.steps": 200, "checkpoint.every": 0, "eval.every": 0}
        ),
    ]
    message = one_line_error(argv, capsys)  # small data is hashed at start: the run does not begin
    assert f"shard {shard} does not match its checksum in index.json" in message
    assert not (tmp_path / "run" / "checkpoints").exists()
    # data too large to hash at every start: the range check on every batch read still names the file
    monkeypatch.setattr("loopcoder.data.verify.HASH_AT_START_MAX_BYTES", 0)
    message = one_line_error(argv, capsys)
    assert f"shard {shard} is corrupted" in message and "outside the vocabulary [0, " in message


def test_reading_a_corrupted_row_names_the_shard_and_the_row(tmp_path):
    data, shard = corrupt_copy(tmp_path)
    ds = ShardDataset(data, "train")
    ds.rows([0, 3, 2])  # the good rows read as before
    with pytest.raises(LoopcoderError, match=rf"shard {shard} is corrupted: row 4 holds token id 65535"):
        ds.rows([0, 4, 1])
