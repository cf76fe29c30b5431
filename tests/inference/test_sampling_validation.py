"""`SamplingParams.validate`: values that cannot be sampled as asked in float32 are refused, naming the field."""

from __future__ import annotations

import math

import pytest
import torch

from loopcoder.inference.sampling import SamplingParams, filter_logits
from loopcoder.utils.errors import LoopcoderError


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_p", 0.0),
        ("top_p", math.nan),
        ("top_p", 1.5),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", 1e-300),  # 0 in float32: the logits would be divided by zero
        ("temperature", -1.0),
        ("seed", 2**70),  # torch generators take 64 bits
        ("seed", -1),
        ("top_k", -1),
        ("max_new_tokens", 0),
    ],
)
def test_values_that_cannot_be_sampled_are_refused_by_name(field, value):
    with pytest.raises(LoopcoderError, match=f"^{field} must be"):
        SamplingParams(**{field: value}).validate()


def test_the_extremes_it_accepts_sample_without_nan():
    """What validate lets through, the sampler can do: the bound is where float32 breaks, not a guess."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 30
    tiny = torch.finfo(torch.float32).tiny
    for p in (
        SamplingParams(temperature=tiny, top_p=1.0),
        SamplingParams(temperature=1.0, top_p=1e-300),
        SamplingParams(temperature=tiny, top_p=1e-300, top_k=3, seed=2**64 - 1),
    ):
        p.validate()
        probs = filter_logits(logits, p.temperature, p.top_k, p.top_p).softmax(-1)
        assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)
        assert probs.argmax() == logits.argmax()
    assert SamplingParams(temperature=0.0).validate().greedy
