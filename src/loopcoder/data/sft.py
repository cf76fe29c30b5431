"""Supervised fine-tuning data: chat JSONL (OpenAI messages format) -> rows of input_ids/labels/attention_mask.

A record is `{"messages": [{"role": ..., "content": ...}, ...], "tools": [...]}` (tools optional), roles
system, user, assistant, tool; assistant messages may carry OpenAI-style `tool_calls`. Conversations are
rendered with the tokenizer's chat template; only what the assistant writes (its content, tool calls
and the closing `<|im_end|>`) has labels, everything else is -100. Labels are aligned with input_ids
(the model shifts them), as for pretraining.

Rows have a fixed length `seq_len`: packed (conversations placed one after another into a row until
the next one does not fit; attention is not blocked between them, as in the usual packed SFT) or
padded (one conversation per row). Padding has attention_mask 0 and label -100. A conversation longer
than a row is truncated; one left with no assistant token is dropped; both are counted.

`SFTDataset` has `len()` and `get(indices)`, so `shards.BatchReader` streams it with the same seed,
resume and rank semantics as the pretraining shards.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopcoder.data.corpus import iter_jsonl
from loopcoder.utils.errors import LoopcoderError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages: Any, where: str = "conversation") -> list[dict[str, Any]]:
    """Check a conversation's shape; raise `LoopcoderError` naming `where` and the problem."""
    if not isinstance(messages, list) or not messages:
        raise LoopcoderError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise LoopcoderError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if m["role"] == "assistant" and m.get("tool_calls"):
            ok = content is None or isinstance(content, str)
        elif m["role"] == "tool":
            ok = isinstance(content, (str, dict, list))
        else:
            ok = isinstance(content, str)
        if not ok:
            raise LoopcoderError(f"{where}: message {i} ({m['role']}) has no text 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise LoopcoderError(f"{where}: no assistant message, nothing to train on")
    return messages


def load_chat_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records `{"messages": [...], "tools"?: [...]}` of a chat JSONL file, validated."""
    p = Path(path)
    if not p.is_file():
        raise LoopcoderError(f"chat file {str(path)!r} does not exist")
    records = []
    for where, rec in iter_jsonl(p):
        if not isinstance(rec, dict) or "messages" not in rec:
            raise LoopcoderError(f"{where}: no 'messages' field (expected the OpenAI chat format)")
        validate_messages(rec["messages"], where)
        if rec.get("tools") is not None and not isinstance(rec["tools"], list):
            raise LoopcoderError(f"{where}: 'tools' must be a list")
        records.append(rec)
    if not records:
        raise LoopcoderError(f"chat file {str(path)!r} has no records")
    return records


def tokenize_chat(
    messages: list[dict[str, Any]], tokenizer: Any, tools: list[dict[str, Any]] | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 except on assistant-written tokens."""
    validate_messages(messages)
    out = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(out["input_ids"])
    mask = out["assistant_masks"]
    if not any(mask):
        raise LoopcoderError(
            "the chat template marked no assistant tokens: the tokenizer's template lacks "
            "{% generation %} blocks (use a loopcoder tokenizer)"
        )
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def collate(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, length: int | None = None
) -> dict[str, Any]:
    """Right-pad (input_ids, labels) pairs to `length` (default: the longest) into LongTensors."""
    n = length or max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        k = min(len(ids), n)
        input_ids[i, :k] = torch.as_tensor(list(ids[:k]))
        labels[i, :k] = torch.as_tensor(list(lab[:k]))
        attention[i, :k] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


@dataclass
class SFTStats:
    conversations: int = 0
    rows: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to train on after truncation
    tokens: int = 0  # real (non-padding) tokens in the rows
    label_tokens: int = 0  # tokens with a label

    def to_dict(self) -> dict[str, Any]:
        return {
            "conversations": self.conversations,
            "rows": self.rows,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "tokens": self.tokens,
            "label_tokens": self.label_tokens,
        }


class SFTDataset:
    """Fixed-length SFT rows in memory: `get(indices)` gives input_ids, labels, attention_mask."""

    def __init__(
        self, input_ids: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray, stats: SFTStats | None = None
    ) -> None:
        if not input_ids.shape == labels.shape == attention_mask.shape or input_ids.ndim != 2:
            raise ValueError("input_ids, labels and attention_mask must have the same 2-d shape")
        self.input_ids = input_ids
        self.labels = labels
        self.attention_mask = attention_mask
        self.stats = stats or SFTStats(rows=len(input_ids))

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def get(self, indices: Sequence[int] | np.ndarray) -> dict[str, Any]:
        idx = np.asarray(indices, dtype=np.int64)
        return {
            "input_ids": torch.from_numpy(self.input_ids[idx].astype(np.int64)),
            "labels": torch.from_numpy(self.labels[idx].astype(np.int64)),
            "attention_mask": torch.from_numpy(self.attention_mask[idx].astype(np.int64)),
        }

    @classmethod
    def build(
        cls,
        conversations: Iterable[dict[str, Any] | list[dict[str, Any]]],
        tokenizer: Any,
        seq_len: int = 512,
        packing: bool = True,
    ) -> SFTDataset:
        """Tokenize conversations (records with "messages"/"tools", or bare message lists) into rows."""
        if seq_len < 2:
            raise LoopcoderError(f"sequence length {seq_len} must be at least 2")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        stats = SFTStats()
        examples = []
        for conv in conversations:
            messages, tools = (conv["messages"], conv.get("tools")) if isinstance(conv, dict) else (conv, None)
            ids, labels = tokenize_chat(messages, tokenizer, tools)
            stats.conversations += 1
            if len(ids) > seq_len:
                stats.truncated += 1
                ids, labels = ids[:seq_len], labels[:seq_len]
            if all(x == IGNORE_INDEX for x in labels[1:]):  # position 0 is never a target
                stats.dropped += 1
                continue
            examples.append((ids, labels))
        if not examples:
            raise LoopcoderError(
                f"no SFT conversation fits: {stats.conversations} given, {stats.dropped} dropped "
                f"(nothing to train on within {seq_len} tokens)"
            )
        rows = _pack(examples, seq_len) if packing else [[e] for e in examples]
        ids_a = np.full((len(rows), seq_len), pad_id, dtype=np.int32)
        lab_a = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int32)
        att_a = np.zeros((len(rows), seq_len), dtype=np.int8)
        for r, row in enumerate(rows):
            pos = 0
            for ids, labels in row:
                ids_a[r, pos : pos + len(ids)] = ids
                lab_a[r, pos : pos + len(ids)] = labels
                att_a[r, pos : pos + len(ids)] = 1
                pos += len(ids)
        stats.rows = len(rows)
        stats.tokens = int(att_a.sum())
        stats.label_tokens = int((lab_a != IGNORE_INDEX).sum())
        return cls(ids_a, lab_a, att_a, stats)

    @classmethod
    def from_jsonl(
        cls,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: Any,
        seq_len: int = 512,
        packing: bool = True,
    ) -> SFTDataset:
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        records = [r for p in paths for r in load_chat_jsonl(p)]
        return cls.build(records, tokenizer, seq_len, packing)


def _pack(examples: list[tuple[list[int], list[int]]], seq_len: int) -> list[list[tuple[list[int], list[int]]]]:
    """Greedy, in order: a conversation goes into the current row if it fits, else starts a new row."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    current: list[tuple[list[int], list[int]]] = []
    used = 0
    for ex in examples:
        if current and used + len(ex[0]) > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += len(ex[0])
    if current:
        rows.append(current)
    return rows
