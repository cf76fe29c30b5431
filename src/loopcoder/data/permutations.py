"""Composition of fixed permutations: the study's depth probe (docs/study.md, "The depth task").

F permutations f_0 .. f_{F-1} of N symbols are drawn once from the task seed. They are never shown in
context: a model can only learn them into its weights. An item is `x a_1 ... a_k =` and its answer is
y = f_{a_k}(... f_{a_1}(x)). Each step needs the symbol the previous one produced, so a model needs
about one layer (or loop) per step; more loops give more depth at equal parameters.

Token ids (a vocabulary of its own, `vocab_size` = 4 + N + F): 0 pad, 1 bos, 2 eos (the ids the code
tokenizer reserves, so a model config's special ids mean the same), 3 `=`, then the N symbols, then
the F function names. A training row is BOS followed by whole items `x a_1 .. a_k = y`, packed until
the next one would not fit, then padding; only answer tokens carry loss.

Fresh items. The item space is finite (N * F^k items of k steps), so "fresh" is defined structurally,
as in `reasoning`: an item of k >= 2 steps is held out when a fixed hash of (task seed, k, item) falls
in the lowest `eval_share` of the hash space. Training never emits a held-out item and evaluation draws
only held-out items, whatever the seeds. Items of one step are the permutation tables themselves: none
can be held out without hiding a value no item could teach, so k = 1 is evaluated on trained items
(every one of the N * F), and every k >= 2 on items never seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loopcoder.data.sft import IGNORE_INDEX
from loopcoder.utils.errors import LoopcoderError

PAD_ID, BOS_ID, EOS_ID, EQ_ID = 0, 1, 2, 3
FIRST_SYMBOL = 4
MAX_ENUMERATED = 1 << 22  # items of one k whose split is computed by enumeration (k <= 11 at N=8, F=4)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64: a fixed hash, the same in every process."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class PermutationTask:
    """The task: which permutations, and which items are held out."""

    symbols: int = 8  # N
    functions: int = 4  # F
    seed: int = 0  # draws the permutations and the held-out split
    eval_share: float = 0.25  # share of the items of each k >= 2 held out for evaluation
    equals: bool = True  # items end with `=` before the answer (False: the answer follows a_k directly)
    perms: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.symbols < 2 or self.functions < 1:
            raise LoopcoderError(
                f"the task needs >= 2 symbols and >= 1 function, got {self.symbols} and {self.functions}"
            )
        if not 0 < self.eval_share < 1:
            raise LoopcoderError(f"eval_share must be in (0, 1), got {self.eval_share}")
        rng = np.random.default_rng([self.seed, self.symbols, self.functions])
        perms = np.stack([rng.permutation(self.symbols) for _ in range(self.functions)])
        object.__setattr__(self, "perms", perms)

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.symbols + self.functions

    def to_dict(self) -> dict[str, Any]:
        return {
            "symbols": self.symbols,
            "functions": self.functions,
            "seed": self.seed,
            "eval_share": self.eval_share,
            "equals": self.equals,
            "permutations": self.perms.tolist(),
        }

    # -- items: x (n,) and ops (n, k) as integer arrays ------------------------------------------------
    def answers(self, x: np.ndarray, ops: np.ndarray) -> np.ndarray:
        """f_{a_k}(... f_{a_1}(x)) for every item, one step at a time."""
        y = np.asarray(x, dtype=np.int64).copy()
        for j in range(np.shape(ops)[1]):
            y = self.perms[ops[:, j], y]
        return y

    def item_index(self, x: np.ndarray, ops: np.ndarray) -> np.ndarray:
        """Each item's number among the N * F^k items of its length (x major, then a_1 .. a_k)."""
        idx = np.asarray(x, dtype=np.int64)
        for j in range(np.shape(ops)[1]):
            idx = idx * self.functions + ops[:, j]
        return idx

    def held_out(self, k: int, index: np.ndarray) -> np.ndarray:
        """Whether items (of `k` steps, numbered by `item_index`) belong to the evaluation split."""
        if k < 2:
            return np.zeros(np.shape(index), dtype=bool)
        with np.errstate(over="ignore"):
            key = _mix(np.uint64(self.seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(k))
            h = _mix(np.asarray(index, dtype=np.uint64) ^ key)
        return h < np.uint64(int(self.eval_share * 2.0**64))

    def space(self, k: int) -> int:
        return self.symbols * self.functions**k

    def decode_index(self, k: int, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The inverse of `item_index`: (x, ops)."""
        index = np.asarray(index, dtype=np.int64)
        ops = np.zeros((len(index), k), dtype=np.int64)
        for j in range(k - 1, -1, -1):
            ops[:, j] = index % self.functions
            index = index // self.functions
        return index, ops

    def split_index(self, k: int, split: str) -> np.ndarray:
        """The numbers (`item_index`) of every item of `k` steps in `split` ("train" or "eval"), sorted.
        k = 1: every item is in both (the tables; see the module doc)."""
        if k < 1:
            raise LoopcoderError(f"items need >= 1 step, got k={k}")
        if split not in ("train", "eval"):
            raise LoopcoderError(f"split must be train or eval, got {split!r}")
        size = self.space(k)
        if size > MAX_ENUMERATED:
            raise LoopcoderError(f"k={k} has {size} items, too many to enumerate (at most {MAX_ENUMERATED})")
        index = np.arange(size, dtype=np.int64)
        if k == 1:
            return index
        held = self.held_out(k, index)
        return index[held if split == "eval" else ~held]

    def eval_items(self, k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Up to `n` distinct held-out items of `k` steps (every one when there are fewer), in a fixed
        order: the same items for every model, so models can be compared item by item."""
        index = self.split_index(k, "eval")
        if len(index) > n:
            rng = np.random.default_rng([self.seed, 7, k, seed])
            index = np.sort(rng.choice(index, size=n, replace=False))
        return self.decode_index(k, index)

    # -- tokens ----------------------------------------------------------------------------------------
    def item_length(self, k: int) -> int:
        """Tokens of an item of `k` steps with its answer."""
        return k + 2 + self.equals

    def prompt_tokens(self, x: np.ndarray, ops: np.ndarray) -> np.ndarray:
        """(n, k + 2): `x a_1 .. a_k =` as token ids (k + 1 without `=`)."""
        n = len(x)
        parts = [
            FIRST_SYMBOL + np.asarray(x).reshape(n, 1),
            FIRST_SYMBOL + self.symbols + np.asarray(ops).reshape(n, -1),
        ]
        return np.concatenate(parts + ([np.full((n, 1), EQ_ID)] if self.equals else []), axis=1).astype(np.int64)

    def item_tokens(self, k: int, split: str) -> np.ndarray:
        """(items, k + 3) uint8: `x a_1 .. a_k = y` of every item of `k` steps in `split` (k + 2 without `=`)."""
        x, ops = self.decode_index(k, self.split_index(k, split))
        y = FIRST_SYMBOL + self.answers(x, ops)
        return np.concatenate([self.prompt_tokens(x, ops), y[:, None]], axis=1).astype(np.uint8)

    def render(self, tokens: list[int] | np.ndarray) -> str:
        """Token ids as text, for reading rows: `3 f1 f0 = 6`."""
        words = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>", EQ_ID: "="}
        out = []
        for t in np.asarray(tokens).tolist():
            if t in words:
                out.append(words[t])
            elif t < FIRST_SYMBOL + self.symbols:
                out.append(str(t - FIRST_SYMBOL))
            else:
                out.append(f"f{t - FIRST_SYMBOL - self.symbols}")
        return " ".join(out)


@dataclass
class PermutationRows:
    """Training rows: BOS, then random items packed whole (loss on answers only), then padding.

    Row i is drawn from (`seed`, i) alone, so rows are identical in every process and for every model;
    a trainer's seed only changes the order it reads them in. `lengths` gives each item's number of
    steps, drawn uniformly."""

    task: PermutationTask
    rows: int
    seq_len: int
    lengths: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    seed: int = 0

    def __post_init__(self) -> None:
        need = 1 + self.task.item_length(max(self.lengths))
        if self.seq_len < need:
            raise LoopcoderError(
                f"seq_len={self.seq_len} cannot hold an item of {max(self.lengths)} steps "
                f"(needs {need} tokens with BOS)"
            )
        if self.rows < 1 or min(self.lengths) < 1:
            raise LoopcoderError("rows and item lengths must be >= 1")
        # every training item of each length, drawn uniformly (so never a held-out one)
        self._items = {k: self.task.item_tokens(k, "train") for k in sorted(set(self.lengths))}

    def __len__(self) -> int:
        return self.rows

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels) of row i."""
        rng = np.random.default_rng([self.seed, int(i)])
        ks = rng.choice(self.lengths, size=self.seq_len // self.task.item_length(min(self.lengths)) + 1)
        ends = 1 + np.cumsum(ks + self.task.item_length(0))
        ks = ks[ends <= self.seq_len]  # whole items only
        pick = (rng.random(len(ks)) * np.array([len(self._items[k]) for k in ks.tolist()])).astype(np.int64)
        ids = np.full(self.seq_len, PAD_ID, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        ids[0] = BOS_ID
        if len(ks):
            body = np.concatenate([self._items[k][j] for k, j in zip(ks.tolist(), pick.tolist())])
            ids[1 : 1 + len(body)] = body
            answers = ends[: len(ks)] - 1  # each item's last token
            labels[answers] = ids[answers]
        return ids, labels

    def get(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        rows = [self.row(i) for i in np.asarray(indices).tolist()]
        return {
            "input_ids": torch.from_numpy(np.stack([r[0] for r in rows])),
            "labels": torch.from_numpy(np.stack([r[1] for r in rows])),
        }
