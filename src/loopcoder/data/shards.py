"""Packed shards: documents joined with end-of-text into fixed-length sequences, memory-mapped.

Layout of a data directory (written by `data.build`):
    index.json             format, seq_len, dtype, vocab_size, eot_id, per split: shard files (each with its
                           bytes and the SHA-256 of its tokens) and counts
    token_bytes.npy        int32[vocab]: UTF-8 bytes each token stands for (0 for special tokens)
    train/00000.npy ...    uint16 (vocab <= 65536) or uint32 arrays of shape (sequences, seq_len)
    validation/00000.npy

Each split's documents are concatenated, every one followed by `<|endoftext|>`, and cut into rows of
`seq_len` tokens; the tail shorter than a row is dropped (and counted). A row usually starts inside a
document: training is plain next-token prediction over the row (labels = input_ids, the model shifts).

`read_index` validates index.json (one-line errors for a damaged one; a shard path that would leave the
data directory is refused); `ShardDataset` checks every shard's header, dtype, shape and file size when it
opens it, and `verify_checksums` hashes shards against the index (data/verify.py decides when).

`BatchReader` streams batches of rows from any dataset with `__len__` and `get(indices)` (the shards
here, the SFT rows in `sft.py`): infinite epochs, each a permutation seeded by (seed, epoch); rank r of
W takes the r-th slice of each global batch; `state_dict()` resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from loopcoder.utils.errors import LoopcoderError

INDEX_FORMAT = "loopcoder-shards"
INDEX_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 25  # 32 Mi tokens: 64 MiB per uint16 shard


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Packs one split's documents into rows of `seq_len` tokens and writes them as `.npy` shards."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        seq_len: int,
        vocab_size: int,
        eot_id: int,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
    ) -> None:
        if seq_len < 2:
            raise LoopcoderError(f"sequence length {seq_len} must be at least 2")
        self.root = Path(root)
        self.split = split
        self.seq_len = seq_len
        self.dtype = shard_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.eot = np.array([eot_id], dtype=self.dtype)
        self.rows_per_shard = max(1, shard_tokens // seq_len)
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self.doc_tokens = 0  # tokens of the documents themselves, end-of-text not counted
        self.doc_bytes = 0
        self.hash = hashlib.sha256()
        (self.root / split).mkdir(parents=True, exist_ok=True)

    def add(self, ids: Sequence[int] | np.ndarray, nbytes: int = 0) -> None:
        """Append one document (its token ids and UTF-8 byte count); end-of-text is added here."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise LoopcoderError(f"token id out of range [0, {self.vocab_size}) in a {self.split} document")
        self._pending.append(arr.astype(self.dtype))
        self._pending.append(self.eot)
        self._pending_tokens += arr.size + 1
        self.documents += 1
        self.doc_tokens += int(arr.size)
        self.doc_bytes += nbytes
        if self._pending_tokens >= self.rows_per_shard * self.seq_len:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        stream = np.concatenate(self._pending) if self._pending else np.zeros(0, self.dtype)
        rows_cap = self.rows_per_shard
        start = 0
        while stream.size - start >= (1 if final else rows_cap) * self.seq_len:
            rows = min(rows_cap, (stream.size - start) // self.seq_len)
            block = stream[start : start + rows * self.seq_len].reshape(rows, self.seq_len)
            self._write(block)
            start += rows * self.seq_len
        rest = stream[start:]
        self._pending = [rest] if rest.size else []
        self._pending_tokens = int(rest.size)

    def _write(self, block: np.ndarray) -> None:
        name = f"{self.split}/{len(self.shards):05d}.npy"
        np.save(self.root / name, np.ascontiguousarray(block))
        tokens = block.tobytes()
        self.hash.update(tokens)
        self.shards.append(
            {
                "file": name,
                "sequences": int(block.shape[0]),
                "bytes": (self.root / name).stat().st_size,
                "sha256": hashlib.sha256(tokens).hexdigest(),
            }
        )

    def close(self) -> dict[str, Any]:
        """Write what is left (whole rows only) and return this split's index entry."""
        self._flush(final=True)
        dropped = self._pending_tokens
        self._pending, self._pending_tokens = [], 0
        sequences = sum(s["sequences"] for s in self.shards)
        return {
            "shards": self.shards,
            "sequences": sequences,
            "tokens": sequences * self.seq_len,
            "documents": self.documents,
            "document_tokens": self.doc_tokens,
            "document_bytes": self.doc_bytes,
            "dropped_tokens": dropped,
            "sha256": self.hash.hexdigest(),
        }


def damaged(what: Any, why: str) -> LoopcoderError:
    """The one-line error for a damaged file of a data directory."""
    return LoopcoderError(f"{what} is damaged ({why}): rebuild the data directory (`loopcoder data build --force`)")


def _why(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def read_index(data_dir: str | os.PathLike) -> dict[str, Any]:
    """index.json, checked: its format, the fields readers use, and shard paths inside the data directory."""
    path = Path(data_dir) / "index.json"
    if not Path(data_dir).is_dir():
        raise LoopcoderError(f"data directory {str(data_dir)!r} does not exist")
    if not path.is_file():
        raise LoopcoderError(
            f"{str(data_dir)!r} has no index.json: not a loopcoder data directory "
            "(build one with `loopcoder data build`)"
        )
    try:
        index = json.loads(path.read_bytes())
    except (ValueError, OSError) as e:
        raise damaged(path, _why(e)) from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
        got = index if not isinstance(index, dict) else f"{index.get('format')!r} version {index.get('version')!r}"
        raise LoopcoderError(f"{path}: unknown format {got}")
    _check_index(index, path)
    return index


def _check_index(index: dict[str, Any], path: Path) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise damaged(path, what)

    def whole(x: Any, low: int) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= low

    need(whole(index.get("seq_len"), 2), f"seq_len {index.get('seq_len')!r} is not an integer >= 2")
    need(whole(index.get("vocab_size"), 1), f"vocab_size {index.get('vocab_size')!r} is not an integer >= 1")
    need(whole(index.get("eot_id"), 0), f"eot_id {index.get('eot_id')!r} is not a token id")
    need(index.get("dtype") in ("uint16", "uint32"), f"dtype {index.get('dtype')!r} is not uint16 or uint32")
    splits = index.get("splits")
    need(isinstance(splits, dict) and bool(splits), "no splits")
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        need(isinstance(shards, list), f"split {name!r} has no shard list")
        for s in shards:
            need(isinstance(s, dict) and isinstance(s.get("file"), str), f"split {name!r}: a shard without a file")
            need(whole(s.get("sequences"), 0), f"shard {s['file']!r}: sequences {s.get('sequences')!r}")
            parts = Path(s["file"]).parts
            need(
                bool(parts) and not Path(s["file"]).is_absolute() and ".." not in parts,
                f"shard path {s['file']!r} leaves the data directory",
            )


def _open_shard(f: Path, spec: dict[str, Any], seq_len: int, dtype: str) -> np.ndarray:
    """A shard memory-mapped, checked against the index: a `.npy` of the right dtype and shape whose file
    holds exactly its header and rows (a truncated or padded file, random bytes: one line naming it)."""
    if not f.is_file():
        raise LoopcoderError(f"shard {f} is missing: rebuild with `loopcoder data build --force`")
    try:
        arr = np.load(f, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise damaged(f"shard {f}", f"not a readable .npy: {_why(e)}") from None
    if arr.dtype != np.dtype(dtype) or arr.ndim != 2 or arr.shape != (spec["sequences"], seq_len):
        raise LoopcoderError(
            f"shard {f} holds {arr.dtype} {arr.shape}, index.json says {dtype} ({spec['sequences']}, {seq_len})"
        )
    size = f.stat().st_size
    want = spec.get("bytes", getattr(arr, "offset", 0) + arr.nbytes)
    if size != want:
        raise LoopcoderError(f"shard {f} has {size:,} bytes, index.json says {want:,}: truncated or replaced")
    return arr


def verify_checksums(dataset: ShardDataset, progress: Any = None) -> int:
    """Hash every shard of a split against index.json (per shard; a directory built before per-shard
    hashes were recorded: the split's hash over all its shards). Returns the bytes hashed; a mismatch is
    one line naming the shard (or the split)."""
    total = 0
    split_hash = hashlib.sha256()
    for f, spec, arr in zip(dataset._files, dataset.info["shards"], dataset._shards):
        h = hashlib.sha256()
        view = np.ascontiguousarray(arr).reshape(-1)
        for start in range(0, view.size, 1 << 22):
            chunk = view[start : start + (1 << 22)]
            h.update(chunk)
            split_hash.update(chunk)
        total += arr.nbytes
        if progress is not None:
            progress.advance(1, arr.nbytes)
        if "sha256" in spec and h.hexdigest() != spec["sha256"]:
            raise LoopcoderError(
                f"shard {f} does not match its checksum in index.json: its tokens changed after "
                "`loopcoder data build`; rebuild the data directory (`loopcoder data build --force`)"
            )
    recorded = dataset.info.get("sha256")
    if recorded and not all("sha256" in s for s in dataset.info["shards"]) and split_hash.hexdigest() != recorded:
        raise LoopcoderError(
            f"the {dataset.split} shards of {dataset.data_dir} do not match their checksum in index.json: "
            "some tokens changed after `loopcoder data build`; rebuild the data directory"
        )
    return total


class RowDataset(Protocol):
    """What `BatchReader` needs: a number of rows and a way to fetch some as tensors."""

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> dict[str, Any]: ...


class ShardDataset:
    """One split of a data directory: `len()` rows of `seq_len` tokens, memory-mapped."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train") -> None:
        index = read_index(data_dir)
        if split not in index["splits"]:
            raise LoopcoderError(f"{data_dir}: no split {split!r} (splits: {', '.join(index['splits'])})")
        root = Path(data_dir)
        entry = index["splits"][split]
        self.data_dir = root
        self.split = split
        self.seq_len: int = index["seq_len"]
        self.vocab_size: int = index["vocab_size"]
        self.eot_id: int = index["eot_id"]
        self.info = entry
        self._shards = []
        self._files: list[Path] = []
        for s in entry["shards"]:
            f = root / s["file"]
            self._shards.append(_open_shard(f, s, self.seq_len, index["dtype"]))
            self._files.append(f)
        self._ends = np.cumsum([a.shape[0] for a in self._shards], dtype=np.int64)
        tb = root / "token_bytes.npy"
        self.token_bytes: np.ndarray = np.zeros(0, np.int32)
        if tb.is_file():
            try:
                self.token_bytes = np.load(tb, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise damaged(tb, _why(e)) from None

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def nbytes(self) -> int:
        """Bytes of token data in this split's shards (what hashing them reads)."""
        return sum(a.nbytes for a in self._shards)

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """int64 array (len(indices), seq_len) of the given rows."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        out = np.empty((idx.size, self.seq_len), dtype=np.int64)
        shard_of = np.searchsorted(self._ends, idx, side="right")
        for k, (i, s) in enumerate(zip(idx, shard_of)):
            start = self._ends[s - 1] if s else 0
            out[k] = self._shards[s][i - start]
        if out.size and out.max() >= self.vocab_size:  # a corrupted shard: name it, not an embedding IndexError
            k = int(np.argmax(out.max(axis=1) >= self.vocab_size))
            s = int(shard_of[k])
            row = int(idx[k] - (self._ends[s - 1] if s else 0))
            raise LoopcoderError(
                f"shard {self._files[s]} is corrupted: row {row} holds token id {int(out[k].max())}, "
                f"outside the vocabulary [0, {self.vocab_size}); rebuild the data directory "
                "(`loopcoder data build --force`)"
            )
        return out

    def get(self, indices: Sequence[int] | np.ndarray) -> dict[str, Any]:
        return {"input_ids": torch.from_numpy(self.rows(indices))}

    def target_bytes(self, rows: np.ndarray) -> np.ndarray:
        """UTF-8 bytes of each row's predicted tokens (positions 1..seq_len-1): bits per byte's denominator."""
        if not self.token_bytes.size:
            raise LoopcoderError(f"{self.data_dir} has no token_bytes.npy: rebuild with --force")
        return self.token_bytes[rows[:, 1:]].sum(axis=1).astype(np.int64)

    def iter_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
        """Every row once, in order (rank r takes rows r, r+W, ...), with `target_bytes` per row.

        Bits per byte = (sum of next-token losses in nats over all rows) / ln 2 / (sum of target_bytes).
        """
        for idx in iter_sequential(len(self), batch_size, rank, world_size):
            rows = self.rows(idx)
            yield {"input_ids": torch.from_numpy(rows), "target_bytes": torch.from_numpy(self.target_bytes(rows))}


def bits_per_byte(loss_sum_nats: float, target_bytes: int) -> float:
    """Bits per UTF-8 byte from a summed next-token loss (nats) and the summed `target_bytes` of the rows.

    End-of-text targets stand for no bytes but their loss counts: a small, tokenizer-independent cost.
    """
    if target_bytes <= 0:
        raise ValueError("bits per byte needs a positive byte count")
    return loss_sum_nats / math.log(2) / target_bytes


def _check_ranks(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise LoopcoderError(f"batch size {batch_size} must be at least 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoopcoderError(f"rank {rank} is not in [0, world_size={world_size})")


def iter_sequential(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[np.ndarray]:
    """Row indices rank, rank+W, ... in batches of `batch_size` (the last one may be short): one pass."""
    _check_ranks(batch_size, rank, world_size)
    mine = np.arange(rank, n, world_size, dtype=np.int64)
    for start in range(0, mine.size, batch_size):
        yield mine[start : start + batch_size]


class BatchReader:
    """Endless seeded batches over a `RowDataset`, disjoint across data-parallel ranks, resumable.

    `batch_size` is per rank; a global batch is batch_size x world_size rows. An epoch is a permutation
    of all rows seeded by (seed, epoch), consumed in whole global batches (the few left over move to a
    random place in the next epoch's permutation, so nothing is systematically skipped).
    """

    def __init__(self, dataset: RowDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        _check_ranks(batch_size, rank, world_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_rows = len(dataset)
        if self.num_rows < batch_size * world_size:
            raise LoopcoderError(
                f"the dataset has {self.num_rows} rows, fewer than one global batch ({batch_size} x {world_size} ranks)"
            )
        self.epoch = 0
        self.step = 0  # global batches already taken in this epoch
        self._perm_epoch = -1
        self._perm = np.zeros(0, np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // (self.batch_size * self.world_size)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perm = rng.permutation(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self) -> np.ndarray:
        """This rank's row indices of the next batch (advances the position)."""
        if self.step >= self.steps_per_epoch:
            self.epoch += 1
            self.step = 0
        g = self.batch_size * self.world_size
        start = self.step * g + self.rank * self.batch_size
        idx = self.permutation(self.epoch)[start : start + self.batch_size]
        self.step += 1
        return idx

    def next_batch(self) -> dict[str, Any]:
        return self.dataset.get(self.next_indices())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """The position (the same on every rank) plus what must match to resume."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_rows": self.num_rows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("batch_size", "world_size", "num_rows"):
            if state.get(key) != getattr(self, key):
                raise LoopcoderError(
                    f"cannot resume: the saved reader has {key}={state.get(key)}, this one {getattr(self, key)}"
                )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self._perm_epoch = -1
