"""Corpus sources, cleaning and the train/validation split."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest

from loopcoder.data.corpus import (
    CleaningStats,
    CorpusSpec,
    fingerprint,
    iter_documents,
    split_of,
    stdlib_root,
)
from loopcoder.utils.errors import LoopcoderError
from support.data import make_corpus


def _docs(spec: CorpusSpec) -> tuple[list, CleaningStats]:
    stats = CleaningStats()
    return list(iter_documents(spec, stats)), stats


def test_directory_cleaning_counts_every_skip(tmp_path):
    root = make_corpus(tmp_path / "c", n_files=10)
    docs, st = _docs(CorpusSpec(sources=(str(root),)))
    ids = [d.id for d in docs]
    # 10 modules + the vendored file; the copy is a duplicate, __pycache__ and notes.txt are never seen.
    assert sorted(ids) == sorted(
        [f"pkg/mod{k}.py" for k in range(1, 10, 2)]
        + [f"pkg/sub/mod{k}.py" for k in range(0, 10, 2)]
        + ["pkg/vendored/lib.py"]
    )
    assert (st.seen, st.kept, st.duplicates, st.binary, st.undecodable, st.empty, st.too_large) == (
        16,
        11,
        1,
        1,
        1,
        1,
        1,
    )
    assert st.bytes_kept == sum(d.nbytes for d in docs) == sum(len(d.text.encode()) for d in docs)
    assert all(d.sha256 == hashlib.sha256(d.text.encode()).hexdigest() for d in docs)
    assert ids == [d.id for d in iter_documents(CorpusSpec(sources=(str(root),)))]  # a fixed order


def test_ignore_patterns_and_extensions(tmp_path):
    root = make_corpus(tmp_path / "c", n_files=6)
    docs, _ = _docs(CorpusSpec(sources=(str(root),), ignore=("vendored", "pkg/sub")))
    assert docs and all(not d.id.startswith(("pkg/vendored", "pkg/sub")) for d in docs)
    docs, st = _docs(CorpusSpec(sources=(str(root),), include_ext=(".txt",)))
    assert [d.id for d in docs] == ["pkg/notes.txt"] and st.seen == 1
    docs, _ = _docs(CorpusSpec(sources=(str(root),), include_ext=("*",), max_file_bytes=1 << 20))
    assert "pkg/notes.txt" in {d.id for d in docs} and "pkg/huge.py" in {d.id for d in docs}
    assert not any("__pycache__" in d.id for d in docs)


def test_split_is_by_content_deterministic_and_proportional():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20_000)]
    val = [h for h in hashes if split_of(h, 0.1, seed=0) == "validation"]
    assert 0.09 < len(val) / len(hashes) < 0.11
    assert val == [h for h in hashes if split_of(h, 0.1, seed=0) == "validation"]  # deterministic
    other = {h for h in hashes if split_of(h, 0.1, seed=1) == "validation"}
    assert other != set(val)  # the seed salts the split
    assert all(split_of(h, 0.0) == "train" for h in hashes[:100])


def test_split_of_a_file_does_not_depend_on_other_files(tmp_path):
    root = make_corpus(tmp_path / "c", n_files=30)
    spec = CorpusSpec(sources=(str(root),), val_fraction=0.3)
    before = {d.id: d.split for d in iter_documents(spec)}
    assert set(before.values()) == {"train", "validation"}
    for k in range(0, 30, 3):
        (root / "pkg" / "sub" / f"mod{k}.py").unlink(missing_ok=True)
        (root / "pkg" / f"mod{k}.py").unlink(missing_ok=True)
    after = {d.id: d.split for d in iter_documents(spec)}
    assert after and all(before[i] == s for i, s in after.items())
    assert list(iter_documents(spec, split="validation")) == [
        d for d in iter_documents(spec) if d.split == "validation"
    ]


def test_jsonl_source_and_its_errors(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a = 1\n", "b = 2\n", "a = 1\n"])))
    docs, st = _docs(CorpusSpec(sources=(str(f),)))
    assert [d.text for d in docs] == ["a = 1\n", "b = 2\n"] and st.duplicates == 1
    assert docs[1].id == f"{f}:2"
    g = tmp_path / "c.jsonl.gz"
    with gzip.open(g, "wt") as fh:
        fh.write(json.dumps({"content": "x = 1\n"}) + "\n")
    assert [d.text for d in iter_documents(CorpusSpec(sources=(str(g),), text_field="content"))] == ["x = 1\n"]
    with pytest.raises(LoopcoderError, match=r"c\.jsonl\.gz:1: no text field 'text' \(fields: content\)"):
        list(iter_documents(CorpusSpec(sources=(str(g),))))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(LoopcoderError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_documents(CorpusSpec(sources=(str(bad),))))
    num = tmp_path / "num.jsonl"
    num.write_text('{"text": 3}\n')
    with pytest.raises(LoopcoderError, match="is int, not a string"):
        list(iter_documents(CorpusSpec(sources=(str(num),))))


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"code": ["def f():\n    return 1\n", None, "x = 'é'\n"], "n": [1, 2, 3]}), f)
    docs, st = _docs(CorpusSpec(sources=(str(f),), text_field="code"))
    assert [d.text for d in docs] == ["def f():\n    return 1\n", "x = 'é'\n"] and st.empty == 1
    with pytest.raises(LoopcoderError, match=r"no text column 'text' \(columns: code, n\)"):
        list(iter_documents(CorpusSpec(sources=(str(f),))))


def test_huggingface_dataset_by_path(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = tmp_path / "ds"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": ["print(1)\n", "print(2)\n", "print(1)\n"]}),
            "test": datasets.Dataset.from_dict({"content": ["print(3)\n"]}),
        }
    ).save_to_disk(str(path))
    docs, st = _docs(CorpusSpec(sources=(f"hf:{path}",), text_field="content"))
    assert [d.text for d in docs] == ["print(1)\n", "print(2)\n"] and st.duplicates == 1
    assert docs[0].id == f"hf:{path}[0]"
    docs, _ = _docs(CorpusSpec(sources=(f"hf:{path}",), text_field="content", hf_split="test"))
    assert [d.text for d in docs] == ["print(3)\n"]
    with pytest.raises(LoopcoderError, match="no split 'validation'"):
        list(iter_documents(CorpusSpec(sources=(f"hf:{path}",), text_field="content", hf_split="validation")))
    with pytest.raises(LoopcoderError, match="no text field 'text'"):
        list(iter_documents(CorpusSpec(sources=(f"hf:{path}",))))
    files = tmp_path / "files"  # a directory of data files, streamed by `datasets.load_dataset`
    files.mkdir()
    (files / "part.jsonl").write_text('{"text": "a = 1\\n"}\n{"text": "b = 2\\n"}\n')
    assert [d.text for d in iter_documents(CorpusSpec(sources=(f"hf:{files}",)))] == ["a = 1\n", "b = 2\n"]
    with pytest.raises(LoopcoderError, match="cannot load Hugging Face dataset"):
        list(iter_documents(CorpusSpec(sources=(f"hf:{tmp_path / 'nowhere'}",))))


def test_bad_paths_and_settings(tmp_path):
    with pytest.raises(LoopcoderError, match="does not exist"):
        list(iter_documents(CorpusSpec(sources=(str(tmp_path / "missing"),))))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(LoopcoderError, match=r"is not \.jsonl"):
        list(iter_documents(CorpusSpec(sources=(str(tmp_path / "x.csv"),))))
    with pytest.raises(LoopcoderError, match="val_fraction"):
        CorpusSpec(val_fraction=1.0)
    with pytest.raises(LoopcoderError, match="size limits"):
        CorpusSpec(max_file_bytes=0)


def test_multiple_sources_deduplicate_across_sources_and_max_documents(tmp_path):
    a = make_corpus(tmp_path / "a", n_files=4)
    b = make_corpus(tmp_path / "b", n_files=4)  # same seed: the same files again
    docs, st = _docs(CorpusSpec(sources=(str(a), str(b))))
    assert st.duplicates == 1 + 5 + 1  # a's copy, then all of b's kept files (and b's copy)
    assert all(d.id.startswith(f"{a}:") for d in docs)
    docs, _ = _docs(CorpusSpec(sources=(str(a),), max_documents=2))
    assert len(docs) == 2


def test_stdlib_default_corpus():
    docs, st = _docs(CorpusSpec())
    ids = [d.id for d in docs]
    assert len(docs) > 300 and st.bytes_kept > 5_000_000
    assert all(i.endswith(".py") for i in ids)
    assert "os.py" in ids and "json/decoder.py" in ids
    excluded = ("test/", "tests/", "idlelib/", "lib2to3/", "site-packages/", "encodings/", "pydoc_data/")
    assert not any(i.startswith(excluded) or f"/{excluded[0]}" in i or "/tests/" in i for i in ids)
    assert (stdlib_root() / "os.py").is_file()
    assert fingerprint(CorpusSpec()) == fingerprint(CorpusSpec())
    assert fingerprint(CorpusSpec()) != fingerprint(CorpusSpec(val_fraction=0.1))
