"""The training engine: one loop for pretraining and instruction tuning (docs/training.md).

    from loopcoder.training import load_config, pretrain, sft

    result = pretrain("tiny", ["model.loops=2", "data.dir=data/stdlib", "out=runs/r2"])
    tuned = sft("tiny", init=result.final_checkpoint, overrides=["out=runs/r2-sft"])
    tuned.final_checkpoint  # a model directory: from_pretrained / loopcoder generate --model

Modules: `config` (typed sections, presets, overrides), `data` (batch sources of the two stages),
`optim` (AdamW + LR schedule), `trainer` (the loop), `checkpoints` (atomic step directories),
`distributed` (torchrun, FSDP2, DDP), `metrics` (JSONL, TensorBoard, progress), `flops` (parameter,
FLOP and memory estimates), `run` (the entry points).

`config` imports no torch (the command line builds its parsers from it), so the names below are
imported on first use rather than here.
"""

from __future__ import annotations

import importlib
from typing import Any

from loopcoder.training.config import TrainConfig, load_config, preset_names

_LAZY = {
    "pretrain": "loopcoder.training.run",
    "sft": "loopcoder.training.run",
    "train": "loopcoder.training.run",
    "NonFiniteLoss": "loopcoder.training.trainer",
    "Trainer": "loopcoder.training.trainer",
    "TrainResult": "loopcoder.training.trainer",
}

__all__ = ["TrainConfig", "load_config", "preset_names", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loopcoder.training' has no attribute {name!r}")
