"""Each diagnostic formula against a hand computation on tiny tensors (docs/diagnostics.md)."""

import math

import pytest
import torch

from loopcoder.diagnostics import measures as M


def _with_singular_values(sv, rows=7, cols=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(sv), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(sv), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sv, dtype=torch.float64)) @ v.T


# ----------------------------------------------------------------------------- effective rank
def test_effective_rank_of_known_singular_values():
    assert M.singular_value_entropy_rank(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert M.singular_value_entropy_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    # s = (3, 1) / 4 -> exp(-(0.75 ln 0.75 + 0.25 ln 0.25)) = 1.7548...
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert M.singular_value_entropy_rank(torch.tensor([3.0, 1.0])) == pytest.approx(expected)
    assert M.singular_value_entropy_rank(torch.zeros(3)) == 0.0


def test_effective_rank_of_a_matrix_built_from_its_singular_values():
    x = _with_singular_values([3.0, 1.0])
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert M.effective_rank(x) == pytest.approx(expected, rel=1e-5)
    assert M.effective_rank(_with_singular_values([1.0, 1.0, 1.0])) == pytest.approx(3.0, rel=1e-5)


def test_hidden_effective_rank_ignores_per_token_scale():
    h = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    scaled = h * torch.linspace(0.1, 50.0, 16)[:, None]  # RMS normalisation removes per-row scale
    assert M.hidden_effective_rank(h) == pytest.approx(M.hidden_effective_rank(scaled), rel=1e-4)
    rms = M.rms_normalize(scaled, eps=0.0).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones(16))
    # all tokens in one direction: rank 1
    assert M.hidden_effective_rank(torch.ones(5, 1) * torch.randn(1, 8)) == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- hidden-state steps
def test_step_size_is_mean_token_norm_and_zero_for_identical_loops():
    prev = torch.zeros(2, 2)
    h = torch.tensor([[3.0, 0.0], [3.0, 4.0]])  # token norms 3 and 5
    assert M.step_size(h, prev) == pytest.approx(4.0)
    assert M.step_size(h, h.clone()) == 0.0
    assert M.fixed_point_gap(prev, h) == pytest.approx(4.0)  # ||h - f(h)|| with f(prev) = h


def test_update_cosine_by_hand():
    h2 = torch.zeros(3, 2)  # h(r-2)
    h1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # previous update (1, 0) everywhere
    h = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])  # updates: (0,1) -> 0, (-1,0) -> -1, (1,0) -> 1
    assert M.update_cosine(h, h1, h2) == pytest.approx(0.0)
    assert M.update_cosine(h[1:2], h1[1:2], h2[1:2]) == pytest.approx(-1.0)  # oscillation
    assert M.update_cosine(h[2:], h1[2:], h2[2:]) == pytest.approx(1.0)
    assert M.update_cosine(h1, h1, h2) == 0.0  # a zero update counts as cos 0, not NaN


def test_offset_cost_on_a_hand_made_sequence():
    h = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [0.0, 0.0]])  # neighbour gaps 5, 0, 5
    assert M.offset_cost(h) == pytest.approx(10.0 / 3.0)
    assert M.offset_cost(torch.ones(4, 3)) == 0.0
    assert math.isnan(M.offset_cost(torch.ones(1, 3)))


# ----------------------------------------------------------------------------- attention
def test_attention_entropy_of_known_distributions():
    p = torch.tensor([[[0.5, 0.25, 0.25]]])  # (H=1, S=1, T=3)
    assert M.attention_entropy(p).item() == pytest.approx(1.5 * math.log(2))
    causal_uniform = torch.tril(torch.ones(4, 4)) / torch.arange(1, 5)[:, None]
    expected = sum(math.log(t) for t in range(1, 5)) / 4  # row t uniform over t+1 keys
    assert M.attention_entropy(causal_uniform[None]).item() == pytest.approx(expected)
    one_hot = torch.eye(3)[None]
    assert M.attention_entropy(one_hot).item() == 0.0


def test_attention_kl_by_hand():
    p = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])  # (H=1, S=2, T=2)
    q = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]])
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = math.log(2.0)
    assert M.attention_kl(p, q) == pytest.approx((row0 + row1) / 2)  # 1/(H S) sum
    assert M.attention_kl(p, p.clone()) == 0.0
    # a reference that underflowed to 0 gives a large but finite KL
    assert math.isfinite(M.attention_kl(q, p))
    with pytest.raises(ValueError):
        M.attention_kl(p, q[..., :1])


def test_head_similarity_identical_and_disjoint_heads():
    a = torch.softmax(torch.randn(1, 5, 5), -1)
    cos, mean_cos, erank = M.head_similarity(a.repeat(3, 1, 1))
    assert mean_cos == pytest.approx(1.0) and erank == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(cos, torch.ones(3, 3))
    disjoint = torch.eye(3)[:, None, :].repeat(1, 1, 1)  # head i attends only to key i
    cos, mean_cos, erank = M.head_similarity(disjoint)
    assert mean_cos == pytest.approx(0.0) and erank == pytest.approx(3.0)
    two = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]])  # cosine 0.6 by construction
    assert M.head_similarity(two)[1] == pytest.approx(0.6)


# ----------------------------------------------------------------------------- output
def test_gold_rank_on_a_hand_made_logit_vector():
    logits = torch.tensor([[0.1, 2.0, 0.5, 2.0], [0.1, 2.0, 0.5, 2.0]])
    ranks = M.gold_rank(logits, torch.tensor([2, 1]))
    assert ranks.tolist() == [3, 1]  # two scores above 0.5; a tie with the top counts as rank 1
    assert M.gold_rank(logits[:1], torch.tensor([0])).tolist() == [4]


def test_output_entropy_and_delta_p():
    uniform = torch.log_softmax(torch.zeros(2, 8), -1)
    torch.testing.assert_close(M.output_entropy(uniform), torch.full((2,), math.log(8)))
    p = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))  # a zero-probability token contributes nothing
    q = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    assert M.output_kl(p, q).item() == pytest.approx(math.log(2))
    assert M.output_entropy(p).item() == pytest.approx(math.log(2))
    assert M.output_kl(q, q).item() == 0.0


def test_peak_loop_on_a_made_up_delta_p_table():
    dp = torch.tensor(
        [
            [0.1, 0.5, 0.3],  # loop 2
            [0.4, 0.2, 0.3],  # loop 3
            [0.2, 0.1, 0.3],
        ]
    )  # loop 4
    assert M.peak_loop(dp).tolist() == [3, 2, 2]  # column 3 is a three-way tie: the earliest loop


def test_shares():
    assert M.shares([1.0, 3.0]) == [0.25, 0.75]
    assert all(math.isnan(x) for x in M.shares([0.0, 0.0]))
