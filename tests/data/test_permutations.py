"""The depth probe's task: answers against brute force, determinism across processes, held-out items
never trained on, rows packed with loss on answers only."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from loopcoder.data import permutations as P
from loopcoder.utils.errors import LoopcoderError


def brute_force(task: P.PermutationTask, x: int, ops: tuple[int, ...]) -> int:
    """Apply the permutations one at a time, as plain Python lists."""
    tables = [list(map(int, row)) for row in task.perms]
    for a in ops:
        x = tables[a][x]
    return x


def parse_row(task: P.PermutationTask, ids: np.ndarray, labels: np.ndarray):
    """Items (x, ops, answer) of a row, read token by token, and the labelled positions."""
    items, pos = [], 1
    assert ids[0] == P.BOS_ID
    symbol = lambda t: P.FIRST_SYMBOL <= t < P.FIRST_SYMBOL + task.symbols
    while pos < len(ids) and ids[pos] != P.PAD_ID:
        x, pos = int(ids[pos]) - P.FIRST_SYMBOL, pos + 1
        ops = []
        while not symbol(ids[pos]) and ids[pos] != P.EQ_ID:
            ops.append(int(ids[pos]) - P.FIRST_SYMBOL - task.symbols)
            pos += 1
        if task.equals:
            assert ids[pos] == P.EQ_ID
            pos += 1
        items.append((x, tuple(ops), int(ids[pos]) - P.FIRST_SYMBOL, pos))
        pos += 1
    return items


def test_permutations_are_permutations_and_answers_match_brute_force():
    task = P.PermutationTask(symbols=8, functions=4, seed=3)
    assert task.perms.shape == (4, 8)
    assert all(sorted(row) == list(range(8)) for row in task.perms.tolist())
    for k in (1, 2, 3):
        index = np.arange(task.space(k))
        x, ops = task.decode_index(k, index)
        assert np.array_equal(task.item_index(x, ops), index)  # numbering round-trips
        expected = [brute_force(task, xi, tuple(o)) for xi, o in zip(x.tolist(), ops.tolist())]
        assert task.answers(x, ops).tolist() == expected
    # every (x, ops) of length 2 appears exactly once in the enumeration
    x, ops = task.decode_index(2, np.arange(task.space(2)))
    pairs = {(xi, tuple(o)) for xi, o in zip(x.tolist(), ops.tolist())}
    assert pairs == {(xi, o) for xi in range(8) for o in itertools.product(range(4), repeat=2)}


def test_rows_hold_whole_items_with_right_answers_and_labels_only_on_answers():
    for equals in (True, False):
        task = P.PermutationTask(seed=1, equals=equals)
        rows = P.PermutationRows(task, rows=50, seq_len=48, lengths=(1, 2, 3, 5), seed=4)
        batch = rows.get(np.arange(50))
        assert batch["input_ids"].shape == batch["labels"].shape == (50, 48)
        for ids, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy()):
            items = parse_row(task, ids, labels)
            assert items and all(len(ops) in (1, 2, 3, 5) for _, ops, _, _ in items)
            for x, ops, y, at in items:
                assert y == brute_force(task, x, ops)
                assert labels[at] == ids[at]
            labelled = np.flatnonzero(labels != P.IGNORE_INDEX).tolist()
            assert labelled == [at for *_, at in items]  # loss on answers only


def test_held_out_items_are_never_trained_and_splits_partition_the_space():
    task = P.PermutationTask(seed=0, eval_share=0.25)
    for k in (2, 3, 4):
        train, held = set(task.split_index(k, "train").tolist()), set(task.split_index(k, "eval").tolist())
        assert not train & held and len(train | held) == task.space(k)
        assert 0.15 < len(held) / task.space(k) < 0.35
    assert len(task.split_index(1, "eval")) == task.space(1)  # the tables: trained and evaluated
    rows = P.PermutationRows(task, rows=400, seq_len=64, lengths=(2, 3, 4), seed=9)
    batch = rows.get(np.arange(400))
    for ids, labels in zip(batch["input_ids"].numpy(), batch["labels"].numpy()):
        for x, ops, _, _ in parse_row(task, ids, labels):
            index = task.item_index(np.array([x]), np.array([ops]))
            assert not task.held_out(len(ops), index)[0]
    for k in (2, 3, 4, 5):
        x, ops = task.eval_items(k, 100)
        assert task.held_out(k, task.item_index(x, ops)).all()
        assert len({(a, tuple(o)) for a, o in zip(x.tolist(), ops.tolist())}) == len(x)  # distinct
    assert len(task.eval_items(5, 100)[0]) == 100
    assert len(task.eval_items(2, 1000)[0]) == len(task.split_index(2, "eval"))  # all when fewer


def test_the_split_does_not_depend_on_the_seed_of_the_rows_but_on_the_task():
    a, b = P.PermutationTask(seed=0), P.PermutationTask(seed=1)
    assert not np.array_equal(a.perms, b.perms)
    assert not np.array_equal(a.split_index(3, "eval"), b.split_index(3, "eval"))
    assert np.array_equal(a.split_index(3, "eval"), P.PermutationTask(seed=0).split_index(3, "eval"))


_PROBE = """
import json, numpy as np
from loopcoder.data import permutations as P
t = P.PermutationTask(seed=5)
r = P.PermutationRows(t, rows=20, seq_len=40, lengths=(1, 2, 3, 4), seed=2)
x, ops = t.eval_items(4, 30, seed=1)
print(json.dumps({"perms": t.perms.tolist(), "rows": r.get(np.arange(20))["input_ids"].tolist(),
                  "eval": [x.tolist(), ops.tolist()]}))
"""


def test_deterministic_across_processes():
    outs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", _PROBE],
                capture_output=True,
                text=True,
                check=True,
                env={"PYTHONHASHSEED": str(seed), "PATH": ""},
            ).stdout
        )
        for seed in (1, 2)
    ]
    assert outs[0] == outs[1]
    t = P.PermutationTask(seed=5)
    here = P.PermutationRows(t, rows=20, seq_len=40, lengths=(1, 2, 3, 4), seed=2).get(np.arange(20))
    assert here["input_ids"].tolist() == outs[0]["rows"]
    # a row depends on its index alone, not on which rows were asked for with it
    r = P.PermutationRows(t, rows=20, seq_len=40, lengths=(1, 2, 3, 4), seed=2)
    assert r.get(np.array([7]))["input_ids"][0].tolist() == outs[0]["rows"][7]
    other = P.PermutationRows(t, rows=20, seq_len=40, lengths=(1, 2, 3, 4), seed=3).get(np.arange(20))
    assert other["input_ids"].tolist() != outs[0]["rows"]


def test_bad_settings_are_clear_errors():
    with pytest.raises(LoopcoderError, match="symbols"):
        P.PermutationTask(symbols=1)
    with pytest.raises(LoopcoderError, match="eval_share"):
        P.PermutationTask(eval_share=1.0)
    with pytest.raises(LoopcoderError, match="cannot hold"):
        P.PermutationRows(P.PermutationTask(), rows=4, seq_len=8, lengths=(6,))
    with pytest.raises(LoopcoderError, match="too many"):
        P.PermutationTask().eval_items(20, 10)
