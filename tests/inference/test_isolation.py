"""Requests are isolated in the shared step: what belongs to one request (its parameters, its logits, its
prefill) fails that request only. And sampling survives extreme but valid parameters."""

from __future__ import annotations

import functools

import pytest
import torch

from loopcoder.inference.engine import Engine
from loopcoder.inference.runner import ModelRunner
from loopcoder.inference.sampling import SamplingParams, filter_logits, make_generator, sample_next
from loopcoder.utils.errors import LoopcoderError
from support.models import tiny_model

PROMPTS = [[5, 9, 11, 3, 7, 8, 2], [4, 6, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [30]]


def model():
    return tiny_model(dtype=torch.float32, plt_num_loops=2, eos_token_id=None)


class PoisonedRunner(ModelRunner):
    """Gives the request whose prompt is `bad_prompt` NaN logits from its `after`-th decode step on, or
    fails its prefill (`after=None`)."""

    def __init__(self, *args, bad_prompt, after):
        super().__init__(*args)
        self.bad_prompt, self.after = bad_prompt, after

    def prefill(self, req, n):
        if self.after is None and req.prompt_ids == self.bad_prompt:
            raise torch.OutOfMemoryError("simulated: no memory for this prompt")
        return super().prefill(req, n)

    def decode(self, reqs):
        logits = super().decode(reqs)
        for i, r in enumerate(reqs):
            if r.prompt_ids == self.bad_prompt and self.after is not None and len(r.output_ids) >= self.after:
                logits[i] = float("nan")
        return logits


def PoisonedEngine(*args, bad_prompt, after=2, **kw):
    """The real engine with a `PoisonedRunner`."""
    return Engine(*args, runner=functools.partial(PoisonedRunner, bad_prompt=bad_prompt, after=after), **kw)


@pytest.mark.parametrize("after", [2, None], ids=["nan-logits", "failed-prefill"])
@pytest.mark.parametrize("greedy", [True, False])
def test_one_failing_request_leaves_the_others_as_they_were(after, greedy):
    m = model()
    sp = SamplingParams(max_new_tokens=8) if greedy else SamplingParams(max_new_tokens=8, temperature=0.9, seed=7)
    clean = Engine(m, max_batch=4).generate(PROMPTS, sp)
    engine = PoisonedEngine(m, max_batch=4, bad_prompt=PROMPTS[1], after=after)
    got = engine.generate(PROMPTS, sp)
    bad = got[1]
    assert bad.finish_reason == "error" and bad.error
    assert ("not finite" in bad.error) if after else ("simulated" in bad.error)
    assert len(bad.token_ids) == (after or 0)
    for i in (0, 2, 3):
        assert got[i].token_ids == clean[i].token_ids and got[i].finish_reason == "length"
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_a_failed_request_frees_its_slot_for_the_queue():
    m = model()
    engine = PoisonedEngine(m, max_batch=1, bad_prompt=PROMPTS[0], after=1)
    got = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=5))
    assert got[0].finish_reason == "error"
    assert got[1].token_ids == Engine(m).generate([PROMPTS[1]], SamplingParams(max_new_tokens=5))[0].token_ids


def test_stream_of_a_failed_request_raises_a_clear_error():
    engine = PoisonedEngine(model(), bad_prompt=PROMPTS[0], after=1)
    with pytest.raises(LoopcoderError, match=r"generation failed: .*not finite"):
        list(engine.stream(PROMPTS[0], SamplingParams(max_new_tokens=5)))


def test_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([0.5, 3.0, 2.9, -1.0])
    for top_p in (1e-300, 1e-45, 1e-8):  # 1e-300 and 1e-45 are 0 in fp32
        kept = torch.isfinite(filter_logits(logits, 1.0, 0, top_p))
        assert kept.tolist() == [False, True, False, False]
    params = [SamplingParams(temperature=1.0, top_p=1e-300, seed=s) for s in range(4)]
    tokens, errors = sample_next(logits.repeat(4, 1), params, [make_generator(s) for s in range(4)])
    assert tokens == [1, 1, 1, 1] and not errors


def test_tiny_temperature_does_not_overflow():
    logits = torch.tensor([[1e30, 2e30, -3e38], [5.0, 4.0, 3.0]])
    params = [SamplingParams(temperature=1e-30, seed=0)] * 2
    tokens, errors = sample_next(logits, params, [make_generator(0), make_generator(1)])
    assert tokens == [1, 0] and not errors


def test_rows_that_cannot_be_sampled_fail_alone():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, nan, 0.0], [0.0, 2.0, 1.0], [-inf, -inf, -inf], [0.0, inf, 1.0], [3.0, 1.0, 0.0]])
    params = [
        SamplingParams(),
        SamplingParams(),
        SamplingParams(temperature=1.0, seed=0),
        SamplingParams(temperature=1.0, seed=0),
        SamplingParams(temperature=0.5, top_p=0.1, seed=0),
    ]
    tokens, errors = sample_next(logits, params, [make_generator(0) for _ in params])
    assert sorted(errors) == [0, 2, 3] and all("not finite" in e for e in errors.values())
    assert tokens == [-1, 1, -1, -1, 0]


def test_top_p_one_extreme_request_runs_next_to_others():
    """The request that used to raise inside the shared step (top_p underflows to 0): it now samples its
    most likely token, and the requests beside it are unchanged."""
    m = model()
    plain = SamplingParams(max_new_tokens=6)
    clean = Engine(m, max_batch=4).generate(PROMPTS, plain)
    extreme = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-300, seed=3)
    got = Engine(m, max_batch=4).generate(PROMPTS, [plain, extreme, plain, plain])
    assert [c.token_ids for c in got] == [c.token_ids for c in clean]  # top_p ~ 0 is greedy
