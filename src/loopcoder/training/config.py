"""Typed training configuration: sections of dataclasses, YAML files, presets and `key=value` overrides.

A config is built in layers, each one validated key by key (an unknown key is an error that lists the
valid ones, a value of the wrong type is an error that names the key and the type):

    defaults (the dataclasses below) <- preset or YAML file (`base: PRESET` inherits a preset)
        <- its `sft:` block (SFT runs only) <- command-line `section.key=value` overrides

Presets live in `loopcoder/presets/NAME.yaml`. `TrainConfig.validate()` checks the values together.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from loopcoder.model.shape import ModelShape
from loopcoder.utils.errors import LoopcoderError

STAGES = ("pretrain", "sft")


class ConfigKeyError(LoopcoderError):
    """An unknown key, a value of the wrong type or an invalid combination of values."""


# The model shape (pretraining; SFT takes the shape of its --init checkpoint): the `model.*` keys are the
# fields of `loopcoder.model.config.ModelShape`, the one factory of `PLTConfig` that init and the benchmarks use too.
ModelSection = ModelShape


# ----------------------------------------------------------------------------- sections
@dataclass
class DataSection:
    dir: str | None = None  # a data directory from `loopcoder data build` (shards, tokenizer, token bytes)
    seq_len: int | None = None  # None: the data's; pretraining: must divide the shards' row length
    train_split: str = "train"
    validation_split: str = "validation"
    sft_train: list[str] = field(default_factory=list)  # chat JSONL (default DIR/instructions/train.jsonl)
    sft_validation: list[str] = field(default_factory=list)  # (default DIR/instructions/validation.jsonl)
    packing: bool = True  # SFT: pack conversations into rows (else one per row, padded)
    allow_tokenizer_mismatch: bool = False  # train a model on data of another tokenizer (its ids mean other tokens)


@dataclass
class TrainSection:
    steps: int = 300  # optimizer steps
    global_batch_size: int = 16  # sequences per optimizer step, all ranks and micro-batches together
    micro_batch_size: int | None = None  # sequences per rank per forward (None: no accumulation)
    device: str = "auto"  # auto: cuda when available (torchrun: cuda:LOCAL_RANK), else cpu
    precision: str = "auto"  # auto: fp32 on CPU, bf16 autocast on GPU | fp32 | bf16
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer
    attention: str = "sdpa"  # sdpa | flex_attention (block-sparse causal and window masks, compiled on GPU)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    threads: int | None = None  # CPU threads per process (None: runtime.apply_threads's default)


@dataclass
class OptimSection:
    """The published recipe (spec section 2): AdamW, betas (0.9, 0.95), eps 1e-15, weight decay 0.1,
    gradient clip 1.0, peak LR 4e-4."""

    lr: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-15
    weight_decay: float = 0.1  # on matrices (incl. embeddings), not on norms, biases or gate biases
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool | None = None  # None: fused kernels on GPU, foreach on CPU


@dataclass
class ScheduleSection:
    warmup_fraction: float = 0.05
    warmup_steps: int | None = None  # overrides warmup_fraction
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1  # final LR = min_lr_ratio * lr (the paper does not say; 0.1 is common)


@dataclass
class EvalSection:
    every: int = 100  # validation every N steps (0: only at the end)
    max_batches: int | None = None  # None: the whole validation split
    batch_size: int | None = None  # per rank; None: the micro-batch size
    at_end: bool = True


@dataclass
class CheckpointSection:
    every: int = 100  # a checkpoint every N steps (0: only at the end); one is always written at the end
    keep: int = 3  # keep the last k checkpoints (0: keep all)
    max_shard_size: str = "5GB"  # safetensors shard size of the weights


@dataclass
class LoggingSection:
    every: int = 1  # a train metrics record every N steps
    tensorboard: bool = True
    progress: str = "auto"  # auto (bar on a TTY, lines otherwise) | bar | lines | off
    progress_every_s: float = 10.0  # seconds between progress lines when not a TTY
    peak_flops: float | None = None  # peak FLOP/s per device for MFU (None: known GPUs; off on CPU)
    curves: bool = True  # RUN/curves.png (loss, validation, bpb, LR), redrawn at each validation and at the end


@dataclass
class LoraSection:
    """SFT with a LoRA adapter (PEFT) instead of every weight; `r: 0` trains every weight (docs/training.md)."""

    r: int = 0  # the adapter's rank; 0: no adapter (full fine-tuning)
    alpha: float | None = None  # the update is scaled by alpha / r; null: 2 r
    dropout: float = 0.05  # on the adapter's input
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # linear layers, or all-linear


@dataclass
class DistributedSection:
    strategy: str = "auto"  # auto (fsdp when world > 1) | fsdp | ddp
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU
    reshard_after_forward: bool = True  # FSDP2 for decoder layers; see docs/training.md
    timeout_s: int = 1800


@dataclass
class TrainConfig:
    out: str = "runs/train"  # the run directory: config, metrics, checkpoints
    seed: int = 0  # model init, data order
    stage: str = "pretrain"  # pretrain | sft (set by the command)
    init: str | None = None  # SFT: the model to start from (a model directory or a run directory)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    lora: LoraSection = field(default_factory=LoraSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def validate(self) -> TrainConfig:
        """Check values together; raise `ConfigKeyError` naming the key."""
        validate(self)
        return self

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(micro-batch per rank, micro-steps per optimizer step) for `world_size` ranks."""
        g = self.train.global_batch_size
        if g % world_size:
            raise ConfigKeyError(f"train.global_batch_size={g} is not divisible by the {world_size} ranks")
        micro = self.train.micro_batch_size or g // world_size
        if (g // world_size) % micro:
            raise ConfigKeyError(
                f"train.global_batch_size={g} is not a multiple of train.micro_batch_size={micro} x {world_size} ranks"
            )
        return micro, g // world_size // micro

    def warmup_steps(self) -> int:
        s = self.schedule
        if s.warmup_steps is not None:
            return s.warmup_steps
        return round(s.warmup_fraction * self.train.steps)


SECTIONS: dict[str, type] = {
    name: typing.get_type_hints(TrainConfig)[name]
    for name in ("model", "data", "train", "optim", "schedule", "eval", "checkpoint", "logging", "lora", "distributed")
}
SCALARS = ("out", "seed", "stage", "init")


def valid_keys(section: str | None = None) -> list[str]:
    """Every dotted key (or those of one section)."""
    if section is not None:
        return [f"{section}.{f.name}" for f in dataclasses.fields(SECTIONS[section])]
    return [*SCALARS, *(k for s in SECTIONS for k in valid_keys(s))]


def nearest_key(key: str) -> str | None:
    """The known key a mistyped one most likely means: the section's field of that name (`loops` is
    `model.loops`), else the closest spelling (difflib)."""
    keys = valid_keys()
    same_name = [k for k in keys if k.rpartition(".")[2] == key.rpartition(".")[2]]
    if len(same_name) == 1:
        return same_name[0]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown(where: str, key: str, known: str, what: str | None = None) -> ConfigKeyError:
    close = nearest_key(key)
    guess = f"did you mean {close}? " if close else ""
    return ConfigKeyError(f"{where}: {what or f'unknown key {key!r}'}; {guess}{known}")


# ----------------------------------------------------------------------------- values and types
def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (int, float, bool, str, X | None, list[X]); `ConfigKeyError` if it is not one.

    Lenient only where YAML is surprising: "3e-4" (a string to YAML 1.1) is a float, an int is a float.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigKeyError:
                pass
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str) and args[0] is str:  # a single path for a list of paths
            return [value]
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare `off` / `on` as a bool
            return "on" if value else "off"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigKeyError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _apply(cfg: TrainConfig, mapping: dict[str, Any], where: str) -> None:
    """Set every key of a nested mapping ({section: {key: value}} or top-level scalars) on `cfg`."""
    if not isinstance(mapping, dict):
        raise ConfigKeyError(f"{where}: expected a mapping of sections, got {type(mapping).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    for name, value in mapping.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigKeyError(f"{where}: section {name!r} must be a mapping of keys")
            for key, v in value.items():
                set_key(cfg, f"{name}.{key}", v, where)
        elif name in SCALARS:
            setattr(cfg, name, coerce(value, hints[name], name))
        else:
            raise _unknown(where, name, f"valid top-level keys: {', '.join([*SCALARS, *SECTIONS])}")


def set_key(cfg: TrainConfig, key: str, value: Any, where: str = "override") -> None:
    """Set one dotted key, type-checked."""
    if "." not in key:
        if key in SCALARS:
            setattr(cfg, key, coerce(value, typing.get_type_hints(TrainConfig)[key], key))
            return
        if key in SECTIONS:
            raise ConfigKeyError(
                f"{where}: {key!r} is a section; set its keys as {key}.KEY=VALUE ({', '.join(valid_keys(key))})"
            )
        raise _unknown(where, key, f"top-level keys: {', '.join(SCALARS)}; sections: {', '.join(SECTIONS)}")
    section, name = key.split(".", 1)
    if section not in SECTIONS:
        raise _unknown(
            where,
            key,
            f"sections: {', '.join(SECTIONS)} (and top-level keys {', '.join(SCALARS)})",
            f"unknown section {section!r} in {key!r}",
        )
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise _unknown(where, key, f"valid keys of {section}: {', '.join(valid_keys(section))}")
    setattr(getattr(cfg, section), name, coerce(value, hints[name], key))


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' -> ('optim.lr', 3e-4); the value is read as YAML ('[0.9, 0.95]', 'null', 'true')."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigKeyError(f"override {text!r} is not KEY=VALUE (e.g. optim.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # `progress=off` is the word off; a bool field still accepts it (coerce)
    return key.strip(), value


LORA_DEFAULT_RANK = 16  # `--lora` without r=


def lora_overrides(spec: str) -> list[str]:
    """`sft --lora SPEC` as `lora.*` overrides: 'r=16,alpha=32,dropout=0.05,targets=q_proj,v_proj' (a name
    without `=` continues the targets; a bare number is r; r defaults to 16)."""
    values: dict[str, list[str]] = {}
    key = None
    for i, item in enumerate(p.strip() for p in spec.split(",")):
        name, sep, value = item.partition("=")
        if sep:
            key = name.strip()
            if key not in ("r", "alpha", "dropout", "targets"):
                raise ConfigKeyError(f"--lora {spec!r}: unknown setting {key!r} (r, alpha, dropout, targets)")
            if key in values:
                raise ConfigKeyError(f"--lora {spec!r}: {key} is given twice")
            values[key] = [value.strip()]
        elif i == 0 and item.isdigit():
            key, values["r"] = "r", [item]
        elif key == "targets" and item:
            values[key].append(item)
        else:
            raise ConfigKeyError(
                f"--lora {spec!r}: {item!r} is not KEY=VALUE (e.g. r=16,alpha=32,dropout=0.05,targets=q_proj,v_proj)"
            )
    values.setdefault("r", [str(LORA_DEFAULT_RANK)])
    return [f"lora.{k}=[{', '.join(v)}]" if k == "targets" else f"lora.{k}={v[0]}" for k, v in values.items()]


# ----------------------------------------------------------------------------- files and presets
def preset_names() -> list[str]:
    root = resources.files("loopcoder") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: Path | Any, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigKeyError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigKeyError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    return data


def read_preset(name: str) -> dict[str, Any]:
    f = resources.files("loopcoder") / "presets" / f"{name}.yaml"
    if not f.is_file():
        raise ConfigKeyError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return _read_yaml(f, f"preset {name}")


def read_config_source(source: str) -> tuple[dict[str, Any], str]:
    """A YAML file's mapping (with its `base:` preset merged under it), or a preset's by name."""
    p = Path(source)
    if p.is_file():
        data, where = _read_yaml(p, str(p)), str(p)
    elif source in preset_names():
        data, where = read_preset(source), f"preset {source}"
    else:
        raise ConfigKeyError(f"--config {source!r} is neither a file nor a preset ({', '.join(preset_names())})")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigKeyError(f"{where}: base must be a preset name")
        data = _merge(read_config_source(base)[0], data)
    return data, where


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    source: str | dict[str, Any] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    stage: str = "pretrain",
    extra: dict[str, Any] | None = None,
) -> TrainConfig:
    """Build a validated `TrainConfig`.

    `source`: a preset name, a YAML path or a mapping of sections (None: the defaults). Its `sft:`
    block is applied for `stage="sft"`. `overrides`: ["optim.lr=3e-4", ...] or {"optim.lr": 3e-4};
    `extra`: more {key: value} applied last (what command-line flags such as --init set).
    """
    if stage not in STAGES:
        raise ConfigKeyError(f"stage {stage!r}: choose from {', '.join(STAGES)}")
    cfg = TrainConfig()
    data, where = (
        ({}, "defaults")
        if source is None
        else ((dict(source), "config") if isinstance(source, dict) else read_config_source(source))
    )
    sft_block = data.pop("sft", None) or {}
    _apply(cfg, data, where)
    if stage == "sft":
        _apply(cfg, sft_block, f"{where} (sft block)")
    cfg.stage = stage
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in [*items, *(extra or {}).items()]:
        set_key(cfg, key, value)
    return cfg.validate()


# ----------------------------------------------------------------------------- validation
def validate(cfg: TrainConfig) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            section, _, name = key.partition(".")
            value = getattr(getattr(cfg, section), name) if name else getattr(cfg, section)
            raise ConfigKeyError(f"{key}={value!r}: {why}")

    m, t, o, s = cfg.model, cfg.train, cfg.optim, cfg.schedule
    need(cfg.stage in STAGES, "stage", f"choose from {', '.join(STAGES)}")
    for key in (
        "model.loops",
        "model.hidden_size",
        "model.layers",
        "model.heads",
        "train.steps",
        "train.global_batch_size",
    ):
        sec, name = key.split(".")
        need(getattr(getattr(cfg, sec), name) >= 1, key, "must be >= 1")
    for key in (
        "model.kv_heads",
        "model.head_dim",
        "model.intermediate_size",
        "model.vocab_size",
        "model.max_position_embeddings",
        "data.seq_len",
        "train.micro_batch_size",
        "train.threads",
        "eval.max_batches",
        "eval.batch_size",
    ):
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        need(v is None or v >= 1, key, "must be >= 1 (or null)")
    need(
        m.head_dim is not None or m.hidden_size % m.heads == 0,
        "model.hidden_size",
        f"must be divisible by model.heads={m.heads} (or set model.head_dim)",
    )
    need(m.kv_heads is None or m.heads % m.kv_heads == 0, "model.kv_heads", f"must divide model.heads={m.heads}")
    need(m.window >= 0, "model.window", "must be >= 0")
    need(m.architecture in ("plt", "vanilla"), "model.architecture", "choose from plt, vanilla")
    need(
        t.device == "auto" or t.device.split(":")[0] in ("cpu", "cuda"),
        "train.device",
        "choose auto, cpu, cuda or cuda:N",
    )
    need(t.precision in ("auto", "fp32", "bf16"), "train.precision", "choose from auto, fp32, bf16")
    need(t.attention in ("sdpa", "flex_attention"), "train.attention", "choose from sdpa, flex_attention")
    need(o.lr > 0, "optim.lr", "must be > 0")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)")
    need(o.eps > 0, "optim.eps", "must be > 0")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    need(0 <= s.warmup_fraction < 1, "schedule.warmup_fraction", "must be in [0, 1)")
    need(
        s.warmup_steps is None or 0 <= s.warmup_steps < t.steps,
        "schedule.warmup_steps",
        f"must be in [0, train.steps={t.steps})",
    )
    need(s.decay in ("cosine", "linear", "constant"), "schedule.decay", "choose from cosine, linear, constant")
    need(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be in [0, 1]")
    need(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    need(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    need(cfg.checkpoint.keep >= 0, "checkpoint.keep", "must be >= 0")
    need(cfg.logging.every >= 1, "logging.every", "must be >= 1")
    need(
        cfg.logging.progress in ("auto", "bar", "lines", "off"), "logging.progress", "choose from auto, bar, lines, off"
    )
    need(cfg.logging.peak_flops is None or cfg.logging.peak_flops > 0, "logging.peak_flops", "must be > 0")
    d = cfg.distributed
    need(d.strategy in ("auto", "fsdp", "ddp"), "distributed.strategy", "choose from auto, fsdp, ddp")
    need(d.backend in ("auto", "gloo", "nccl"), "distributed.backend", "choose from auto, gloo, nccl")
    need(d.timeout_s >= 1, "distributed.timeout_s", "must be >= 1")
    micro = t.micro_batch_size
    need(
        micro is None or t.global_batch_size % micro == 0,
        "train.micro_batch_size",
        f"must divide train.global_batch_size={t.global_batch_size}",
    )
    need(bool(cfg.out), "out", "must be a directory path")
    lo = cfg.lora
    need(lo.r >= 0, "lora.r", "must be >= 0 (0: no adapter)")
    need(lo.alpha is None or lo.alpha > 0, "lora.alpha", "must be > 0 (or null: 2 r)")
    need(0 <= lo.dropout < 1, "lora.dropout", "must be in [0, 1)")
    need(not lo.r or cfg.stage == "sft", "lora.r", "LoRA adapts an existing model: use it with `loopcoder sft --init`")
    if cfg.stage == "sft":
        need(cfg.init is not None, "init", "SFT needs a model to start from (--init CHECKPOINT)")
