"""pass@k: the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code".

With n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that k samples drawn
without replacement from the n include a passing one. The ratio of binomials is computed as the
product prod_{i=n-c+1..n} (1 - k/i), which neither overflows nor loses precision for large n.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from loopcoder.utils.errors import LoopcoderError


def _whole(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LoopcoderError(f"pass@k: {name} must be a whole number, got {value!r}")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c of them correct."""
    n, c, k = _whole("n", n), _whole("c", c), _whole("k", k)
    if n < 1:
        raise LoopcoderError(f"pass@k: n (samples per problem) must be at least 1, got {n}")
    if not 0 <= c <= n:
        raise LoopcoderError(f"pass@k: c (correct samples) must be between 0 and n={n}, got {c}")
    if k < 1:
        raise LoopcoderError(f"pass@k: k must be at least 1, got {k}")
    if k > n:
        raise LoopcoderError(f"pass@{k} needs at least k={k} samples per problem, but n={n}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(
    counts: Mapping[str, tuple[int, int]] | Sequence[tuple[int, int]], ks: Iterable[int]
) -> dict[int, float]:
    """pass@k averaged over problems, for each k asked for; counts are (n, c) per problem.

    Every k must be at most every problem's n: one error names the k and the problem short of samples.
    """
    items = (
        list(counts.items()) if isinstance(counts, Mapping) else [(f"problem {i}", nc) for i, nc in enumerate(counts)]
    )
    ks = [_whole("k", k) for k in ks]
    if not items:
        raise LoopcoderError("pass@k: no problems to average over")
    if not ks:
        raise LoopcoderError("pass@k: no k asked for")
    name, (n_min, _) = min(items, key=lambda item: item[1][0])
    for k in sorted(set(ks)):
        if k > n_min:
            raise LoopcoderError(
                f"pass@{k} needs at least k={k} samples per problem, but {name} has n={n_min} "
                f"(generate at least {k} samples, or ask for k <= {n_min})"
            )
    return {k: sum(pass_at_k(n, c, k) for _, (n, c) in items) / len(items) for k in dict.fromkeys(ks)}
