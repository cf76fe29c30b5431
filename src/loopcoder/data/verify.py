"""Checking a data directory before its tokens are trusted: shards, checksums, and the tokenizer.

Every reader of shards (`ShardDataset`) checks index.json (format, fields, shard paths inside the
directory) and each shard's header, dtype, shape and file size when it opens it: cheap, so always.
Hashing reads every byte, so training does it at start only for data up to `HASH_AT_START_MAX_BYTES`
(data/stdlib, 4.9 MB, hashed in 30 ms at load 13.8: docs/data.md, benchmarks/check_costs.py); larger
data is hashed by `loopcoder data verify DIR`, run once after copying or building it. The tokenizer in
`DIR/tokenizer/` must be the one the shards were encoded with: its fingerprint against the manifest's and
its size against index.json's vocabulary.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

from loopcoder.data.build import read_manifest
from loopcoder.data.shards import ShardDataset, read_index, verify_checksums
from loopcoder.data.tokenizer import load_raw_tokenizer
from loopcoder.model.identity import OVERRIDE_KEY, check_same_tokenizer, short, tokenizer_fingerprint
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.progress import Progress

HASH_AT_START_MAX_BYTES = 1 << 30  # 1 GiB: seconds of SHA-256 on one core (docs/data.md)


def check_tokenizer(data_dir: str | os.PathLike, allow: bool = False, override: str = OVERRIDE_KEY) -> str | None:
    """The fingerprint of a data directory's tokenizer (None if it has none), after checking that it is the
    one its shards were encoded with: the fingerprint the manifest records, and index.json's vocabulary."""
    d = Path(data_dir)
    if not (d / "tokenizer" / "tokenizer.json").is_file():
        return None
    fingerprint = tokenizer_fingerprint(d / "tokenizer")
    manifest = read_manifest(d) if (d / "manifest.json").is_file() else {}
    recorded = (manifest.get("tokenizer") or {}).get("fingerprint")
    shards = f"the shards of {str(d)!r} (manifest.json)"
    check_same_tokenizer(recorded, shards, fingerprint, f"{str(d / 'tokenizer')!r}", override, allow)
    vocab = load_raw_tokenizer(d / "tokenizer").get_vocab_size(with_added_tokens=True)
    index_vocab = read_index(d)["vocab_size"]
    if vocab != index_vocab and not allow:
        raise LoopcoderError(
            f"the tokenizer in {str(d / 'tokenizer')!r} has {vocab} tokens, but the shards of {str(d)!r} were "
            f"encoded with a vocabulary of {index_vocab} (index.json): it is not their tokenizer; rebuild the "
            f"data directory, or pass {override} if you mean it"
        )
    return fingerprint


def verify_at_start(datasets: list[ShardDataset], log: TextIO | None = None) -> bool:
    """Hash the shards a run reads when they are small enough (`HASH_AT_START_MAX_BYTES`); else say that
    `loopcoder data verify` does it. Returns whether they were hashed."""
    total = sum(ds.nbytes for ds in datasets)
    if total > HASH_AT_START_MAX_BYTES:
        if log is not None:
            where = datasets[0].data_dir if datasets else "DIR"
            print(
                f"data: {total / 2**30:.1f} GiB of shards: sizes checked, checksums not (run "
                f"`loopcoder data verify {where}` once)",
                file=log,
                flush=True,
            )
        return False
    for ds in datasets:
        verify_checksums(ds)
    return True


def verify(data_dir: str | os.PathLike, log: TextIO | None = None) -> dict[str, Any]:
    """Everything `loopcoder data verify` checks: index.json, every shard (file, size, checksum), the
    tokenizer against the manifest and the vocabulary, token_bytes.npy's length. One line per problem
    (the first one found); returns what was checked."""
    log = log if log is not None else sys.stderr
    index = read_index(data_dir)
    fingerprint = check_tokenizer(data_dir)
    datasets = [ShardDataset(data_dir, split) for split in index["splits"]]
    n = sum(len(ds.info["shards"]) for ds in datasets)
    nbytes = sum(ds.nbytes for ds in datasets)
    progress = Progress("verify", n, "shards", amount_unit="bytes", total_amount=nbytes, stream=log)
    for ds in datasets:
        verify_checksums(ds, progress)
        if ds.token_bytes.size and ds.token_bytes.size < index["vocab_size"]:
            raise LoopcoderError(
                f"{ds.data_dir / 'token_bytes.npy'} has {ds.token_bytes.size} entries for a vocabulary of "
                f"{index['vocab_size']}: rebuild the data directory"
            )
    progress.finish()
    return {
        "splits": {ds.split: len(ds) for ds in datasets},
        "shards": n,
        "bytes": nbytes,
        "tokenizer": short(fingerprint),
    }
