"""Batch sources: where a stage's training batches and validation batches come from.

Pretraining and SFT differ only here (and in how the model is initialised). Both give batches of
`input_ids` and `labels` (-100 = no loss) and, for SFT, `attention_mask`; both stream training rows
through `data.shards.BatchReader`, so data order, rank slicing and exact resume are the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from loopcoder.data.permutations import PermutationRows, PermutationTask
from loopcoder.data.sft import IGNORE_INDEX, SFTDataset
from loopcoder.data.shards import BatchReader, ShardDataset, read_index
from loopcoder.data.tokenizer import load_tokenizer, token_byte_lengths
from loopcoder.data.verify import check_tokenizer, verify_at_start
from loopcoder.training.config import TrainConfig
from loopcoder.utils.errors import LoopcoderError


class ChunkedRows:
    """A shard split whose rows are cut into `k` shorter rows (train at seq 256 on a 512 build)."""

    def __init__(self, dataset: ShardDataset, seq_len: int) -> None:
        if dataset.seq_len % seq_len:
            raise LoopcoderError(
                f"data.seq_len={seq_len} must divide the shards' sequence length {dataset.seq_len} ({dataset.data_dir})"
            )
        self.dataset = dataset
        self.seq_len = seq_len
        self.k = dataset.seq_len // seq_len

    def __len__(self) -> int:
        return len(self.dataset) * self.k

    def get(self, indices: np.ndarray) -> dict[str, Any]:
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.dataset.rows(idx // self.k) if idx.size else np.zeros((0, self.dataset.seq_len), np.int64)
        cols = (idx % self.k)[:, None] * self.seq_len + np.arange(self.seq_len)
        ids = torch.from_numpy(np.take_along_axis(rows, cols, axis=1))
        return {"input_ids": ids, "labels": ids}


@dataclass
class BatchSource:
    """Training rows (through a resumable reader), validation rows, and what they need around them."""

    train: Any  # a RowDataset: len() and get(indices) -> {"input_ids", "labels"[, "attention_mask"]}
    validation: Any | None
    seq_len: int
    token_bytes: np.ndarray  # UTF-8 bytes per token id: bits per byte's denominator
    tokenizer_dir: Path | None  # copied into every checkpoint
    vocab_size: int  # the tokenizer's

    def reader(self, micro_batch: int, seed: int, rank: int, world_size: int) -> BatchReader:
        return BatchReader(self.train, micro_batch, seed, rank, world_size)

    def validation_batches(
        self, batch_size: int, rank: int, world_size: int, max_batches: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every validation row once; each rank gets full batches (rows past the end are masked out),
        so that every rank runs the same number of forwards (FSDP gathers weights in each)."""
        if self.validation is None:
            return
        n = len(self.validation)
        g = batch_size * world_size
        for b, start in enumerate(range(0, n, g)):
            if max_batches is not None and b >= max_batches:
                return
            idx = np.arange(start + rank * batch_size, start + (rank + 1) * batch_size)
            valid = idx < n
            batch = self.validation.get(np.where(valid, idx, 0))
            labels = batch["labels"].clone()
            labels[torch.from_numpy(~valid)] = IGNORE_INDEX
            yield {**batch, "labels": labels}

    def label_bytes(self, labels: torch.Tensor) -> int:
        """Bytes covered by the predicted labels (positions 1.., the model shifts), ignoring -100."""
        target = labels[:, 1:].cpu().numpy()
        mask = target != IGNORE_INDEX
        return int(self.token_bytes[np.where(mask, target, 0)][mask].sum())


def pretrain_source(cfg: TrainConfig, log: TextIO | None = None) -> BatchSource:
    if not cfg.data.dir:
        raise LoopcoderError("pretraining needs data: set data.dir=DIR (a directory from `loopcoder data build`)")
    index = read_index(cfg.data.dir)
    check_tokenizer(cfg.data.dir, cfg.data.allow_tokenizer_mismatch)  # the shards' own tokenizer, by content
    train = ShardDataset(cfg.data.dir, cfg.data.train_split)
    seq_len = cfg.data.seq_len or train.seq_len
    val = None
    opened = [train]
    if cfg.data.validation_split in index["splits"] and index["splits"][cfg.data.validation_split]["sequences"]:
        opened.append(ShardDataset(cfg.data.dir, cfg.data.validation_split))
        val = ChunkedRows(opened[-1], seq_len)
    verify_at_start(opened, log)
    tok = Path(cfg.data.dir) / "tokenizer"
    return BatchSource(
        ChunkedRows(train, seq_len),
        val,
        seq_len,
        train.token_bytes,
        tok if (tok / "tokenizer.json").is_file() else None,
        int(index["vocab_size"]),
    )


def sft_source(cfg: TrainConfig, init_dir: Path) -> BatchSource:
    """Chat JSONL -> SFT rows with loss masks; the tokenizer is the data directory's, else the init model's."""
    data_dir = Path(cfg.data.dir) if cfg.data.dir else None
    if data_dir is not None and (data_dir / "tokenizer" / "tokenizer.json").is_file():
        tok_dir = data_dir / "tokenizer"
    elif (init_dir / "tokenizer.json").is_file():
        tok_dir = init_dir
    else:
        raise LoopcoderError(
            f"no tokenizer: set data.dir to the data directory (the init model {init_dir} has no tokenizer.json)"
        )
    seq_len = cfg.data.seq_len
    if seq_len is None and data_dir is not None and (data_dir / "index.json").is_file():
        seq_len = int(read_index(data_dir)["seq_len"])
    seq_len = seq_len or 512

    def files(given: list[str], split: str) -> list[str]:
        if given:
            return given
        default = data_dir / "instructions" / f"{split}.jsonl" if data_dir is not None else None
        if default is None or not default.is_file():
            if split == "validation":
                return []
            where = f"{data_dir}/instructions" if data_dir is not None else "data.dir/instructions"
            raise LoopcoderError(
                f"no SFT data: set data.sft_train=FILE.jsonl, or build {where} with "
                f"`loopcoder data instructions --data {data_dir or 'DIR'}`"
            )
        return [str(default)]

    tokenizer = load_tokenizer(tok_dir)
    train = SFTDataset.from_jsonl(files(cfg.data.sft_train, "train"), tokenizer, seq_len, cfg.data.packing)
    val_files = files(cfg.data.sft_validation, "validation")
    val = SFTDataset.from_jsonl(val_files, tokenizer, seq_len, cfg.data.packing) if val_files else None
    token_bytes = token_byte_lengths(tokenizer.backend_tokenizer)
    return BatchSource(train, val, seq_len, token_bytes, tok_dir, len(tokenizer))


def permutation_source(
    task: PermutationTask, rows: int, seq_len: int, lengths: tuple[int, ...], seed: int = 0, validation_rows: int = 0
) -> BatchSource:
    """The depth task's rows (`loopcoder.data.permutations`): `rows` training rows drawn from `seed`, and
    `validation_rows` more from another seed (training-split items too: held-out items are for
    evaluation only). Every token counts as one byte, so bits per byte is bits per answer."""
    train = PermutationRows(task, rows, seq_len, lengths, seed=seed)
    val = PermutationRows(task, validation_rows, seq_len, lengths, seed=seed + 1) if validation_rows else None
    return BatchSource(train, val, seq_len, np.ones(task.vocab_size, dtype=np.int64), None, task.vocab_size)
