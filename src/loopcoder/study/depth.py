"""The depth probe's work: train one (model, seed) run, evaluate it by number of steps, diagnose it.

Training goes through the project's training engine (`loopcoder.training.pretrain` with the task's
batch source), one run per process of a pool: the models are tiny, so two one-thread runs side by side
use two cores better than one run with two threads (docs/study.md). Evaluation asks each model for the
answer of every held-out item at the `=` position (greedy over the whole vocabulary, one forward per
batch of items of one length), the same items for every model and seed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopcoder.data.permutations import BOS_ID, FIRST_SYMBOL, PAD_ID, PermutationRows, PermutationTask
from loopcoder.study.presets import DepthModel, DepthSettings
from loopcoder.training import pretrain
from loopcoder.training.data import permutation_source
from loopcoder.utils.errors import LoopcoderError

DIAG_ROWS_SEED = 1_000_003  # the diagnostics' rows: drawn apart from every run's training rows


def task_of(s: DepthSettings) -> PermutationTask:
    return PermutationTask(s.symbols, s.functions, s.task_seed, s.eval_share, s.equals)


def train_run(s: DepthSettings, model: DepthModel, seed: int, out: str, device: str = "auto") -> dict[str, Any]:
    """Train one run (resuming one that was interrupted). Runs in a worker process."""
    cfg = s.train_config(model, seed, out, device)
    source = permutation_source(
        task_of(s),
        cfg.train.steps * cfg.train.global_batch_size,
        s.seq_len,
        s.train_lengths,
        seed=seed,
        validation_rows=s.validation_rows,
    )
    cpu0, wall0 = time.process_time(), time.perf_counter()
    r = pretrain(cfg, resume=True, source=source)
    if r.final_checkpoint is None:
        raise LoopcoderError(f"training in {out} produced no checkpoint")
    return {
        "final_checkpoint": str(r.final_checkpoint),
        "run_dir": out,
        "step": r.step,
        "train_loss": r.train_loss,
        "val_loss": r.val_loss,
        "train_s": r.train_s,
        "cpu_s": time.process_time() - cpu0,
        "wall_s": time.perf_counter() - wall0,
        "threads": cfg.train.threads,
    }


@torch.inference_mode()
def evaluate(model: Any, task: PermutationTask, lengths: tuple[int, ...], n: int) -> dict[str, Any]:
    """Per k: each held-out item's correctness (the greedy token after the prompt, `=` or a_k) and the
    answer's NLL, in the fixed item order of `task.eval_items`."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, Any] = {}
    for k in lengths:
        x, ops = task.eval_items(k, n)
        prompts = np.concatenate([np.full((len(x), 1), BOS_ID), task.prompt_tokens(x, ops)], axis=1)
        logits = model(input_ids=torch.from_numpy(prompts).to(device)).logits[:, -1].float()
        target = torch.from_numpy(FIRST_SYMBOL + task.answers(x, ops)).to(device)
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        out[str(k)] = {
            "correct": (logits.argmax(-1) == target).int().tolist(),
            "answer_nll": [round(v, 5) for v in nll.tolist()],
        }
    return out


def diagnostic_rows(s: DepthSettings) -> list[torch.Tensor]:
    """Packed rows of training-split items (padding cut off), the same for every model."""
    rows = PermutationRows(task_of(s), s.diag_samples, s.seq_len, s.train_lengths, seed=DIAG_ROWS_SEED)
    ids = rows.get(np.arange(s.diag_samples))["input_ids"]
    return [row[: int((row != PAD_ID).nonzero().max()) + 1] for row in ids]


def model_path(results: dict[str, Any], model: DepthModel, seed: int) -> Path:
    return Path(results[f"depth-{model.key}-s{seed}"]["final_checkpoint"])
