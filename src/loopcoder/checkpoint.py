"""Checkpoint checks and atomic writes.

A model directory is the released LoopCoder-V2 layout: `config.json` plus `model.safetensors` or
sharded `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`. Loading is strict
(every tensor present with the right shape, nothing unknown); writing goes to a temporary directory
that is renamed into place, so a crash never leaves a half-written checkpoint that looks valid.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loopcoder.errors import LoopcoderError


class CheckpointError(LoopcoderError):
    """A checkpoint that does not match the model: the message names the tensors."""


def check_loading_info(info: dict[str, Any], where: Any) -> None:
    """Raise `CheckpointError` if `from_pretrained` reported missing, unexpected or mis-shaped tensors."""
    problems = []

    def names(key: str) -> list[str]:
        return sorted(str(x) for x in (info.get(key) or []))

    if missing := names("missing_keys"):
        problems.append(f"missing tensor(s) {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected := names("unexpected_keys"):
        problems.append(f"unexpected tensor(s) {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        parts = []
        for item in list(mismatched)[:8]:
            if isinstance(item, (tuple, list)) and len(item) == 3:
                parts.append(f"{item[0]} (checkpoint {tuple(item[1])}, model {tuple(item[2])})")
            else:
                parts.append(str(item))
        problems.append(f"mis-shaped tensor(s) {', '.join(parts)}")
    if info.get("error_msgs"):
        problems.append("; ".join(str(m) for m in info["error_msgs"])[:500])
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match the model: {'; '.join(problems)}")


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is an ordinary directory
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; keep the usual file permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_model(model: Any, out_dir: str | os.PathLike, max_shard_size: str | int | None = None,
               tokenizer: Any = None) -> Path:
    """`save_pretrained` in the released layout, atomically."""
    with atomic_directory(out_dir) as tmp:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def load_model(path: str | os.PathLike, dtype: Any = None, device: Any = None) -> Any:
    """Load a model directory with a clear error for a bad path or a mismatched checkpoint."""
    from loopcoder.model import PLTForCausalLM

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json: not a model directory")
    if not any(p.glob("*.safetensors")):
        raise CheckpointError(f"{str(path)!r} has no *.safetensors weights")
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    from safetensors import SafetensorError

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
