"""Where training metrics go: `RUN/metrics.jsonl`, TensorBoard (`RUN/tensorboard/`) and a progress
line on stderr. Only rank 0 writes.

metrics.jsonl has one JSON object per line: `{"kind": "train", "step", "loss", "lr", "grad_norm",
"tokens", "tokens_per_s", "elapsed_s"[, "mfu"]}` and `{"kind": "val", "step", "val_loss", "val_bpb",
"val_tokens", "val_bytes"}`. Lines are appended as they come (a crash can tear at most the last
one); on resume the file is rewritten, atomically, from the records saved in the checkpoint, so it
holds exactly one trajectory.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from loopcoder.atomic import atomic_write_text

_TB_KEYS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
            "tokens_per_s": "train/tokens_per_s", "mfu": "train/mfu", "val_loss": "val/loss", "val_bpb": "val/bpb"}


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, history: list[dict[str, Any]],
                 resume_step: int) -> None:
        self.enabled = enabled
        self.records = list(history)  # every record of this trajectory (saved in checkpoints)
        self.path = run_dir / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a killed run wrote after the checkpoint we resume from
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, tag in _TB_KEYS.items():
                v = record.get(key)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(tag, v, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class ProgressLine:
    """step/total, loss, tokens/s and ETA on stderr: updated in place on a TTY, else a line every
    `every_s` seconds (and at the end)."""

    def __init__(self, total: int, start_step: int, mode: str = "auto", every_s: float = 10.0,
                 stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode if enabled else "off"
        self.total = total
        self.start_step = start_step
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self._last = -math.inf
        self._width = 0

    def update(self, step: int, loss: float, tokens_per_s: float, extra: str = "", force: bool = False) -> None:
        if self.mode == "off":
            return
        now = time.perf_counter()
        done = step - self.start_step
        eta = (now - self.t0) / done * (self.total - step) if done > 0 else float("nan")
        text = (f"step {step}/{self.total} | loss {loss:.4f} | {_rate(tokens_per_s)} tok/s | "
                f"ETA {_duration(eta) if math.isfinite(eta) else '?'}{' | ' + extra if extra else ''}")
        if self.mode == "bar":
            frac = step / self.total
            bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
            line = f"[{bar}] {text}"
            self.stream.write("\r" + line + " " * max(0, self._width - len(line)))
            self._width = len(line)
            self.stream.flush()
        elif force or now - self._last >= self.every_s:
            self._last = now
            print(text, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line of its own (validation, checkpoint), not overwritten by the bar."""
        if self.mode == "off":
            return
        if self.mode == "bar" and self._width:
            self.stream.write("\n")
            self._width = 0
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.mode == "bar" and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
