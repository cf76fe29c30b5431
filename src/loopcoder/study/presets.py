"""Study presets as typed Python: `TrainConfig` objects and dataclasses, checked when they are built.

Two parts, each matched across the models it compares:
- the depth probe (`DepthSettings`): R = 1, PLT-2, PLT-3 and the two controls on the permutation task,
  several seeds each, everything but the loop architecture identical (docs/study.md);
- the code language model (`loops`, `pretrain`, `sft`): pretraining on a code corpus and instruction
  tuning at each loop count in `loops`, then bits per byte, HumanEval and the loop diagnostics.
Either part can be left out (`depth=None`, `loops=()`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from loopcoder.training import config as C
from loopcoder.training.config import TrainConfig, load_config
from loopcoder.utils.errors import LoopcoderError


@dataclass(frozen=True)
class DepthModel:
    """One architecture of the depth probe; everything else is shared."""

    name: str  # for tables: "PLT-2"
    loops: int
    architecture: str = "plt"  # plt | vanilla
    loop_offset: bool = True  # False: PLT without CLP's one-position shift (the ablation)

    @property
    def key(self) -> str:
        """For file and stage names: r1, plt2, plt2-no-offset, vanilla2."""
        if self.loops == 1:
            return "r1"
        if self.architecture == "vanilla":
            return f"vanilla{self.loops}"
        return f"plt{self.loops}" + ("" if self.loop_offset else "-no-offset")

    @property
    def single_pass(self) -> bool:
        """Whether the engine decodes all loops of a token in one pass."""
        return self.loops == 1 or (self.architecture == "plt" and self.loop_offset)


R1 = DepthModel("R=1", 1)
PLT2 = DepthModel("PLT-2", 2)
PLT3 = DepthModel("PLT-3", 3)
PLT2_NO_OFFSET = DepthModel("PLT-2 no offset", 2, loop_offset=False)
PLT3_NO_OFFSET = DepthModel("PLT-3 no offset", 3, loop_offset=False)
VANILLA2 = DepthModel("vanilla-2", 2, architecture="vanilla")
VANILLA3 = DepthModel("vanilla-3", 3, architecture="vanilla")
ALL_DEPTH_MODELS = (R1, PLT2, PLT3, PLT2_NO_OFFSET, PLT3_NO_OFFSET, VANILLA2, VANILLA3)


@dataclass
class DepthSettings:
    """The depth probe: the task (`loopcoder.data.permutations`), the models, seeds and training."""

    models: tuple[DepthModel, ...] = ALL_DEPTH_MODELS
    seeds: tuple[int, ...] = (0, 1, 2)  # each seed: model init, training rows and their order
    # the task: N symbols, F permutations drawn from task_seed, a share of each k >= 2 held out
    symbols: int = 8
    functions: int = 4
    task_seed: int = 0
    eval_share: float = 0.25
    equals: bool = False  # items `x a_1 .. a_k y` (True: `x a_1 .. a_k = y`; docs/study.md says why not)
    train_lengths: tuple[int, ...] = (1, 2, 3, 4, 5, 6)  # steps per training item, uniform
    eval_lengths: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    eval_items: int = 400  # held-out items per k (all of them where there are fewer)
    seq_len: int = 64  # tokens per training row (BOS + whole items + padding)
    validation_rows: int = 64  # training-split rows for the validation curve
    # training: everything but model.loops / architecture / loop_offset, seed and out
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            model=C.ModelSection(hidden_size=64, layers=1, heads=4, intermediate_size=192, window=16),
            train=C.TrainSection(steps=2000, global_batch_size=16, threads=1),
            optim=C.OptimSection(lr=1e-2),
            eval=C.EvalSection(every=250, batch_size=64),
            checkpoint=C.CheckpointSection(every=0, keep=1),
            logging=C.LoggingSection(every=10, tensorboard=False, progress="off"),
        )
    )
    # cost and diagnostics
    decode_context: int = 256  # prompt tokens before the timed decode steps
    decode_steps: int = 16  # timed steps per round (median)
    decode_rounds: int = 5  # the models take turns this many times
    diag_samples: int = 32  # rows per model for the loop diagnostics

    def __post_init__(self) -> None:
        if not self.models or not self.seeds:
            raise LoopcoderError("the depth probe needs at least one model and one seed")
        if len({m.key for m in self.models}) != len(self.models):
            raise LoopcoderError("the depth probe's models must differ")

    def train_config(self, model: DepthModel, seed: int, out: str, device: str = "auto") -> TrainConfig:
        cfg = copy.deepcopy(self.train)
        cfg.model = replace(
            cfg.model, loops=model.loops, architecture=model.architecture, loop_offset=model.loop_offset
        )
        cfg.seed, cfg.out = seed, out
        if device != "auto":
            cfg.train = replace(cfg.train, device=device)
        return cfg.validate()


@dataclass
class StudyPreset:
    name: str
    depth: DepthSettings | None = None
    # the code language model: loop counts (empty: no code part), corpus, pretraining and SFT
    loops: tuple[int, ...] = (1, 2)
    source: str = "stdlib"  # the code corpus (`loopcoder data build --source`)
    vocab_size: int = 4096
    build_seq_len: int = 512
    instruction_max_tokens: int | None = 256  # built-in instruction records must fit the SFT rows
    pretrain: TrainConfig = field(default_factory=lambda: load_config("tiny"))
    sft: TrainConfig = field(default_factory=lambda: _sft_config("tiny"))
    # the synthetic code-reasoning programs (loopcoder.data.reasoning): mixed into pretraining and SFT,
    # evaluated by number of dependent steps; 0 programs / no steps leaves them out
    family: str = "chains"
    reasoning_steps: str = "1-6"
    pretrain_reasoning: int = 0
    sft_reasoning: int = 0
    eval_reasoning_n: int = 0  # held-out programs per difficulty
    eval_steps: tuple[int, ...] = ()
    # evaluation
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
    workers: int | None = None  # training runs at a time, in a process pool (None: one per CPU; docs/study.md)

    def pool_size(self) -> int:
        if self.workers is not None and self.workers < 1:
            raise LoopcoderError(f"workers must be >= 1, got {self.workers}")
        return self.workers or max(1, os.cpu_count() or 1)

    @property
    def reasoning(self) -> bool:
        return bool(self.eval_steps and self.eval_reasoning_n)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sft_config(preset: str) -> TrainConfig:
    """A training preset with its `sft:` block. `init` stands for the pretrained model, which the study
    sets per loop count."""
    return load_config(preset, stage="sft", extra={"init": "pretrain-R"})


def _train(cfg: TrainConfig, **sections: dict[str, Any]) -> TrainConfig:
    """`cfg` with some fields of some sections replaced: `_train(cfg, train={"steps": 300})`. An unknown
    section or field is a TypeError when the preset is built, not when a stage runs."""
    out = copy.deepcopy(cfg)
    for name, values in sections.items():
        setattr(out, name, replace(getattr(out, name), **values))
    return out.validate()


def _tiny() -> StudyPreset:
    """`make demo`: minutes on a 2-core CPU (docs/study.md has the measured times)."""
    # one thread per run: the study trains its runs side by side (docs/study.md); it reports each one
    quiet = {"progress": "off"}
    pretrain = _train(
        load_config("tiny"),
        train={"steps": 200, "threads": 1},
        checkpoint={"every": 100},
        eval={"every": 50, "max_batches": 16},
        logging=quiet,
    )
    sft = _train(
        _sft_config("tiny"),
        train={"steps": 40, "threads": 1},
        checkpoint={"every": 20},
        eval={"every": 0, "max_batches": 8},
        logging=quiet,
    )
    depth = DepthSettings(models=(R1, PLT2, PLT3, PLT2_NO_OFFSET, VANILLA2))
    return StudyPreset(
        name="tiny",
        depth=depth,
        loops=(1, 2),
        pretrain=pretrain,
        sft=sft,
        humaneval_limit=8,
        humaneval_max_new_tokens=96,
        diag_samples=32,
    )


def _full() -> StudyPreset:
    """`tiny` with all seven depth models (the R = 3 controls too) and five seeds. Run into the same
    directory after `make demo`, it trains only what the demo did not (docs/study.md has the time)."""
    preset = _tiny()
    preset.name = "full"
    preset.depth = replace(preset.depth, models=ALL_DEPTH_MODELS, seeds=(0, 1, 2, 3, 4))
    return preset


def _small() -> StudyPreset:
    """One GPU, with a real corpus given by --source: the `small` training preset (12 layers x 768, ~110M
    parameters), 5000 steps of 64 x 1024 tokens (~330M tokens) per loop count. Not run yet: about an hour
    is an estimate."""
    lines = {"progress": "lines"}
    return StudyPreset(
        name="small",
        loops=(1, 2, 3),
        vocab_size=16384,
        build_seq_len=1024,
        instruction_max_tokens=1024,
        pretrain=_train(load_config("small"), logging=lines),
        sft=_train(_sft_config("small"), logging=lines),
        pretrain_reasoning=200000,
        sft_reasoning=20000,
        reasoning_steps="1-8",
        eval_steps=(1, 2, 3, 4, 5, 6, 7, 8),
        eval_reasoning_n=200,
        humaneval_max_new_tokens=384,
        bpb_rows=None,
        batch_size=64,
        diag_samples=500,
        diag_seq_len=1024,
        decode_context=1024,
        decode_batches=(1, 32),
        depth=DepthSettings(seeds=(0, 1, 2, 3, 4)),
        workers=1,
    )


def _smoke() -> StudyPreset:
    """Seconds: the test suite's end-to-end run of every stage (give it a small --source)."""
    quiet = {"progress": "off", "tensorboard": False}
    shape = {"hidden_size": 32, "layers": 2, "heads": 4, "kv_heads": 2, "window": 8}
    pretrain = _train(
        load_config("tiny"),
        model=shape,
        data={"seq_len": 64},
        train={"steps": 6, "global_batch_size": 4, "threads": 1},
        eval={"every": 3, "max_batches": 2},
        checkpoint={"every": 3},
        logging=quiet,
    )
    sft = _train(
        _sft_config("tiny"),
        data={"seq_len": 128},
        train={"steps": 4, "global_batch_size": 4, "threads": 1},
        eval={"every": 0, "max_batches": 2},
        checkpoint={"every": 2},
        logging=quiet,
    )
    depth_train = _train(
        DepthSettings().train,
        model={"hidden_size": 16, "heads": 2, "intermediate_size": 32},
        train={"steps": 8, "global_batch_size": 4},
        eval={"every": 4},
    )
    depth = DepthSettings(
        models=(R1, PLT2, PLT2_NO_OFFSET, VANILLA2),
        seeds=(0, 1),
        train=depth_train,
        train_lengths=(1, 2, 3),
        eval_lengths=(1, 2, 3),
        eval_items=12,
        seq_len=16,
        validation_rows=4,
        decode_context=8,
        decode_steps=2,
        decode_rounds=2,
        diag_samples=2,
    )
    return StudyPreset(
        name="smoke",
        depth=depth,
        loops=(1, 2, 3),
        vocab_size=320,
        build_seq_len=128,
        reasoning_steps="1-3",
        pretrain_reasoning=300,
        sft_reasoning=100,
        instruction_max_tokens=512,
        eval_reasoning_n=6,
        eval_steps=(1, 2),
        humaneval_limit=2,
        humaneval_max_new_tokens=8,
        bpb_rows=4,
        batch_size=8,
        diag_samples=3,
        diag_seq_len=32,
        decode_context=32,
        decode_batches=(1, 2),
        pretrain=pretrain,
        sft=sft,
    )


PRESETS: dict[str, Callable[[], StudyPreset]] = {"tiny": _tiny, "full": _full, "small": _small, "smoke": _smoke}


def get_preset(name: str, **overrides: Any) -> StudyPreset:
    if name not in PRESETS:
        raise LoopcoderError(f"unknown study preset {name!r}: choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]()
    for key, value in overrides.items():
        if value is None:
            continue
        if not hasattr(preset, key):
            raise LoopcoderError(f"unknown study setting {key!r}")
        setattr(preset, key, value)
    if any(r < 1 for r in preset.loops):
        raise LoopcoderError(f"--loops must be integers >= 1, got {preset.loops}")
    if preset.loops and 1 not in preset.loops:
        preset.loops = (1, *preset.loops)  # the non-looped baseline is always part of a study
    preset.loops = tuple(sorted(set(preset.loops)))
    if not preset.loops and preset.depth is None:
        raise LoopcoderError(f"study preset {name!r} has neither a code part nor a depth probe")
    return preset
