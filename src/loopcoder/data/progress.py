"""Progress lines on stderr for long data jobs: counts, rate and, when the total is known, an ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop always returns


class Progress:
    """Throttled progress for a stream of items, optionally carrying bytes.

    The ETA uses `total_bytes` when given (documents differ in size), else `total_items`; with
    neither (a streamed dataset) only counts and rates are shown.
    """

    def __init__(self, label: str, total_bytes: int | None = None, stream: TextIO | None = None,
                 every_s: float = 2.0, unit: str = "documents", total_items: int | None = None) -> None:
        self.label = label
        self.total_bytes = total_bytes
        self.total_items = total_items
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.items = 0
        self.bytes = 0
        self.start = time.perf_counter()
        self._last = self.start

    def update(self, items: int = 1, nbytes: int = 0) -> None:
        self.items += items
        self.bytes += nbytes
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(now)

    def done(self) -> float:
        """Print the final line and return the elapsed seconds."""
        now = time.perf_counter()
        self._print(now, final=True)
        return now - self.start

    def _print(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.start, 1e-9)
        items = f"{self.items}/{self.total_items}" if self.total_items else f"{self.items}"
        line = f"{self.label}: {items} {self.unit}"
        if self.bytes or self.total_bytes:
            total = f"/{_human_bytes(self.total_bytes)}" if self.total_bytes else ""
            line += f", {_human_bytes(self.bytes)}{total}, {_human_bytes(self.bytes / elapsed)}/s"
        else:
            line += f", {self.items / elapsed:.1f}/s"
        if final:
            line += f", {elapsed:.1f} s"
        else:
            left = None
            if self.total_bytes and self.bytes:
                left = (self.total_bytes - self.bytes) * elapsed / self.bytes
            elif self.total_items and self.items:
                left = (self.total_items - self.items) * elapsed / self.items
            if left is not None:
                line += f", ETA {max(left, 0):.0f} s"
        print(line, file=self.stream, flush=True)
