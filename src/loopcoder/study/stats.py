"""The study's own statistics, on top of `loopcoder.utils.stats`: differences paired by seed and item, the
effective depth, and comparisons put into words that claim only what the intervals support."""

from __future__ import annotations

import numpy as np

from loopcoder.utils.stats import Difference


def crossed_difference(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = 4000) -> Difference:
    """b - a for outcomes of shape (seeds, items), paired by seed (the same init and data) and by item
    (the same held-out item): the mean and a 95 % bootstrap interval that resamples seeds and items
    together, so the interval carries the seed-to-seed spread as well as the items' sampling noise.
    With one seed it is the items' bootstrap."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"expected outcomes of shape (seeds, items), got {d.shape}")
    s, n = d.shape
    mean = float(d.mean())
    if s * n == 1:
        return Difference(mean, float("nan"), float("nan"), 1)
    rng = np.random.default_rng(seed)
    # a resample's mean is w_seeds^T d w_items / (s n), with multinomial counts as the weights
    w_seeds = rng.multinomial(s, np.full(s, 1 / s), size=resamples).astype(np.float64)
    w_items = rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(np.float64)
    means = ((w_seeds @ d) * w_items).sum(axis=1) / (s * n)
    low, high = np.quantile(means, [0.025, 0.975])
    return Difference(mean, float(low), float(high), s * n)


def effective_depth(accuracy: dict[int, float], threshold: float = 0.9) -> int:
    """The largest k such that every k' <= k was solved at >= `threshold` (0: not even k = 1)."""
    depth = 0
    for k in sorted(accuracy):
        if k != depth + 1 or accuracy[k] < threshold:
            break
        depth = k
    return depth


def compare_in_words(b: str, a: str, diffs: dict[int, Difference], scale: float = 100, unit: str = " points") -> str:
    """One sentence on b - a across k, claiming only what the intervals support: "beats ... beyond
    noise" only at the k whose interval lies above 0, "is worse ... beyond noise" only below."""

    def cells(ks: list[int]) -> str:
        return "; ".join(f"k={k}: {diffs[k].describe(unit=unit, scale=scale, digits=1).split(' (')[0]}" for k in ks)

    ks = sorted(diffs)
    better = [k for k in ks if diffs[k].clear and diffs[k].mean > 0]
    worse = [k for k in ks if diffs[k].clear and diffs[k].mean < 0]
    parts = []
    if better:
        parts.append(f"{b} beats {a} beyond noise at {_ks(better)} ({cells(better)})")
    if worse:
        parts.append(f"{b} is worse than {a} beyond noise at {_ks(worse)} ({cells(worse)})")
    if not parts:
        finite = [k for k in ks if np.isfinite(diffs[k].mean)]
        if not finite:
            return f"{b} and {a} cannot be compared (no items)"
        k = max(finite, key=lambda k: abs(diffs[k].mean))
        return f"{b} and {a} do not differ beyond noise at any k (largest gap {cells([k])})"
    rest = [k for k in ks if k not in better and k not in worse]
    return "; ".join(parts) + (f"; within noise at {_ks(rest)}" if rest else "")


def _ks(ks: list[int]) -> str:
    return "k = " + ", ".join(map(str, ks))
