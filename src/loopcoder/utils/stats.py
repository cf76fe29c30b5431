"""The statistics every report uses: 95 % intervals of a mean, a proportion and a paired difference.

Evaluation (accuracy and answer NLL), the loop diagnostics (per-loop measures) and the study (paired
comparisons between loop counts) all take their intervals from here. No scipy at run time: with scipy
installed, `import transformers` also imports `scipy.optimize` (about 0.8 s of CPU on every command),
and what we need is a t table, the Wilson formula and a percentile bootstrap. The tests check all
three against `scipy.stats` (a dev dependency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Two-sided 95 % Student t quantiles t_{0.975, df}, df = 1..30 (exact to 6 digits).
_T975 = (
    12.706205,
    4.302653,
    3.182446,
    2.776445,
    2.570582,
    2.446912,
    2.364624,
    2.306004,
    2.262157,
    2.228139,
    2.200985,
    2.178813,
    2.160369,
    2.144787,
    2.131450,
    2.119905,
    2.109816,
    2.100922,
    2.093024,
    2.085963,
    2.079614,
    2.073873,
    2.068658,
    2.063899,
    2.059539,
    2.055529,
    2.051831,
    2.048407,
    2.045230,
    2.042272,
)
Z975 = 1.959963984540054  # the two-sided 95 % normal quantile


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the table for df <= 30, the Cornish-Fisher expansion beyond (error < 1e-6)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = Z975, float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4)
    )


def mean_ci(values: Sequence[float] | np.ndarray) -> tuple[float, float, float, int]:
    """Mean and 95 % Student t interval over the finite values: (mean, low, high, n). n = 0 gives NaNs;
    n = 1 a mean with a NaN interval."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n == 1:
        return mean, math.nan, math.nan, 1
    half = t_quantile_975(n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def wilson_interval(successes: int, n: int, z: float = Z975) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (well behaved at 0 and n, unlike the normal one)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exactly 0 (n) at 0 (n) successes, where rounding could leave the bound a hair inside the point estimate
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def bootstrap_mean_ci(x: np.ndarray, seed: int = 0, resamples: int = 4000) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean of `x` (what `scipy.stats.bootstrap(...,
    method="percentile")` gives with the same generator)."""
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


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


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = 0, resamples: int = 4000) -> Difference:
    """b - a, item by item (every model answers the same items, which cancels the items' own difficulty):
    a t interval for continuous values, a bootstrap interval when every value is 0 or 1 (accuracy),
    where the t interval misbehaves near 0 and 1."""
    x = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Difference(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return Difference(mean, math.nan, math.nan, 1)
    binary = set(np.unique(np.concatenate([np.asarray(a), np.asarray(b)])).tolist()) <= {0.0, 1.0}
    if binary:
        return Difference(mean, *bootstrap_mean_ci(x, seed, resamples), n)
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
