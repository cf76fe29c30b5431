"""Progress of long jobs on stderr: how far, how fast, how long left.

One reporter for data building, training, evaluation, diagnostics and the study. A line reads

    encoding: 1200/3400 documents | 12.3 MB/45.6 MB | 1.2 MB/s | ETA 0m28s
    train: 20/300 steps | loss 5.0123, MFU 31.0% | 12.3k tok/s | ETA 4m05s

`mode` "lines" prints such a line at most every `every_s` seconds (and at `finish`); "bar" keeps one
line updated in place (for a terminal); "auto" picks "bar" on a TTY and "lines" otherwise; "off" prints
nothing. Counts go up with `advance` (increments) or `update` (absolute values); an optional second
quantity (bytes or tokens) gives the rate, and the ETA when its total is known.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

MODES = ("auto", "bar", "lines", "off")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop always returns


def short_count(x: float) -> str:
    """1234567 -> 1.23M, 12345 -> 12.3k, 12 -> 12."""
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def duration(seconds: float) -> str:
    """4m05s, or 1h02m past an hour; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """A progress line for `total` items of `unit` (None: unknown, e.g. a streamed dataset).

    `amount_unit` "bytes" or "tokens" tracks a second quantity (documents differ in size, completions in
    length): its rate is shown, and with `total_amount` it drives the ETA. `start` is where a resumed job
    began (the ETA counts only the work done since)."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "items",
        *,
        amount_unit: str | None = None,
        total_amount: float | None = None,
        start: int = 0,
        mode: str = "lines",
        every_s: float = 2.0,
        stream: TextIO | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}: choose from {', '.join(MODES)}")
        if amount_unit not in (None, "bytes", "tokens"):
            raise ValueError(f"amount_unit {amount_unit!r}: choose bytes or tokens")
        self.label, self.total, self.unit = label, total, unit
        self.amount_unit, self.total_amount = amount_unit, total_amount
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.every_s = mode, every_s
        self.start = self.done = start
        self.amount = 0.0
        self.t0 = time.perf_counter()
        self._last = -math.inf
        self._width = 0  # the in-place line's length (bar mode)

    # ------------------------------------------------------------------ counting
    def advance(self, items: int = 1, amount: float = 0) -> None:
        """`items` more done, carrying `amount` more bytes or tokens."""
        self.update(self.done + items, self.amount + amount)

    def update(
        self, done: int, amount: float | None = None, *, rate: float | None = None, info: str = "", force: bool = False
    ) -> None:
        """`done` items so far (and `amount` bytes or tokens). `rate` overrides the measured one (e.g. a
        trainer's recent tokens/s); `info` is shown after the count (e.g. the loss)."""
        self.done = done
        if amount is not None:
            self.amount = amount
        if self.mode == "off":
            return
        now = time.perf_counter()
        if self.mode == "bar":
            self._draw(self.line(now, rate, info))
        elif force or now - self._last >= self.every_s:
            self._last = now
            print(self.line(now, rate, info), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line of its own (a validation result, a checkpoint), not overwritten by the bar."""
        if self.mode == "off":
            return
        self._end_bar()
        print(text, file=self.stream, flush=True)

    def finish(self, info: str = "") -> float:
        """Print the final line (with the elapsed time) and return the elapsed seconds."""
        now = time.perf_counter()
        if self.mode != "off":
            self._end_bar()
            print(self.line(now, None, info, final=True), file=self.stream, flush=True)
        return now - self.t0

    def close(self) -> None:
        """End the in-place line, if any (after a last forced `update`)."""
        self._end_bar()

    # ------------------------------------------------------------------ the line
    def line(self, now: float, rate: float | None = None, info: str = "", final: bool = False) -> str:
        elapsed = max(now - self.t0, 1e-9)
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        parts = [f"{self.label}: {count} {self.unit}"]
        if self.amount_unit == "bytes":
            parts.append(human_bytes(self.amount) + (f"/{human_bytes(self.total_amount)}" if self.total_amount else ""))
        elif self.amount_unit == "tokens" and self.amount:
            parts.append(f"{short_count(self.amount)} tokens")
        if info:
            parts.append(info)
        parts.append(self._rate(elapsed if rate is None else None, rate))
        parts.append(f"{elapsed:.1f} s" if final else f"ETA {duration(self._eta(elapsed))}")
        return " | ".join(parts)

    def _rate(self, elapsed: float | None, rate: float | None) -> str:
        if self.amount_unit is None:
            x = (self.done - self.start) / elapsed if rate is None else rate
            return f"{x:.2f} {self.unit}/s" if x < 100 else f"{short_count(x)} {self.unit}/s"
        x = self.amount / elapsed if rate is None else rate
        return f"{human_bytes(x)}/s" if self.amount_unit == "bytes" else f"{short_count(x)} tok/s"

    def _eta(self, elapsed: float) -> float:
        if self.total_amount and self.amount:
            return (self.total_amount - self.amount) * elapsed / self.amount
        if self.total and self.done > self.start:
            return (self.total - self.done) * elapsed / (self.done - self.start)
        return math.nan

    def _draw(self, line: str) -> None:
        frac = min(max(self.done / self.total, 0.0), 1.0) if self.total else 0.0
        text = f"[{'#' * int(20 * frac)}{'-' * (20 - int(20 * frac))}] {line}"
        self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
        self.stream.flush()
        self._width = len(text)

    def _end_bar(self) -> None:
        if self.mode == "bar" and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
