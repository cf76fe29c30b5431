"""Study presets: everything that is matched across loop counts, in one place.

Only `loops` differs between the models of a study: the same data in the same order, the same steps
and seed, the same parameter count (the layers are shared across loops; a PLT model with R >= 2 adds
one small gate per layer), the same instruction tuning and the same evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loopcoder.errors import LoopcoderError


@dataclass
class StudyPreset:
    name: str
    loops: tuple[int, ...] = (1, 2, 3)
    source: str = "stdlib"  # the code corpus (`loopcoder data build --source`)
    vocab_size: int = 4096
    build_seq_len: int = 512
    # the synthetic reasoning task where depth should matter (loopcoder.data.reasoning)
    family: str = "chains"
    reasoning_steps: str = "1-6"
    pretrain_reasoning: int = 12000  # train-split programs mixed into the pretraining corpus
    sft_reasoning: int = 3000  # train-split programs as chat examples in instruction tuning
    instruction_max_tokens: int | None = 256  # built-in instruction records must fit the SFT rows
    # training: the training preset plus overrides (dotted keys of `loopcoder train`)
    train_preset: str = "tiny"
    pretrain: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    # evaluation
    eval_reasoning_n: int = 60  # held-out programs per difficulty
    eval_steps: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    humaneval_limit: int | None = None  # None: all 164
    humaneval_max_new_tokens: int = 128
    bpb_rows: int | None = 64
    batch_size: int = 32
    # diagnostics and cost
    diag_samples: int = 48
    diag_seq_len: int = 256
    decode_context: int = 256
    decode_batches: tuple[int, ...] = (1, 8)
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, StudyPreset] = {
    # Minutes on a 2-core CPU: `make demo`. Pretraining is the `tiny` training preset (hidden 128, 4 layers,
    # 256-token rows, batch 8) for 300 steps; the three pretraining runs cost 1 + 2 + 3 units of compute.
    "tiny": StudyPreset(
        name="tiny",
        pretrain={"train.steps": 300, "train.threads": 2, "checkpoint.every": 150, "eval.every": 100,
                  "eval.max_batches": 16, "logging.progress": "lines", "logging.progress_every_s": 20},
        sft={"train.steps": 100, "train.threads": 2, "checkpoint.every": 50, "eval.every": 0,
             "eval.max_batches": 8, "logging.progress": "lines", "logging.progress_every_s": 20},
    ),
    # One GPU, with a real corpus given by --source: the `small` training preset (12 layers x 768, ~110M
    # parameters), 5000 steps of 64 x 1024 tokens (~330M tokens) per loop count. Not run yet: about an
    # hour is an estimate.
    "small": StudyPreset(
        name="small", train_preset="small", vocab_size=16384, build_seq_len=1024, instruction_max_tokens=1024,
        pretrain_reasoning=200000, sft_reasoning=20000, reasoning_steps="1-8", eval_steps=(1, 2, 3, 4, 5, 6, 7, 8),
        eval_reasoning_n=200, humaneval_max_new_tokens=384, bpb_rows=None, batch_size=64, diag_samples=500,
        diag_seq_len=1024, decode_context=1024, decode_batches=(1, 32),
        pretrain={"logging.progress": "lines"}, sft={"logging.progress": "lines"},
    ),
    # Seconds: the test suite's end-to-end run of every stage (give it a small --source).
    "smoke": StudyPreset(
        name="smoke", vocab_size=320, build_seq_len=128, reasoning_steps="1-3", pretrain_reasoning=300,
        sft_reasoning=100, instruction_max_tokens=512, eval_reasoning_n=6, eval_steps=(1, 2), humaneval_limit=2,
        humaneval_max_new_tokens=8, bpb_rows=4, batch_size=8, diag_samples=3, diag_seq_len=32, decode_context=32,
        decode_batches=(1, 2),
        pretrain={"train.steps": 6, "train.global_batch_size": 4, "data.seq_len": 64, "model.hidden_size": 32,
                  "model.layers": 2, "model.heads": 4, "model.kv_heads": 2, "model.window": 8, "eval.every": 3,
                  "eval.max_batches": 2, "checkpoint.every": 3, "logging.progress": "off"},
        sft={"train.steps": 4, "train.global_batch_size": 4, "data.seq_len": 128, "eval.every": 0,
             "eval.max_batches": 2, "checkpoint.every": 2, "logging.progress": "off"},
    ),
}


def get_preset(name: str, **overrides: Any) -> StudyPreset:
    if name not in PRESETS:
        raise LoopcoderError(f"unknown study preset {name!r}: choose from {', '.join(PRESETS)}")
    import copy

    preset = copy.deepcopy(PRESETS[name])
    for key, value in overrides.items():
        if value is None:
            continue
        if not hasattr(preset, key):
            raise LoopcoderError(f"unknown study setting {key!r}")
        setattr(preset, key, value)
    if not preset.loops or any(r < 1 for r in preset.loops):
        raise LoopcoderError(f"--loops must be integers >= 1, got {preset.loops}")
    if 1 not in preset.loops:
        preset.loops = (1, *preset.loops)  # the non-looped baseline is always part of a study
    preset.loops = tuple(sorted(set(preset.loops)))
    return preset
