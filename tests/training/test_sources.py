"""Training on a given batch source (the depth probe's permutation rows) through the training engine."""

from __future__ import annotations

import json

import pytest

from loopcoder.data.permutations import PermutationTask
from loopcoder.training import pretrain, train
from loopcoder.training.config import TrainConfig
from loopcoder.training.data import permutation_source
from loopcoder.training.run import prepare
from loopcoder.utils.errors import LoopcoderError


def _config(out, **model) -> TrainConfig:
    cfg = TrainConfig(out=str(out), seed=0)
    cfg.model.hidden_size, cfg.model.layers, cfg.model.heads, cfg.model.intermediate_size = 16, 1, 2, 32
    for key, value in model.items():
        setattr(cfg.model, key, value)
    cfg.train.steps, cfg.train.global_batch_size, cfg.train.threads, cfg.train.device = 4, 4, 1, "cpu"
    cfg.eval.every, cfg.checkpoint.every = 2, 0
    cfg.logging.tensorboard, cfg.logging.progress = False, "off"
    return cfg


def test_pretrain_on_permutation_rows_learns_only_answers_and_saves_the_ablation(tmp_path):
    task = PermutationTask()
    source = permutation_source(task, rows=16, seq_len=24, lengths=(1, 2), seed=0, validation_rows=4)
    r = pretrain(_config(tmp_path / "run", loops=2, loop_offset=False), source=source)
    assert r.step == 4 and r.val_loss is not None
    config = json.loads((r.final_checkpoint / "config.json").read_text())
    assert config["plt_num_loops"] == 2 and config["plt_loop_offset"] is False
    assert config["vocab_size"] >= task.vocab_size
    # validation counts one target per item: the answers, not every token
    val = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [v for v in val if v["kind"] == "val"]
    rows = source.validation.get(list(range(4)))
    answers = int((rows["labels"] != -100).sum())
    assert val[-1]["val_tokens"] == answers and answers < rows["input_ids"].numel() / 3


def test_a_source_is_for_pretraining_only(tmp_path):
    source = permutation_source(PermutationTask(), rows=8, seq_len=24, lengths=(1,))
    with pytest.raises(LoopcoderError, match="pretraining"):
        train(prepare(_config(tmp_path / "sft"), None, "sft", init=tmp_path / "missing"), source=source)
