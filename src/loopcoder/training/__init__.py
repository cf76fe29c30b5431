"""The training engine: one loop for pretraining and instruction tuning (docs/training.md).

    from loopcoder.training import load_config, pretrain, sft

    result = pretrain("tiny", ["model.loops=2", "data.dir=data/stdlib", "out=runs/r2"])
    tuned = sft("tiny", init=result.final_checkpoint, overrides=["out=runs/r2-sft"])
    tuned.final_checkpoint  # a model directory: from_pretrained / loopcoder generate --model

Modules: `config` (typed sections, presets, overrides), `data` (batch sources of the two stages),
`optim` (AdamW + LR schedule), `trainer` (the loop), `checkpoints` (atomic step directories),
`distributed` (torchrun, FSDP2, DDP), `metrics` (JSONL, TensorBoard, progress), `flops` (parameter,
FLOP and memory estimates), `run` (the entry points).
"""

from loopcoder.training.config import TrainConfig, load_config, preset_names
from loopcoder.training.run import pretrain, sft, train
from loopcoder.training.trainer import NonFiniteLoss, Trainer, TrainResult

__all__ = [
    "NonFiniteLoss",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_config",
    "preset_names",
    "pretrain",
    "sft",
    "train",
]
