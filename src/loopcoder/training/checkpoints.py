"""Training checkpoints: one directory per step, complete or absent.

    RUN/checkpoints/step-000100/
        config.json, model.safetensors       the released LoopCoder-V2 layout (`from_pretrained`,
                                             `loopcoder generate --model` load it as it is)
        tokenizer.json, tokenizer_config.json copied from the data directory
        trainer_state.pt                     optimizer, scheduler, RNG, data-reader position, step,
                                             config, metrics so far (plain tensors and Python values)
        checkpoint.json                      the completion marker, written last
    RUN/checkpoints/latest                   the name of the newest checkpoint, written atomically

A checkpoint is written into a temporary sibling and renamed into place (`atomic_directory`), and a
directory without `checkpoint.json` is never taken for one, so a crash at any moment leaves the
previous checkpoints valid. Weights and optimizer state are unsharded (consolidated by rank 0), so a
checkpoint resumes at any world size.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from loopcoder.atomic import atomic_directory, atomic_write_text
from loopcoder.errors import LoopcoderError
from loopcoder.model import PLTForCausalLM

CHECKPOINTS = "checkpoints"
MARKER = "checkpoint.json"
STATE = "trainer_state.pt"
LATEST = "latest"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_NAME = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file() and (path / STATE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and is_complete(p)]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (the `latest` pointer names it too, unless a crash came between
    the rename and the pointer write), or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory as given, or a run directory's (or its checkpoints/') latest checkpoint."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    for run in (p, p.parent if p.name == CHECKPOINTS else None):
        if run is not None and (ckpt := latest_checkpoint(run)) is not None:
            return ckpt
    if not p.exists():
        raise LoopcoderError(f"{str(path)!r} does not exist")
    raise LoopcoderError(f"{str(path)!r} is neither a model directory (config.json) nor a run directory with "
                         "a complete checkpoint")


def write_checkpoint(run_dir: str | Path, step: int, model_config: Any, weights: dict[str, torch.Tensor],
                     state: dict[str, Any], tokenizer_dir: Path | None, keep: int, max_shard_size: str,
                     info: dict[str, Any]) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, drop all but the newest `keep`."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_name(step)
    with atomic_directory(final) as tmp:
        save_weights(model_config, weights, tmp, max_shard_size)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, tmp / name)
        torch.save(state, tmp / STATE)
        marker = {"step": step, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  **info}
        atomic_write_text(tmp / MARKER, json.dumps(marker, indent=1) + "\n")
    atomic_write_text(root / LATEST, final.name + "\n")
    prune(run_dir, keep)
    return final


def save_weights(model_config: Any, weights: dict[str, torch.Tensor], out: Path, max_shard_size: str) -> None:
    """`save_pretrained` of a model built on the meta device around the given (CPU) tensors: the released
    layout and class name, whatever wrapper (FSDP, DDP, compile) the training model has."""
    with torch.device("meta"):
        shell = PLTForCausalLM(model_config)
    shell.load_state_dict(weights, assign=True, strict=False)
    missing = [n for n, p in shell.named_parameters() if p.is_meta]
    if missing:
        raise LoopcoderError(f"internal error: no weights for {', '.join(missing[:5])} in the checkpoint")
    shell.save_pretrained(out, max_shard_size=max_shard_size)


def prune(run_dir: str | Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Leftovers of writes that a crash interrupted (temporary and incomplete step directories)."""
    root = Path(run_dir) / CHECKPOINTS
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            partial = p.name.startswith(".step-") or (_NAME.match(p.name) and not is_complete(p))
            if partial and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise LoopcoderError(f"cannot read {path / STATE}: {str(e).splitlines()[0]}") from e
