"""Model directories: strict loading, atomic saving, and random initialisation.

A model directory is the released LoopCoder-V2 layout: `config.json` plus `model.safetensors` or
sharded `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`. Loading is strict
(every tensor present with the right shape, nothing unknown: `errors.check_loading_info`); writing goes
to a temporary directory that is renamed into place (`atomic.atomic_directory`), so a crash never
leaves a half-written checkpoint that looks valid. Every directory saved here gets `model_identity.json`
(`identity.py`: the weights' checksums and the tokenizer's fingerprint).

`verify_model_dir` is the check before a directory is declared good (`export`): the recorded checksums,
a strict load, finite weights, a forward pass with finite logits, and a tokenizer that loads, fits the
vocabulary and is the one the model was made with.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from loopcoder.model import lora
from loopcoder.model.config import PLTConfig
from loopcoder.model.identity import write_identity
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.model.shape import ModelShape
from loopcoder.utils.atomic import atomic_directory
from loopcoder.utils.errors import CheckpointError, LoopcoderError

__all__ = ["CheckpointError", "load_model", "save_model", "write_merged", "write_random_model"]
MIN_POSITIONS = 2  # a prompt token and one generated token

# A tokenizer saved beside a model (training checkpoints copy these from the data directory).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save_model(
    model: Any,
    out_dir: str | os.PathLike,
    max_shard_size: str | int | None = None,
    tokenizer: Any = None,
    identity: bool = True,
) -> Path:
    """`save_pretrained` in the released layout, atomically, with `model_identity.json` (unless
    `identity` is False: the caller adds files and writes it itself)."""
    with atomic_directory(out_dir) as tmp:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        save_pretrained(model, tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if identity:
            write_identity(tmp)
    return Path(out_dir)


def save_pretrained(model: Any, out: Path, **kwargs: Any) -> None:
    """`model.save_pretrained`, with a full disk as an `OSError` (safetensors raises its own error type)."""
    try:
        model.save_pretrained(out, **kwargs)
    except SafetensorError as e:
        if "os error 28" in str(e) or "No space left" in str(e):
            raise OSError(errno.ENOSPC, "No space left on device", str(out)) from None
        raise CheckpointError(f"cannot write the weights to {out}: {str(e).splitlines()[0]}") from None


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
    config, identity and the adapter's tokenizer files), written atomically. What `loopcoder export --merge`
    exports."""
    src = Path(adapter_dir)
    if not lora.is_adapter_dir(src):
        raise CheckpointError(f"{str(adapter_dir)!r} is not a LoRA adapter directory (no {lora.ADAPTER_CONFIG})")
    model = load_model(src)
    with atomic_directory(out_dir) as tmp:
        save_pretrained(model, tmp)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        write_identity(tmp)
    return Path(out_dir)


# `init`'s shape when a flag is not given: the tiny preset's (`commands/init.py` reads the preset itself)
DEFAULT_SHAPE: dict[str, Any] = {
    "loops": 2,
    "hidden_size": 128,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
    "intermediate_size": None,
    "vocab_size": 4096,
    "window": 64,
    "max_positions": 4096,
    "architecture": "plt",
}


def write_random_model(out: str | Path, *, seed: int = 0, identity: bool = True, **shape: Any) -> int:
    """Write a randomly initialised PLT model directory to `out`; its parameter count. `shape`: the
    keyword arguments of `random_model_config` (`DEFAULT_SHAPE` for those not given), which checks them
    first; the config comes from `ModelShape`, like a training run's."""
    config = random_model_config(**{**DEFAULT_SHAPE, **shape})
    check_fits(config, out)
    torch.manual_seed(seed)
    model = PLTForCausalLM(config)
    save_model(model, out, identity=identity)
    return sum(p.numel() for p in model.parameters())


def random_model_config(
    *,
    loops: int,
    hidden_size: int,
    layers: int,
    heads: int,
    kv_heads: int | None,
    intermediate_size: int | None,
    vocab_size: int,
    window: int,
    max_positions: int,
    architecture: str,
) -> PLTConfig:
    """The config of a model `init` would write, refused (one line, naming the flag) when it cannot work:
    a shape the model rejects, or fewer positions than a prompt and one new token need."""
    for flag, value in (("--loops", loops), ("--hidden-size", hidden_size), ("--layers", layers), ("--heads", heads)):
        if value < 1:
            raise LoopcoderError(f"{flag} must be >= 1, got {value}")
    if hidden_size % heads:
        raise LoopcoderError(f"--hidden-size {hidden_size} is not a multiple of --heads {heads}")
    if max_positions < MIN_POSITIONS:
        raise LoopcoderError(
            f"--max-positions {max_positions} cannot hold a prompt and one generated token (at least {MIN_POSITIONS})"
        )
    if window < 0:
        raise LoopcoderError(f"--window must be >= 0, got {window}")
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
    return shape.plt_config()


def parameter_count(config: PLTConfig) -> int:
    """Parameters of a model of this config, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = PLTForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def check_fits(config: PLTConfig, out: str | os.PathLike, dtype_bytes: int = 4) -> int:
    """Refuse, before allocating anything, a model whose weights do not fit in the memory available or
    on the disk at `out`: building it holds the fp32 weights, and saving copies them once more
    (safetensors serialises tensor by tensor from a bytes copy). Returns the weights' bytes."""
    nbytes = parameter_count(config) * dtype_bytes
    memory = available_memory()
    if memory is not None and 2 * nbytes > memory:
        raise LoopcoderError(
            f"this model has {nbytes // dtype_bytes:,} parameters: building and saving it needs about "
            f"{_gib(2 * nbytes)} of memory and {_gib(memory)} are available; choose a smaller shape"
        )
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise LoopcoderError(
            f"this model's weights take {_gib(nbytes)} and {str(parent)!r} has {_gib(free)} free; "
            "choose a smaller shape or another place"
        )
    return nbytes


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, or less if a cgroup limit says so; None if unknown."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, min(found)) if found else None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"
