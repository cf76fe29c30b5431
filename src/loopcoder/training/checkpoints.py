"""Training checkpoints: one directory per step, complete or absent.

    RUN/checkpoints/step-000100/
        config.json, model.safetensors       the released LoopCoder-V2 layout (`from_pretrained`,
                                             `loopcoder generate --model` load it as it is)
        tokenizer.json, tokenizer_config.json copied from the data directory
        model_identity.json                  the weights' checksums, the tokenizer's fingerprint
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
import errno
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from loopcoder.model import lora
from loopcoder.model.checkpoint import TOKENIZER_FILES
from loopcoder.model.identity import write_identity
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.utils.atomic import atomic_directory, atomic_write_text
from loopcoder.utils.errors import LoopcoderError

CHECKPOINTS = "checkpoints"
MARKER = "checkpoint.json"
STATE = "trainer_state.pt"
LATEST = "latest"
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
    """A model directory (or a LoRA adapter directory) as given, or a run directory's (or its checkpoints/')
    latest checkpoint: what every command's `--model` (and `sft --init`) accepts."""
    p = Path(path)
    if (p / "config.json").is_file() or lora.is_adapter_dir(p):
        return p
    for run in (p, p.parent if p.name == CHECKPOINTS else None):
        if run is not None and (ckpt := latest_checkpoint(run)) is not None:
            return ckpt
    if not p.exists():
        raise LoopcoderError(f"model directory {str(path)!r} does not exist")
    if (p / CHECKPOINTS).is_dir():
        raise LoopcoderError(
            f"run directory {str(path)!r} has no complete checkpoint in {CHECKPOINTS}/ yet "
            "(a checkpoint is a step-N directory with checkpoint.json)"
        )
    raise LoopcoderError(
        f"{str(path)!r} is neither a model directory (config.json) nor a run directory with "
        f"a complete checkpoint ({CHECKPOINTS}/step-N)"
    )


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    model_config: Any,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    tokenizer_dir: Path | None,
    keep: int,
    max_shard_size: str,
    info: dict[str, Any],
    adapter: Any = None,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, drop all but the newest `keep`. With
    `adapter` (a LoRA run's PEFT config), `weights` hold the adapter and the checkpoint is an adapter
    directory (`loopcoder/lora.py`) instead of a full model."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_name(step)
    try:
        with atomic_directory(final) as tmp:
            if adapter is not None:
                lora.save_adapter(tmp, weights, adapter)
            else:
                save_weights(model_config, weights, tmp, max_shard_size)
            if tokenizer_dir is not None:
                for name in TOKENIZER_FILES:
                    if (tokenizer_dir / name).is_file():
                        shutil.copyfile(tokenizer_dir / name, tmp / name)
            write_identity(tmp)  # the weights' checksums and the copied tokenizer's fingerprint
            torch.save(state, tmp / STATE)
            marker = {
                "step": step,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **info,
            }
            atomic_write_text(tmp / MARKER, json.dumps(marker, indent=1) + "\n")
    except Exception as e:  # the temporary directory is gone: earlier checkpoints and `latest` are intact
        space = _out_of_space(e, run_dir, final, _nbytes(weights) + _nbytes(state))
        if space is None:
            raise
        raise space from e
    atomic_write_text(root / LATEST, final.name + "\n")
    prune(run_dir, keep)
    return final


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (what a checkpoint of it takes on disk, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _out_of_space(error: BaseException, run_dir: str | Path, final: Path, needed: int) -> LoopcoderError | None:
    """A one-line error if a checkpoint write failed for want of space (safetensors and torch.save do not
    always say so: it is ENOSPC, or less free space than the checkpoint needs), else None."""
    root = final.parent
    try:
        free = shutil.disk_usage(root if root.exists() else Path(run_dir)).free
    except OSError:
        return None
    enospc = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if not enospc and "No space left" not in str(error) and free >= needed:
        return None
    good = latest_checkpoint(run_dir)
    kept = f"the earlier checkpoints and `latest` ({good.name}) are intact" if good else "no checkpoint was written"
    return LoopcoderError(
        f"no space left to save checkpoint {final.name} in {root}: it needs about "
        f"{needed / 2**20:,.1f} MiB and {free / 2**20:,.1f} MiB are free; {kept}. Free some space "
        "(or lower checkpoint.keep), then continue with --resume"
    )


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


STATE_KEYS = ("format", "step", "tokens", "elapsed_s", "config", "optimizer", "scheduler", "reader", "rng")


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer state; a damaged file (truncated, garbage, another pickle) is one line."""
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, pickle.UnpicklingError, EOFError, ... for a bad file
        lines = str(e).strip().splitlines()
        why = lines[0][:200] if lines else type(e).__name__
        raise LoopcoderError(
            f"cannot read {path / STATE} ({why}): the checkpoint is damaged; remove {path} to resume from the "
            "one before it"
        ) from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise LoopcoderError(
            f"{path / STATE} is not a trainer state (no {', '.join(missing[:4])}): the checkpoint is damaged; "
            f"remove {path} to resume from the one before it"
        )
    return state
