"""Paired comparisons between loop counts: every model answers the same held-out items, so differences
are taken item by item, which cancels the items' own difficulty and gives much tighter intervals."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loopcoder.diagnostics.measures import mean_ci


@dataclass
class Difference:
    """Mean of b - a over paired items with a 95 % interval; `clear` when the interval excludes 0."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def clear(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"mean": self.mean, "ci95": [self.low, self.high], "n": self.n, "distinguishable": self.clear}

    def describe(self, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
        f = f"{{:+.{digits}f}}"
        text = f"{f.format(self.mean * scale)}{unit} [{f.format(self.low * scale)}, {f.format(self.high * scale)}]"
        return text + (" (distinguishable from noise)" if self.clear else " (within noise)")


def paired_difference(a: list[float], b: list[float], seed: int = 0, resamples: int = 4000) -> Difference:
    """b - a, item by item: a t interval for continuous values, a bootstrap interval when every value is
    0 or 1 (accuracy), where the t interval misbehaves near 0 and 1."""
    x = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Difference(float("nan"), float("nan"), float("nan"), 0)
    mean = float(x.mean())
    if n == 1:
        return Difference(mean, float("nan"), float("nan"), 1)
    binary = set(np.unique(np.concatenate([np.asarray(a), np.asarray(b)])).tolist()) <= {0.0, 1.0}
    if binary:
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
        low, high = np.quantile(means, [0.025, 0.975])
        return Difference(mean, float(low), float(high), n)
    return Difference(*mean_ci(x))


def trend(diffs: list[Difference], higher_is_better: bool) -> str:
    """In words: how a metric moves with R (`diffs`: each loop count against the previous one), and
    whether each step is beyond noise."""
    if not diffs:
        return "only one loop count"
    ups = [d.mean > 0 for d in diffs]
    if all(not d.clear for d in diffs):
        return "no step between consecutive loop counts is distinguishable from noise"
    direction = "monotonic" if all(ups) or not any(ups) else "not monotonic"
    better = [(d.mean > 0) == higher_is_better for d in diffs]
    words = ", ".join(f"{'better' if b else 'worse'}{'' if d.clear else ' (noise)'}" for b, d in zip(better, diffs))
    return f"{direction}: each extra loop is {words}"
