"""Packed shards, the build and its manifest, and BatchReader (determinism, resume, ranks)."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
import torch

from loopcoder.data.build import build, read_manifest
from loopcoder.data.corpus import CorpusSpec, iter_documents
from loopcoder.data.shards import BatchReader, ShardDataset, ShardWriter, bits_per_byte, iter_sequential
from loopcoder.data.tokenizer import EOS_ID, encode_documents, load_raw_tokenizer
from loopcoder.utils.errors import LoopcoderError
from support.data import data_config, make_corpus, small_build


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    out, manifest = small_build(tmp, shard_tokens=64 * 16)  # 16 rows per shard: several shard files
    return tmp, out, manifest


def test_build_writes_tokenizer_shards_index_and_manifest(built):
    tmp, out, m = built
    assert {p.name for p in out.iterdir()} >= {
        "tokenizer",
        "train",
        "validation",
        "index.json",
        "manifest.json",
        "token_bytes.npy",
    }
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["seq_len"] == 64 and index["eot_id"] == EOS_ID
    assert len(index["splits"]["train"]["shards"]) > 1
    st = m["statistics"]
    assert st["files"]["kept"] == 41 and st["files"]["duplicates"] == 1 and st["files"]["binary"] == 1
    for split in ("train", "validation"):
        row = st["splits"][split]
        ds = ShardDataset(out, split)
        assert len(ds) == row["sequences"] > 0
        # Every document token plus one end-of-text per document, minus the dropped tail.
        assert len(ds) * 64 == row["tokens"] + row["documents"] - row["dropped_tokens"]
        assert 0 <= row["dropped_tokens"] < 64
    assert st["total"]["bytes"] == sum(d.nbytes for d in iter_documents(data_config(tmp / "corpus").corpus))
    assert m["settings"]["seq_len"] == 64 and m["skipped"] is False and len(m["content_hash"]) == 64


def test_shards_hold_the_documents_joined_with_end_of_text(built):
    tmp, out, _ = built
    spec = data_config(tmp / "corpus").corpus
    tok = load_raw_tokenizer(out)
    docs = [d for d in iter_documents(spec) if d.split == "train"]
    stream = np.concatenate([np.r_[ids, EOS_ID] for ids in encode_documents(tok, [d.text for d in docs])])
    ds = ShardDataset(out, "train")
    rows = ds.rows(np.arange(len(ds)))
    assert np.array_equal(rows.reshape(-1), stream[: rows.size])
    assert stream.size - rows.size == ds.info["dropped_tokens"]


def test_validation_iteration_and_target_bytes(built):
    _, out, _ = built
    ds = ShardDataset(out, "validation")
    tok = load_raw_tokenizer(out)
    seen = []
    for batch in ds.iter_batches(batch_size=3):
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] == 64
        for row, nbytes in zip(batch["input_ids"].tolist(), batch["target_bytes"].tolist()):
            # The corpus is ASCII, so decoding the predicted tokens gives one character per byte.
            assert nbytes == len(tok.decode(row[1:], skip_special_tokens=True))
            seen.append(row)
    assert np.array_equal(np.array(seen), ds.rows(np.arange(len(ds))))
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    halves = [np.concatenate(list(iter_sequential(len(ds), 2, r, 2))) for r in (0, 1)]
    assert sorted(np.concatenate(halves).tolist()) == list(range(len(ds)))


def test_same_inputs_same_shards_and_content_hash(built, tmp_path):
    tmp, out, m = built
    out2, m2 = small_build(tmp, name="again", shard_tokens=64 * 16)
    assert m2["content_hash"] == m["content_hash"]
    for f in sorted(p.relative_to(out) for p in out.rglob("*.npy")):
        assert (out / f).read_bytes() == (out2 / f).read_bytes()
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (out2 / "tokenizer" / "tokenizer.json").read_bytes()
    _, m3 = small_build(tmp, name="other-seed", shard_tokens=64 * 16, seed=5)
    assert m3["content_hash"] != m["content_hash"]  # a different split


def test_rerun_is_skipped_unless_forced_and_other_inputs_need_force_to_replace_it(tmp_path):
    src = make_corpus(tmp_path / "corpus", n_files=12)
    cfg = data_config(src)
    m1 = build(cfg, tmp_path / "d", log=io.StringIO())
    mtime = (tmp_path / "d" / "manifest.json").stat().st_mtime_ns
    m2 = build(cfg, tmp_path / "d", log=io.StringIO())
    assert m2["skipped"] and m2["content_hash"] == m1["content_hash"]
    assert (tmp_path / "d" / "manifest.json").stat().st_mtime_ns == mtime
    assert not build(cfg, tmp_path / "d", force=True, log=io.StringIO())["skipped"]
    (src / "pkg" / "mod3.py").write_text("def changed():\n    return 42\n" * 20)
    (tmp_path / "d" / "instructions").mkdir()  # what `data instructions` adds: lost if the build is replaced
    with pytest.raises(LoopcoderError, match=r"built from other inputs \(and instructions, which would be lost\)"):
        build(cfg, tmp_path / "d", log=io.StringIO())
    assert read_manifest(tmp_path / "d")["content_hash"] == m1["content_hash"]
    assert (tmp_path / "d" / "instructions").is_dir()
    with pytest.raises(LoopcoderError, match="fewer than one sequence"):  # a forced rebuild that fails ...
        build(data_config(src, seq_len=100_000, shard_tokens=1 << 20), tmp_path / "d", log=io.StringIO(), force=True)
    assert read_manifest(tmp_path / "d")["content_hash"] == m1["content_hash"]  # ... loses nothing
    assert (tmp_path / "d" / "instructions").is_dir() and sorted(os.listdir(tmp_path)) == ["corpus", "d"]
    m4 = build(cfg, tmp_path / "d", log=io.StringIO(), overwrite=True)
    assert not m4["skipped"] and m4["content_hash"] != m1["content_hash"]
    assert read_manifest(tmp_path / "d")["content_hash"] == m4["content_hash"]


def test_reused_tokenizer(built, tmp_path):
    tmp, out, m = built
    cfg = data_config(tmp / "corpus", tokenizer=str(out), seq_len=32)
    m2 = build(cfg, tmp_path / "d", log=io.StringIO())
    assert m2["tokenizer"]["trained"] is False
    assert (tmp_path / "d" / "tokenizer" / "tokenizer.json").read_bytes() == (
        out / "tokenizer" / "tokenizer.json"
    ).read_bytes()
    assert m2["statistics"]["total"]["tokens"] == m["statistics"]["total"]["tokens"]


def test_uint32_shards_for_large_vocabularies(tmp_path):
    w = ShardWriter(tmp_path, "train", seq_len=4, vocab_size=70_000, eot_id=2, shard_tokens=8)
    docs = [[69_999, 65_536, 5], [1, 2, 3, 4, 5, 6], [7]]
    for d in docs:
        w.add(d)
    entry = w.close()
    index = {
        "format": "loopcoder-shards",
        "version": 1,
        "seq_len": 4,
        "dtype": "uint32",
        "vocab_size": 70_000,
        "eot_id": 2,
        "splits": {"train": entry},
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    ds = ShardDataset(tmp_path, "train")
    assert ds._shards[0].dtype == np.uint32 and len(entry["shards"]) == 2
    stream = [69_999, 65_536, 5, 2, 1, 2, 3, 4, 5, 6, 2, 7, 2]
    assert ds.rows(range(len(ds))).reshape(-1).tolist() == stream[:12] and entry["dropped_tokens"] == 1
    with pytest.raises(LoopcoderError, match="out of range"):
        w.add([70_000])


class _Rows:
    """A RowDataset whose row i is just [i]: readers can be checked by index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def get(self, indices):
        return {"input_ids": torch.as_tensor(np.asarray(indices)).view(-1, 1)}


def _take(reader: BatchReader, k: int) -> list[list[int]]:
    return [reader.next_batch()["input_ids"].view(-1).tolist() for _ in range(k)]


def test_reader_is_deterministic_in_the_seed_and_each_epoch_is_a_permutation():
    a, b, c = (BatchReader(_Rows(50), batch_size=4, seed=s) for s in (7, 7, 8))
    assert _take(a, 30) == _take(b, 30)
    assert _take(BatchReader(_Rows(50), 4, seed=7), 5) != _take(c, 5)
    r = BatchReader(_Rows(50), batch_size=4, seed=1)
    assert r.steps_per_epoch == 12
    for _ in range(3):
        epoch = [i for batch in _take(r, 12) for i in batch]
        assert len(set(epoch)) == 48  # no row twice within an epoch
    assert r.epoch == 2 and r.step == 12


def test_reader_resumes_exactly_across_epochs():
    r = BatchReader(_Rows(37), batch_size=5, seed=3)
    _take(r, 9)  # past the first epoch (7 steps)
    state = json.loads(json.dumps(r.state_dict()))  # survives a JSON round trip
    expected = _take(r, 20)
    fresh = BatchReader(_Rows(37), batch_size=5, seed=0)
    fresh.load_state_dict(state)
    assert _take(fresh, 20) == expected
    with pytest.raises(LoopcoderError, match="batch_size=5, this one 4"):
        BatchReader(_Rows(37), batch_size=4, seed=3).load_state_dict(state)


def test_ranks_get_disjoint_slices_of_each_global_batch():
    world = 3
    readers = [BatchReader(_Rows(100), batch_size=4, seed=11, rank=r, world_size=world) for r in range(world)]
    single = BatchReader(_Rows(100), batch_size=12, seed=11)
    seen: set[int] = set()
    for _ in range(readers[0].steps_per_epoch):
        parts = [rd.next_batch()["input_ids"].view(-1).tolist() for rd in readers]
        flat = [i for p in parts for i in p]
        assert len(set(flat)) == 12 and not seen & set(flat)
        assert flat == single.next_batch()["input_ids"].view(-1).tolist()  # = the one-process global batch
        seen |= set(flat)
    assert len(seen) == 96


def test_reader_on_shards_gives_long_input_ids(built):
    _, out, _ = built
    ds = ShardDataset(out, "train")
    batch = BatchReader(ds, batch_size=2, seed=0).next_batch()
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 64)
    assert int(batch["input_ids"].max()) < ds.vocab_size


def test_reader_and_dataset_errors(built, tmp_path):
    _, out, _ = built
    with pytest.raises(LoopcoderError, match="fewer than one global batch"):
        BatchReader(_Rows(5), batch_size=3, world_size=2)
    with pytest.raises(LoopcoderError, match="rank 2 is not in"):
        BatchReader(_Rows(50), batch_size=1, rank=2, world_size=2)
    with pytest.raises(LoopcoderError, match="no split 'test'"):
        ShardDataset(out, "test")
    with pytest.raises(LoopcoderError, match=r"has no index\.json"):
        ShardDataset(tmp_path)
    with pytest.raises(LoopcoderError, match="does not exist"):
        ShardDataset(tmp_path / "nope")


def test_build_errors(tmp_path):
    src = make_corpus(tmp_path / "corpus", n_files=4)
    with pytest.raises(LoopcoderError, match="fewer than one sequence of 100000"):
        build(data_config(src, seq_len=100_000, shard_tokens=1 << 20), tmp_path / "a", log=io.StringIO())
    assert not (tmp_path / "a").exists()  # nothing half-written is left behind
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "a.py").write_bytes(b"\0\1\2")
    (only_bad / "b.py").write_text("")
    with pytest.raises(
        LoopcoderError,
        match=r"has no usable documents \(2 seen; skipped: 0 duplicate, "
        r"0 too large, 1 empty, 1 binary, 0 undecodable\)",
    ):
        build(data_config(only_bad), tmp_path / "b", log=io.StringIO())
    with pytest.raises(LoopcoderError, match="too small"):
        build(data_config(src, vocab_size=100), tmp_path / "c", log=io.StringIO())
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("mine")
    with pytest.raises(LoopcoderError, match="is not a loopcoder data directory"):
        build(data_config(src), tmp_path / "precious", force=True, log=io.StringIO())
    assert (tmp_path / "precious" / "keep.txt").read_text() == "mine"
    with pytest.raises(LoopcoderError, match="does not exist"):
        build(data_config(tmp_path / "missing"), tmp_path / "e", log=io.StringIO())
    assert sorted(os.listdir(tmp_path)) == ["bad", "corpus", "precious"]


def test_validation_split_too_small_is_an_error_but_zero_fraction_is_allowed(tmp_path):
    src = make_corpus(tmp_path / "corpus", n_files=6)
    with pytest.raises(LoopcoderError, match=r"validation split has .* raise --val-fraction"):
        build(data_config(src, val_fraction=0.01, seq_len=512), tmp_path / "a", log=io.StringIO())
    m = build(data_config(src, val_fraction=0.0, seq_len=512), tmp_path / "b", log=io.StringIO())
    assert m["statistics"]["splits"]["validation"]["sequences"] == 0
    assert len(ShardDataset(tmp_path / "b", "validation")) == 0
    spec = CorpusSpec(sources=(str(src),), val_fraction=0.0)
    assert all(d.split == "train" for d in iter_documents(spec))
