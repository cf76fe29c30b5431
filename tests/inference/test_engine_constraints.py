"""Constrained requests in the engine: a random model's output always validates, the mask applies from the
first token (the one sampled after prefill), a complete grammar ends the request, a length limit is reported
honestly, and constrained and free requests in one batch each get what they get alone."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from loopcoder.inference.constraints import Constraint, ConstraintError
from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.model.loading import load_for_inference
from loopcoder.utils.errors import LoopcoderError
from support.constraints import SCHEMAS
from support.serving import build_model_dir

EOS, IM_END = 2, 4


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_for_inference(str(build_model_dir(tmp_path_factory.mktemp("model"))))


@pytest.fixture
def engine(loaded):
    model, tok = loaded
    return Engine(model, tok, max_batch=4)


def prompt(tok, text="Answer in JSON: "):
    return tok(text, add_special_tokens=False)["input_ids"]


def params(seed=None, constraint=None, max_new_tokens=200, **kw):
    temperature = 0.0 if seed is None else 1.0
    return SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, constraint=constraint, **kw
    )


def test_a_random_model_constrained_always_validates(engine, loaded):
    tok = loaded[1]
    for name, schema in SCHEMAS.items():
        c = Constraint.json_schema(schema)
        # A budget every schema fits in: its strings are bounded in characters, but a random model may spell
        # each character as up to 4 byte tokens (nested: 40 characters of strings, ~160 tokens, plus syntax).
        budget = [params(None, c, max_new_tokens=1000)] + [params(s, c, max_new_tokens=1000) for s in range(5)]
        out = engine.generate([prompt(tok)] * 6, budget)
        for o in out:
            assert o.finish_reason == "stop", (name, o.text)
            jsonschema.validate(json.loads(o.text), schema)
            assert tok.decode(o.token_ids) == o.text


def test_the_first_token_is_masked_and_a_complete_grammar_ends_the_request(engine, loaded):
    tok = loaded[1]
    free = engine.generate([prompt(tok, "x")], params(max_new_tokens=3))[0]
    assert not free.text.startswith("Z")
    [out] = engine.generate([prompt(tok, "x")], params(constraint=Constraint.regex("Z[0-9]{2}")))
    assert re.fullmatch("Z[0-9]{2}", out.text) and out.finish_reason == "stop"
    assert len(out.token_ids) == 3  # ends at the match: no end token sampled, none appended


def test_where_the_grammar_may_go_on_a_stop_token_ends_it(engine, loaded):
    tok = loaded[1]
    c = Constraint.regex("[0-9]{1,40}")
    outs = engine.generate([prompt(tok)] * 8, [params(s, c, stop_token_ids=[IM_END]) for s in range(8)])
    for o in outs:
        assert re.fullmatch("[0-9]{1,40}", o.text) and o.finish_reason == "stop"
        assert IM_END not in o.token_ids
    assert any(len(o.token_ids) < 40 for o in outs)  # some ended by choosing the stop token


def test_the_length_limit_is_reported_honestly_with_a_valid_prefix(engine, loaded):
    tok = loaded[1]
    schema = SCHEMAS["nested"]
    c = Constraint.json_schema(schema)
    for seed in range(4):
        [o] = engine.generate([prompt(tok)], params(seed, c, max_new_tokens=6))
        assert o.finish_reason == "length" and len(o.token_ids) == 6
        with pytest.raises(ValueError):
            json.loads(o.text)
        m = engine.grammars.matcher(c, [EOS])
        for t in o.token_ids:  # every token so far was allowed: the output is the start of a valid document
            m.accept(t)


def test_constrained_and_free_requests_in_one_batch_get_what_they_get_alone(loaded):
    model, tok = loaded
    json_c = Constraint.json_schema(SCHEMAS["flat"])
    regex_c = Constraint.regex("(yes|no), [a-z]{1,8}")
    jobs = [
        (prompt(tok, "a"), params(None, json_c)),
        (prompt(tok, "bb"), params(3, None, max_new_tokens=30)),
        (prompt(tok, "a"), params(5, regex_c)),
        (prompt(tok, "def f("), params(None, None, max_new_tokens=25)),
        (prompt(tok, "a"), params(7, json_c)),
        (prompt(tok, "z"), params(1, regex_c)),
    ]
    alone = [Engine(model, tok, max_batch=1).generate([p], sp)[0] for p, sp in jobs]
    together = Engine(model, tok, max_batch=4).generate([p for p, _ in jobs], [sp for _, sp in jobs])
    for a, b in zip(alone, together):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
    # and a free request's output does not depend on whether constrained ones run beside it
    free_only = Engine(model, tok, max_batch=4).generate([jobs[1][0], jobs[3][0]], [jobs[1][1], jobs[3][1]])
    assert [o.token_ids for o in free_only] == [together[1].token_ids, together[3].token_ids]


def test_samples_sharing_a_prefill_each_get_their_own_mask(loaded):
    """n samples of one prompt share its prefill logits; masking one sample's copy must not touch another's."""
    model, tok = loaded
    p = prompt(tok)
    jobs = [
        params(None, Constraint.regex("[0-9]{3}")),
        params(None, None, max_new_tokens=5),
        params(None, Constraint.regex("[a-f]{3}")),
    ]
    together = Engine(model, tok, max_batch=3).generate([p] * 3, jobs)
    alone = [Engine(model, tok, max_batch=1).generate([p], sp)[0] for sp in jobs]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert re.fullmatch("[0-9]{3}", together[0].text) and re.fullmatch("[a-f]{3}", together[2].text)


def test_a_grammar_that_fails_fails_its_request_alone(loaded, monkeypatch):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=3)
    c = Constraint.json_schema(SCHEMAS["flat"])
    clean = Engine(model, tok, max_batch=3).generate([prompt(tok)] * 2, [params(1, c), params(2, None)])
    reqs = [
        engine.add_request(prompt(tok), params(1, c)),
        engine.add_request(prompt(tok), params(2, None)),
        engine.add_request(prompt(tok), params(3, c)),
    ]
    broken = reqs[2].grammar
    calls = {"n": 0}
    real_fill = type(broken).fill

    def fill(self, row):
        if self is broken:
            calls["n"] += 1
            if calls["n"] == 3:
                raise ConstraintError("the grammar failed: simulated")
        return real_fill(self, row)

    monkeypatch.setattr(type(broken), "fill", fill)
    while engine.has_work():
        engine.step()
    assert reqs[2].finish_reason == "error" and "simulated" in reqs[2].error and len(reqs[2].output_ids) == 2
    assert [r.output_ids for r in reqs[:2]] == [o.token_ids for o in clean]


def test_a_constraint_needs_a_tokenizer_and_a_bad_one_is_refused_at_once(loaded):
    model, tok = loaded
    with pytest.raises(LoopcoderError, match="tokenizer"):
        Engine(model, max_batch=1).add_request([5, 6], params(constraint=Constraint.json_object()))
    engine = Engine(model, tok, max_batch=1)
    with pytest.raises(LoopcoderError, match="Invalid type"):
        engine.add_request([5, 6], params(constraint=Constraint.json_schema({"type": "wat"})))
    with pytest.raises(LoopcoderError, match="Constraint"):
        engine.add_request([5, 6], params(constraint={"type": "object"}))
    assert engine.num_waiting == 0


def test_engine_stream_of_a_constrained_request(engine, loaded):
    tok = loaded[1]
    c = Constraint.json_schema(SCHEMAS["choice"])
    pieces = list(engine.stream(prompt(tok), params(4, c)))
    [whole] = engine.generate([prompt(tok)], params(4, c))
    assert "".join(pieces) == whole.text
    jsonschema.validate(json.loads(whole.text), SCHEMAS["choice"])


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEMAS)
def test_many_seeds_always_validate(loaded, name):
    """The big sweep: 64 seeds per schema, in batches of 8 (so each also shares its steps with the others)."""
    model, tok = loaded
    engine = Engine(model, tok, max_batch=8)
    schema = SCHEMAS[name]
    c = Constraint.json_schema(schema)
    prompts = [prompt(tok, f"Example {k}: ") for k in range(64)]
    for o in engine.generate(prompts, [params(s, c, max_new_tokens=300) for s in range(64)]):
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), schema)


def test_greedy_is_deterministic_under_a_constraint(engine, loaded):
    tok = loaded[1]
    c = Constraint.json_schema(SCHEMAS["nested"])
    a = engine.generate([prompt(tok)], params(None, c))[0]
    b = engine.generate([prompt(tok)], params(None, c))[0]
    assert a.token_ids == b.token_ids
    assert torch.is_inference_mode_enabled() is False  # the engine's inference mode does not leak
