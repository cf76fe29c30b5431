"""Where training metrics go: `RUN/metrics.jsonl` and TensorBoard (`RUN/tensorboard/`); the progress
line on stderr is `loopcoder.utils.progress`. Only rank 0 writes.

metrics.jsonl has one JSON object per line: `{"kind": "train", "step", "loss", "lr", "grad_norm",
"tokens", "tokens_per_s", "elapsed_s"[, "mfu"]}` and `{"kind": "val", "step", "val_loss", "val_bpb",
"val_tokens", "val_bytes"}`. Lines are appended as they come (a crash can tear at most the last
one); on resume the file is rewritten, atomically, from the records saved in the checkpoint, so it
holds exactly one trajectory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.errors import LoopcoderError

_TB_KEYS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "mfu": "train/mfu",
    "val_loss": "val/loss",
    "val_bpb": "val/bpb",
}


class MetricsLogger:
    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool, history: list[dict[str, Any]], resume_step: int
    ) -> None:
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


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `RUN/metrics.jsonl`, in order ([] when the run wrote none). A torn last line (a run
    killed while appending it) is left out; a bad line before it is an error that names it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for n, (i, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if n == len(lines) - 1:
                break
            raise LoopcoderError(f"{path}:{i}: not a JSON record") from None
    return records
