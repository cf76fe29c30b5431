"""LoRA adapters through PEFT: attach to a model, save and read an adapter directory, merge.

An adapter directory is PEFT's own layout, so `PeftModel.from_pretrained(base, DIR)` reads it too:

    adapter_config.json         PEFT's `LoraConfig` (r, lora_alpha, lora_dropout, target_modules, and
                                `base_model_name_or_path`: the base model directory, absolute)
    adapter_model.safetensors   the low-rank matrices only (`base_model.model.<module>.lora_A.weight`, ...)
    adapter_base.json           loopcoder's: the base directory and a fingerprint of it, checked on load

PLT's loops run the same modules R times, so an adapter on `q_proj` adapts that projection in every loop,
as the base weight is shared. Merging (`W + (alpha / r) B A`) gives a plain model directory that the
engine, `serve` and `export` take as they take any other. Inference merges on load (`load_merged`): the
engine's fused decoding matmuls read the base weights, never an adapter's side branch.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.errors import CheckpointError, LoopcoderError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BASE = "adapter_base.json"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix on disk (the PeftModel wrapper's)
# The linear layers of a PLT block that an adapter may target (PEFT's "all-linear" is all of them).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def lora_config(
    r: int, alpha: float, dropout: float, targets: list[str] | tuple[str, ...], base: str | os.PathLike | None = None
) -> LoraConfig:
    """PEFT's config for these settings, checked: a one-line error names a bad value."""
    if r < 1:
        raise LoopcoderError(f"LoRA rank r={r} must be >= 1")
    if not alpha > 0:
        raise LoopcoderError(f"LoRA alpha={alpha} must be > 0")
    if not 0 <= dropout < 1:
        raise LoopcoderError(f"LoRA dropout={dropout} must be in [0, 1)")
    modules = list(TARGETS) if list(targets) == ["all-linear"] else list(targets)
    unknown = [t for t in modules if t not in TARGETS]
    if unknown or not modules:
        raise LoopcoderError(
            f"LoRA target {unknown[0]!r} is not a linear layer of the model" if unknown else "LoRA needs a target"
        )
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted(set(modules), key=TARGETS.index),
        base_model_name_or_path=None if base is None else str(Path(base).resolve()),
    )


def _peft_model(model: Any, config: LoraConfig) -> Any:
    base = config.base_model_name_or_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT asks transformers a deprecated question
        warnings.filterwarnings("ignore", "The PEFT config's `base_model_name_or_path` was renamed")
        peft_model = get_peft_model(model, config)
    # PEFT takes the base's name from the model (where from_pretrained found it, or nothing); keep ours
    peft_model.peft_config["default"].base_model_name_or_path = base
    return peft_model


def attach(model: Any, config: LoraConfig) -> Any:
    """Add the adapter to `model` in place and freeze everything else; returns the same model object
    (a `PLTForCausalLM` whose target layers now carry the adapter). The new matrices come from torch's
    RNG (A random, B zero: the adapted model starts equal to the base)."""
    return _peft_model(model, config).base_model.model


def is_attached(model: Any) -> bool:
    return "default" in (getattr(model, "peft_config", None) or {})


def trainable_counts(model: Any) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def fingerprint(model_dir: str | os.PathLike) -> str:
    """What identifies a base model cheaply: its config, its training marker if any, and the names and sizes
    of its weight files (a base that was replaced, retrained into the same place or resized, differs)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for name in ("config.json", "checkpoint.json", "model.safetensors.index.json"):
        if (root / name).is_file():
            h.update(name.encode() + b"\0" + (root / name).read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def save_adapter(out: Path, model_state: dict[str, torch.Tensor], config: LoraConfig) -> None:
    """Write an adapter directory's files into `out` (an existing directory, e.g. a checkpoint being written).
    `model_state`: the adapted model's state dict (or its trainable part: the adapter's tensors)."""
    lora = {k.replace(".default.", "."): v for k, v in model_state.items() if ".lora_" in k}
    if not lora:
        raise LoopcoderError("internal error: the model has no LoRA tensors to save")
    save_file({PEFT_PREFIX + k: v.contiguous() for k, v in lora.items()}, str(out / ADAPTER_WEIGHTS), {"format": "pt"})
    config.save_pretrained(str(out))
    base = config.base_model_name_or_path
    atomic_write_text(out / ADAPTER_BASE, json.dumps({"base": base, "fingerprint": fingerprint(base)}, indent=1) + "\n")


def read_config(adapter_dir: str | os.PathLike) -> LoraConfig:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the LoRA adapter config {path}: {e}") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: not a LoRA adapter (peft_type {data.get('peft_type')!r})")
    return LoraConfig.from_pretrained(str(adapter_dir))


def base_dir(adapter_dir: str | os.PathLike) -> Path:
    """The base model an adapter was trained on, checked to be there and unchanged."""
    config = read_config(adapter_dir)
    base = config.base_model_name_or_path
    if not base:
        raise CheckpointError(f"{str(adapter_dir)!r}: the adapter names no base model (base_model_name_or_path)")
    if not Path(base).is_dir():
        raise CheckpointError(
            f"{str(adapter_dir)!r} is a LoRA adapter of {base}, which no longer exists: restore it there, or "
            "merge the adapter into a full model while it exists (`loopcoder export --merge`)"
        )
    marker = Path(adapter_dir) / ADAPTER_BASE
    if marker.is_file():
        want = json.loads(marker.read_text()).get("fingerprint")
        if want and want != fingerprint(base):
            raise CheckpointError(
                f"{str(adapter_dir)!r} is a LoRA adapter of {base}, which has changed since (other config or "
                "weights): the adapter only fits the model it was trained on"
            )
    return Path(base)


def _with_saved_adapter(model: Any, adapter_dir: str | os.PathLike) -> Any:
    """A `PeftModel` around `model` (the adapter's base, loaded) with the adapter's saved weights; strict:
    a missing or unexpected adapter tensor is an error that names it."""
    peft_model = _peft_model(model, read_config(adapter_dir))
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot load {path}: a truncated or corrupted file ({e})") from None
    result = set_peft_model_state_dict(peft_model, saved)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        what = f"misses {missing[0]}" if missing else f"has an unexpected tensor {result.unexpected_keys[0]}"
        raise CheckpointError(f"the LoRA adapter {path} {what}: it was not made for this base model")
    return peft_model


def load_adapter(model: Any, adapter_dir: str | os.PathLike) -> Any:
    """`model` (the adapter's base) with the saved adapter attached, to train on: only the adapter is trainable."""
    return _with_saved_adapter(model, adapter_dir).base_model.model


def load_merged(model: Any, adapter_dir: str | os.PathLike) -> Any:
    """`model` (the adapter's base) with the saved adapter merged into its weights: a plain model again."""
    return _with_saved_adapter(model, adapter_dir).merge_and_unload()
