"""Model directories: strict loading, atomic saving, and random initialisation.

A model directory is the released LoopCoder-V2 layout: `config.json` plus `model.safetensors` or
sharded `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`. Loading is strict
(every tensor present with the right shape, nothing unknown: `errors.check_loading_info`); writing goes
to a temporary directory that is renamed into place (`atomic.atomic_directory`), so a crash never
leaves a half-written checkpoint that looks valid.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from loopcoder import lora
from loopcoder.atomic import atomic_directory
from loopcoder.config import ModelShape
from loopcoder.errors import CheckpointError, LoopcoderError
from loopcoder.model import PLTForCausalLM

__all__ = ["CheckpointError", "load_model", "save_model", "write_merged", "write_random_model"]

# A tokenizer saved beside a model (training checkpoints copy these from the data directory).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save_model(
    model: Any, out_dir: str | os.PathLike, max_shard_size: str | int | None = None, tokenizer: Any = None
) -> Path:
    """`save_pretrained` in the released layout, atomically."""
    with atomic_directory(out_dir) as tmp:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def load_model(path: str | os.PathLike, dtype: Any = None, device: Any = None) -> Any:
    """Load a model directory with a clear error for a bad path or a mismatched checkpoint. A LoRA adapter
    directory (`lora.py`) loads as its base model with the adapter merged in."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    if lora.is_adapter_dir(p):  # merged at the base's saved precision, then converted
        model = lora.load_merged(load_model(lora.base_dir(p)), p)
        model = model if dtype is None else model.to(dtype)
        return (model if device is None else model.to(device)).eval()
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json: not a model directory")
    if not any(p.glob("*.safetensors")):
        raise CheckpointError(f"{str(path)!r} has no *.safetensors weights")
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = PLTForCausalLM.from_pretrained(str(p), **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # e.g. a truncated or corrupted file
        if isinstance(e, LoopcoderError):
            raise
        lines = str(e).strip().splitlines()
        why = lines[0] if lines else type(e).__name__
        if isinstance(e, SafetensorError):
            why = f"a *.safetensors file is truncated or corrupted ({why})"
        raise CheckpointError(f"cannot load {str(path)!r}: {why}") from e
    if device is not None:
        model = model.to(device)
    return model.eval()


def write_merged(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A LoRA adapter directory merged into its base: a plain model directory (config, weights, generation
    config and the adapter's tokenizer files), written atomically. What `loopcoder export --merge` exports."""
    src = Path(adapter_dir)
    if not lora.is_adapter_dir(src):
        raise CheckpointError(f"{str(adapter_dir)!r} is not a LoRA adapter directory (no {lora.ADAPTER_CONFIG})")
    model = load_model(src)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    return Path(out_dir)


def write_random_model(
    out: str | Path,
    *,
    loops: int = 2,
    hidden_size: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 4096,
    window: int = 64,
    max_positions: int = 4096,
    architecture: str = "plt",
    seed: int = 0,
) -> int:
    """Write a randomly initialised PLT model directory to `out` (the defaults are `init`'s); its parameter count.
    The config comes from `ModelShape`, like a training run's."""
    if hidden_size % heads:
        raise LoopcoderError(f"--hidden-size {hidden_size} is not a multiple of --heads {heads}")
    shape = ModelShape(
        loops=loops,
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        window=window,
        architecture=architecture,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(seed)
    model = PLTForCausalLM(shape.plt_config())
    save_model(model, out)
    return sum(p.numel() for p in model.parameters())
