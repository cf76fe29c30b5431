"""Log-probabilities and vLLM's logit adjustments (logit_bias, presence/frequency/repetition penalties), each
against a slow reference written here: the whole sequence recomputed by the model for every token, the
penalties applied by hand one vocabulary entry at a time. Batches give what each request gets alone."""

from __future__ import annotations

import pytest
import torch

from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import LogitAdjustments, SamplingParams, log_probs
from loopcoder.utils.errors import LoopcoderError
from support.models import tiny_model

VOCAB = 61


def model():
    return tiny_model(dtype=torch.float64, plt_num_loops=2, eos_token_id=None)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(m, tokens: list[int]) -> torch.Tensor:
    """The model's next-token logits after every position of `tokens` (one forward, no cache)."""
    with torch.no_grad():
        return m(torch.tensor([tokens])).logits[0].double()


def by_hand(logits: list[float], params: SamplingParams, prompt_ids: list[int], output: list[int]) -> list[float]:
    """vLLM's logit_bias, then repetition, frequency and presence penalties, one entry at a time."""
    out = list(logits)
    for token, bias in (params.logit_bias or {}).items():
        out[token] += max(-100.0, min(100.0, bias))
    for t in range(len(out)):
        count = output.count(t)
        if params.repetition_penalty != 1.0 and (count or t in prompt_ids):
            out[t] = out[t] / params.repetition_penalty if out[t] > 0 else out[t] * params.repetition_penalty
        out[t] -= params.frequency_penalty * count
        out[t] -= params.presence_penalty * (count > 0)
    return out


def reference_greedy(m, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    out: list[int] = []
    for _ in range(params.max_new_tokens):
        row = full_logits(m, prompt_ids + out)[-1].tolist()
        adjusted = by_hand(row, params, prompt_ids, out)
        out.append(max(range(len(adjusted)), key=adjusted.__getitem__))
    return out


PENALTIES = [
    dict(presence_penalty=1.5),
    dict(frequency_penalty=0.7),
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6, presence_penalty=-0.5),
    dict(logit_bias={7: 3.0, 8: -200.0}, frequency_penalty=2.0),  # -200 is clamped to -100, as vLLM does
    dict(presence_penalty=2.0, frequency_penalty=-1.0, repetition_penalty=1.3, logit_bias={20: 1.0}),
]


def test_adjustments_equal_the_hand_computation_on_random_logits():
    g = torch.Generator().manual_seed(0)
    for params in [SamplingParams(**p) for p in PENALTIES]:
        prompt_ids = torch.randint(0, VOCAB, (12,), generator=g).tolist()
        output = torch.randint(0, VOCAB, (30,), generator=g).tolist()
        logits = torch.randn(VOCAB, generator=g, dtype=torch.float32) * 3
        adjust = LogitAdjustments(params, prompt_ids, VOCAB)
        for t in output:
            adjust.record(t)
        row = logits.clone()
        adjust.apply(row)
        want = by_hand(logits.tolist(), params, prompt_ids, output)
        assert row.tolist() == pytest.approx(want, rel=1e-6, abs=1e-5)


def test_neutral_parameters_leave_the_logits_alone():
    assert LogitAdjustments.for_request(SamplingParams(), [1, 2], VOCAB) is None
    assert not SamplingParams(logit_bias={}, presence_penalty=0.0, repetition_penalty=1.0).adjusts_logits


@pytest.mark.parametrize("penalties", PENALTIES, ids=lambda p: ",".join(p))
def test_penalized_greedy_decoding_equals_the_slow_reference(penalties):
    m = model()
    params = SamplingParams(max_new_tokens=12, **penalties)
    for p in (prompt(9, 1), prompt(4, 2)):
        assert Engine(m, max_batch=1).generate([p], params)[0].token_ids == reference_greedy(m, p, params)


def test_each_request_of_a_batch_gets_its_own_penalties_and_sampling():
    m = model()
    prompts = [prompt(5 + i, 10 + i) for i in range(len(PENALTIES))]
    params = [SamplingParams(max_new_tokens=10, **p) for p in PENALTIES]
    sampled = [SamplingParams(max_new_tokens=10, temperature=0.9, seed=s, **p) for s, p in enumerate(PENALTIES)]
    for plist in (params, sampled):
        alone = [Engine(m, max_batch=1).generate([p], sp)[0].token_ids for p, sp in zip(prompts, plist)]
        together = [c.token_ids for c in Engine(m, max_batch=8).generate(prompts, plist)]
        assert together == alone
    # and the penalties change something: the same prompts without them decode otherwise
    plain = [c.token_ids for c in Engine(m, max_batch=8).generate(prompts, SamplingParams(max_new_tokens=10))]
    assert plain != [c.token_ids for c in Engine(m, max_batch=8).generate(prompts, params)]


def test_a_logit_bias_outside_the_vocabulary_is_refused():
    engine = Engine(model())
    with pytest.raises(LoopcoderError, match="outside the vocabulary"):
        engine.add_request([1, 2], SamplingParams(logit_bias={VOCAB: 1.0}))
    with pytest.raises(LoopcoderError, match="logit_bias keys"):
        SamplingParams(logit_bias={-1: 1.0}).validate()
    with pytest.raises(LoopcoderError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5).validate()


def test_generated_tokens_logprobs_equal_the_full_forward_alone_or_batched():
    m = model()
    prompts = [prompt(7, 3), prompt(12, 4), prompt(3, 5)]
    params = [
        SamplingParams(max_new_tokens=8, logprobs=3),
        SamplingParams(max_new_tokens=8, logprobs=0, presence_penalty=2.0),  # reported before the penalty
        SamplingParams(max_new_tokens=8, logprobs=5, temperature=1.0, seed=1),
    ]
    for max_batch in (1, 3):
        engine = Engine(m, max_batch=max_batch, block_size=4, max_step_tokens=6)
        events = []
        done = engine.generate(prompts, params, on_event=events.append)
        for p, sp, c in zip(prompts, params, done):
            got = [lp for ev in events if ev.request.prompt_ids == p for lp in ev.logprobs or []]
            assert [lp.token for lp in got] == c.token_ids and len(got) == 8
            want = log_probs(full_logits(m, p + c.token_ids)[len(p) - 1 : -1])
            for i, lp in enumerate(got):
                assert lp.logprob == pytest.approx(want[i, lp.token].item(), abs=1e-5)
                top = torch.topk(want[i], sp.logprobs)
                assert [t for t, _ in lp.top] == top.indices.tolist()
                assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("cached_prefix", [False, True])
def test_prompt_logprobs_equal_the_full_forward_through_chunks_and_the_prefix_cache(cached_prefix):
    """Every prompt token after the first gets its log-probability under the tokens before it, whatever the
    chunking (budget 5) and even when the prompt's prefix is in the prefix cache (a scoring request recomputes
    it: the cache keeps no logits). max_new_tokens 0 scores without generating."""
    m = model()
    p = prompt(30, 6)
    engine = Engine(m, max_batch=2, block_size=4, max_step_tokens=5)
    if cached_prefix:
        engine.generate([[*p[:24], 9, 9]], SamplingParams(max_new_tokens=2))
        assert engine.cache_stats()["blocks_cached"] >= 6
    events = []
    reqs = [
        engine.add_request(p, SamplingParams(max_new_tokens=0, prompt_logprobs=2)),
        engine.add_request(p, SamplingParams(max_new_tokens=3, prompt_logprobs=0, logprobs=1)),
        engine.add_request(p, SamplingParams(max_new_tokens=3)),  # the same prompt, no scoring: it may share
    ]
    while engine.has_work():
        events += engine.step()
    want = log_probs(full_logits(m, p))
    for req, k in zip(reqs[:2], (2, 0)):
        got = req.prompt_logprobs
        assert len(got) == len(p) and got[0] is None
        for t in range(1, len(p)):
            assert got[t].token == p[t]
            assert got[t].logprob == pytest.approx(want[t - 1, p[t]].item(), abs=1e-9)
            assert [x for x, _ in got[t].top] == torch.topk(want[t - 1], k).indices.tolist()
        first = next(ev for ev in events if ev.request is req)
        assert first.prompt_logprobs is got  # delivered with the request's first event
    assert reqs[0].finish_reason == "length" and reqs[0].output_ids == []
    assert reqs[1].output_ids == reqs[2].output_ids  # scoring changes nothing about the tokens
    assert reqs[0].cached_tokens == reqs[1].cached_tokens == 0  # the scoring requests computed every position
    if cached_prefix:
        assert reqs[2].cached_tokens >= 24  # the plain one resumed from the cache


def test_max_new_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(LoopcoderError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0).validate()
    SamplingParams(max_new_tokens=0, prompt_logprobs=0).validate()


def test_a_scoring_request_preempted_mid_prefill_scores_every_token_once():
    """Preempted halfway through its prompt, a scoring request is recomputed from the start, in chunks of another
    size: the tokens already scored keep their entries, the others get theirs, and all equal the full forward."""
    m = model()
    p = prompt(33, 7)
    engine = Engine(m, max_batch=2, block_size=4, max_step_tokens=5)
    req = engine.add_request(p, SamplingParams(max_new_tokens=2, prompt_logprobs=1))
    for _ in range(3):
        engine.step()
    assert req.state == "prefill" and 1 < len(req.prompt_logprobs) < len(p)
    engine._preempt(req)
    engine.max_step_tokens = 8  # the recomputation's chunks start and end elsewhere
    while engine.has_work():
        engine.step()
    want = log_probs(full_logits(m, p))
    assert len(req.prompt_logprobs) == len(p) and req.preemptions == 1
    assert [e.token for e in req.prompt_logprobs[1:]] == p[1:]
    for t in range(1, len(p)):
        assert req.prompt_logprobs[t].logprob == pytest.approx(want[t - 1, p[t]].item(), abs=1e-9)
