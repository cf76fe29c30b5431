"""User-facing errors: the CLI prints their message on one line and exits with status 2."""

from __future__ import annotations

from typing import Any


class LoopcoderError(Exception):
    """Bad input from the user (a path, a flag, a file); the message says what and where."""


class ConfigError(ValueError):
    """An invalid model configuration (`PLTConfig`); the message names the field."""


class CheckpointError(LoopcoderError):
    """A checkpoint that does not match the model: the message names the tensors."""


def check_loading_info(info: dict[str, Any], where: Any) -> None:
    """Raise `CheckpointError` if `from_pretrained` reported missing, unexpected or mis-shaped tensors.

    Here, below the model, so that the model's strict `from_pretrained` can use it without importing
    `loopcoder.model.checkpoint` (which loads models, and so sits above the model)."""
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
