"""pass@k: the unbiased estimator against hand-computed values and exact binomials, and its bad input."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest

from loopcoder.evaluation.passk import mean_pass_at_k, pass_at_k
from loopcoder.utils.errors import LoopcoderError


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (10, 3, 1, 0.3),  # pass@1 is the fraction correct
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 1, 4, 1.0),  # k = n: the one correct sample is always drawn
        (4, 0, 4, 0.0),  # k = n, c = 0
        (6, 6, 3, 1.0),  # c = n
        (6, 0, 3, 0.0),  # c = 0
        (6, 4, 3, 1.0),  # n - c < k: every draw contains a correct one
        (20, 1, 10, 0.5),  # 1 - C(19,10)/C(20,10) = 1 - 10/20
    ],
)
def test_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_matches_exact_binomials_on_a_grid():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(comb(n - c, k), comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15), (n, c, k)


def test_large_n_is_stable():
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001, rel=1e-12)
    assert pass_at_k(1000, 1, 1000) == 1.0
    assert pass_at_k(10_000, 5, 100) == pytest.approx(
        float(1 - Fraction(comb(9995, 100), comb(10_000, 100))), rel=1e-10
    )
    assert 0.0 <= pass_at_k(100_000, 3, 7) <= 1.0


def test_k_greater_than_n_is_one_clear_error():
    with pytest.raises(LoopcoderError, match=r"pass@5 needs at least k=5 samples per problem, but n=3"):
        pass_at_k(3, 1, 5)


@pytest.mark.parametrize(
    "n, c, k, words",
    [
        (0, 0, 1, "n"),
        (3, 4, 1, "c"),
        (3, -1, 1, "c"),
        (3, 1, 0, "k"),
        (3, 1, 1.0, "whole"),
        (True, 1, 1, "whole"),
    ],
)
def test_other_bad_input(n, c, k, words):
    with pytest.raises(LoopcoderError, match=words):
        pass_at_k(n, c, k)


def test_mean_over_problems_for_each_k():
    counts = {"HumanEval/0": (4, 4), "HumanEval/1": (4, 0), "HumanEval/2": (4, 1)}
    scores = mean_pass_at_k(counts, [1, 2, 4])
    assert list(scores) == [1, 2, 4]
    assert scores[1] == pytest.approx((1 + 0 + 0.25) / 3)
    assert scores[2] == pytest.approx((1 + 0 + 0.5) / 3)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert scores[4] == pytest.approx((1 + 0 + 1) / 3)
    assert mean_pass_at_k([(2, 1), (2, 2)], [1]) == {1: pytest.approx(0.75)}


def test_mean_names_the_problem_short_of_samples():
    counts = {"HumanEval/0": (10, 4), "HumanEval/7": (3, 1)}
    with pytest.raises(LoopcoderError, match=r"pass@5 .* HumanEval/7 has n=3"):
        mean_pass_at_k(counts, [1, 5])
    with pytest.raises(LoopcoderError, match="no k"):
        mean_pass_at_k(counts, [])
    with pytest.raises(LoopcoderError, match="no problems"):
        mean_pass_at_k({}, [1])
