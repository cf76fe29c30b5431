"""The statistics module against scipy.stats (a dev dependency), an independent implementation of the
same intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sst

from loopcoder.utils import stats as S


def test_mean_ci_is_a_student_t_interval():
    mean, low, high, n = S.mean_ci([1.0, 2.0, 3.0, 4.0, float("nan")])
    half = 3.182446 * np.std([1, 2, 3, 4], ddof=1) / 2  # t_{0.975, 3} s / sqrt(4)
    assert (mean, n) == (2.5, 4)
    assert low == pytest.approx(2.5 - half) and high == pytest.approx(2.5 + half)
    mean, low, high, n = S.mean_ci([7.0])
    assert mean == 7.0 and n == 1 and math.isnan(low) and math.isnan(high)
    assert S.mean_ci([])[3] == 0


@pytest.mark.parametrize("n", [2, 5, 31, 200])
def test_mean_ci_equals_scipy_t_interval(n):
    x = np.random.default_rng(n).normal(3.0, 2.0, n)
    want = sst.t.interval(0.95, n - 1, loc=x.mean(), scale=sst.sem(x))
    _, low, high, _ = S.mean_ci(x)
    assert (low, high) == pytest.approx(want, abs=1e-6)


def test_t_quantiles_equal_scipy_to_1e6():
    for df in [*range(1, 80), 100, 250, 1000, 100000]:  # the table, then the expansion
        assert S.t_quantile_975(df) == pytest.approx(sst.t.ppf(0.975, df), abs=1e-6), df
    assert S.Z975 == pytest.approx(sst.norm.ppf(0.975), abs=1e-15)
    with pytest.raises(ValueError):
        S.t_quantile_975(0)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 6), (10, 10), (37, 120)])
def test_wilson_interval_equals_scipy(k, n):
    want = sst.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert S.wilson_interval(k, n) == pytest.approx((want.low, want.high), abs=1e-12)
    assert all(math.isnan(v) for v in S.wilson_interval(0, 0))
    assert S.wilson_interval(0, n)[0] == 0.0 and S.wilson_interval(n, n)[1] == 1.0  # exactly, not 1e-17 off


def test_bootstrap_equals_scipy_percentile_bootstrap():
    x = np.random.default_rng(1).integers(-1, 2, 57).astype(np.float64)
    want = sst.bootstrap(
        (x,), np.mean, n_resamples=4000, method="percentile", rng=np.random.default_rng(7), vectorized=True
    ).confidence_interval
    assert S.bootstrap_mean_ci(x, seed=7, resamples=4000) == pytest.approx((want.low, want.high), abs=1e-12)


def test_paired_difference_uses_the_bootstrap_for_accuracy_and_t_otherwise():
    a = np.array([0, 0, 1, 1, 0, 1, 0, 0] * 10, dtype=float)
    b = np.array([1, 1, 1, 1, 1, 1, 0, 1] * 10, dtype=float)
    d = S.paired_difference(a, b, seed=3)
    assert (d.low, d.high) == S.bootstrap_mean_ci(b - a, seed=3)
    c = a + np.linspace(0, 0.3, len(a))
    t = S.paired_difference(a, c)
    assert (t.mean, t.low, t.high, t.n) == S.mean_ci(c - a)
    assert S.paired_difference([], []).n == 0 and math.isnan(S.paired_difference([1.0], [2.0]).low)
