"""The whole OpenAI request surface on a live server with a tiny random model: every parameter of the installed
`openai` package has a place here, log-probabilities (chat and completions, echo for lm-evaluation-harness)
equal the model's own, penalties and logit_bias do what the engine does, and bad schemas are 400s that say
why without internal state."""

from __future__ import annotations

import json
import typing

import httpx
import openai
import pytest
import torch
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.model.loading import load_for_inference
from loopcoder.serving.protocol import ChatRequest, CompletionRequest
from loopcoder.serving.server import load_app
from support.serving import LiveServer

PROMPT = "def step(self, tokens):\n    "
USER = [{"role": "user", "content": "Write a loop."}]


@pytest.fixture(scope="module")
def live(model_dir):
    app, scheduler = load_app(str(model_dir), max_batch=4, max_queue=8, model_name="tiny", max_tokens=64)
    with LiveServer(app, scheduler) as server:
        yield server


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same weights outside the server (float32), for the slow references."""
    return load_for_inference(str(model_dir))


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(live, path, body):
    return httpx.post(live.url + path, json=body, timeout=60)


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


# ---------------------------------------------------------------------------------------------- the surface
@pytest.mark.parametrize(
    ("params", "request_type", "extra"),
    [
        (chat_create_params.CompletionCreateParamsBase, ChatRequest, {"stream"}),
        (completion_create_params.CompletionCreateParamsBase, CompletionRequest, {"stream"}),
    ],
)
def test_every_parameter_of_the_openai_api_has_a_field(params, request_type, extra):
    """A new parameter in the `openai` package fails here until it is honoured, ignored or refused on purpose."""
    names = set(typing.get_type_hints(params)) | extra
    assert names <= set(request_type.model_fields), names - set(request_type.model_fields)


def test_a_request_with_every_chat_parameter_is_answered(live, client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be brief.", "prompt_cache_breakpoint": {}}]},
            *USER,
        ],
        max_completion_tokens=6,
        temperature=0.7,
        top_p=0.9,
        n=2,
        seed=3,
        stop=["\n\n\n"],
        presence_penalty=0.3,
        frequency_penalty=0.2,
        logit_bias={"5": -2},
        logprobs=True,
        top_logprobs=2,
        user="user-1",
        metadata={"team": "tools"},
        safety_identifier="hash-1",
        store=True,  # ignored, and every other ignored one below
        service_tier="auto",
        prompt_cache_key="k",
        prompt_cache_retention="24h",
        verbosity="low",
        reasoning_effort="low",
        prediction={"type": "content", "content": "for i in"},
        web_search_options={},
        modalities=["text"],
        parallel_tool_calls=False,
        response_format={"type": "text"},
        extra_body={"prompt_cache_options": {"mode": "implicit"}, "top_k": 20, "repetition_penalty": 1.1},
    )
    assert len(r.choices) == 2 and r.usage.completion_tokens <= 12
    for c in r.choices:
        assert len(c.logprobs.content) >= 1 and all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    r = post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2, "best_of": 1, "user": "u", "echo": False})
    assert r.status_code == 200, r.text


def test_unknown_names_are_still_refused_naming_them(live):
    for path, body in [
        ("/v1/chat/completions", {"messages": USER, "stor": False}),
        ("/v1/completions", {"prompt": "x", "metadata": {"a": "b"}}),  # a chat parameter, not a completions one
        ("/v1/chat/completions", {"messages": USER, "stream_options": {"include_usage": True, "extra": 1}}),
    ]:
        r = post(live, path, body)
        assert r.status_code == 400 and "Unrecognized request argument" in r.json()["error"]["message"], r.text


# ---------------------------------------------------------------------------------------------- logprobs
def test_echo_with_max_tokens_0_scores_the_prompt_as_the_model_does(live, reference):
    """lm-evaluation-harness's log-likelihoods: the prompt's tokens with their log-probabilities (the first has
    none), nothing generated; equal to one forward of the model over the prompt."""
    model, tok = reference
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    want = full_logprobs(model, ids)
    for prompt in (PROMPT, ids):  # as text or as token ids
        r = post(live, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
        assert lp["tokens"] == [tok.decode([t]) for t in ids] and len(lp["token_logprobs"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for t in range(1, len(ids)):
            assert lp["token_logprobs"][t] == pytest.approx(want[t - 1, ids[t]].item(), abs=1e-4)
            top = {tok.decode([i]) for i in torch.topk(want[t - 1], 2).indices.tolist()}
            assert top | {lp["tokens"][t]} == set(lp["top_logprobs"][t])
        assert lp["text_offset"] == [sum(len(x) for x in lp["tokens"][:t]) for t in range(len(ids))]
        assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    plain = post(live, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True})
    assert plain.json()["choices"][0]["text"] == PROMPT and plain.json()["choices"][0]["logprobs"] is None


def test_lm_evaluation_harness_local_completions_gets_the_models_log_likelihoods(live, reference, model_dir):
    """lm-eval's own client (`local-completions`: echo, logprobs 1, max_tokens 1, token-id prompts) against the
    server, compared with the model: the sum of the continuation's log-probabilities and whether it is greedy."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model, _ = reference
    lm = LocalCompletionsAPI(
        model="tiny",
        base_url=live.url + "/v1/completions",
        tokenizer_backend="huggingface",
        tokenizer=str(model_dir),
        num_concurrent=1,
        max_retries=1,
    )
    pairs = [("def step(self, ", "tokens):"), ("import ", "torch")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ctx, cont = lm._encode_pair(context, continuation)  # lm-eval's own split of the tokens
        lp = full_logprobs(model, ctx + cont)
        want = sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert logprob == pytest.approx(want, abs=1e-3)
        assert greedy == all(lp[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))


def test_completion_logprobs_of_generated_tokens_streamed_or_not(live, reference):
    model, tok = reference
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 3, "ignore_eos": True}
    whole = post(live, "/v1/completions", body).json()["choices"][0]
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    out = tok(whole["text"], add_special_tokens=False)["input_ids"]
    lp = whole["logprobs"]
    assert len(lp["tokens"]) == 8 and "".join(lp["tokens"]) == whole["text"]
    want = full_logprobs(model, ids + out)
    if len(out) == 8:  # the text re-tokenises to the generated tokens (true for most texts)
        for i, t in enumerate(out):
            assert lp["token_logprobs"][i] == pytest.approx(want[len(ids) - 1 + i, t].item(), abs=1e-4)
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        # the 3 most likely and the chosen one, by text (tokens that decode alike share an entry, as in OpenAI's shape)
        assert token in top and len(top) <= 4
        assert max(top.values()) == pytest.approx(value)  # greedy: the chosen token is the most likely
    with httpx.stream("POST", live.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    streamed = [c["logprobs"] for e in events for c in e["choices"] if c["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for s in streamed for v in s[key]] == lp[key]


def test_chat_logprobs_streamed_equal_the_whole_reply(client):
    body = dict(model="tiny", messages=USER, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**body).choices[0]
    content = whole.logprobs.content
    assert "".join(t.token for t in content) == whole.message.content
    for t in content:
        assert t.bytes == list(t.token.encode()) and [x.logprob for x in t.top_logprobs] == sorted(
            [x.logprob for x in t.top_logprobs], reverse=True
        )
        assert len(t.top_logprobs) == 3 and t.logprob <= t.top_logprobs[0].logprob + 1e-6  # greedy: the top one
    chunks = list(client.chat.completions.create(**body, stream=True))
    streamed = [t for c in chunks for t in (c.choices[0].logprobs.content if c.choices[0].logprobs else [])]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert plain.choices[0].logprobs is None


# ---------------------------------------------------------------------------------------------- penalties
def test_penalties_and_logit_bias_over_the_api_are_the_engines(live, reference):
    model, tok = reference
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    engine = Engine(model, tok, max_batch=1)
    for penalties in (
        {"presence_penalty": 1.5},
        {"frequency_penalty": 1.0, "repetition_penalty": 1.3},
        {"logit_bias": {"42": 4.5, "17": -100}},
    ):
        r = post(live, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, **penalties})
        bias = {int(k): v for k, v in penalties.pop("logit_bias", {}).items()} or None
        want = engine.generate([ids], SamplingParams(max_new_tokens=12, logit_bias=bias, **penalties))[0]
        assert r.json()["choices"][0]["text"] == want.text
    plain = post(live, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}).json()
    forced = post(
        live, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logit_bias": {"42": 100}}
    ).json()
    assert forced["choices"][0]["text"] == tok.decode([42] * 5) != plain["choices"][0]["text"][:5]


# ---------------------------------------------------------------------------------------------- schemas
RECURSIVE = [
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {"x": {"$ref": "#/$defs/loop"}}, "$defs": {"loop": {"$ref": "#/$defs/loop"}}},
]


@pytest.mark.parametrize("schema", RECURSIVE, ids=["self", "defs-cycle", "nested"])
def test_a_recursive_ref_is_a_400_naming_it_on_every_path(live, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    for path, body, param in [
        ("/v1/chat/completions", {"messages": USER, "response_format": fmt}, "response_format"),
        ("/v1/completions", {"prompt": "x", "response_format": fmt}, "response_format"),
        ("/v1/chat/completions", {"messages": USER, "tools": tools}, "tools.0.function.parameters"),  # was a 200
        (
            "/v1/chat/completions",
            {"messages": USER, "tools": tools, "tool_choice": "required"},
            "tools.0.function.parameters",
        ),
    ]:
        r = post(live, path, body)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["param"] == param and "$ref" in err["message"] and "refers back to itself" in err["message"]
        assert not any(s in err["message"] for s in ("<state>", "<grammar>", "x-guidance", "Parser"))
    fine = {"type": "object", "properties": {"next": {"$ref": "#"}, "v": {"type": "integer"}}, "required": ["v"]}
    r = post(
        live,
        "/v1/chat/completions",
        {
            "messages": USER,
            "max_tokens": 30,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": fine}},
        },
    )
    assert r.status_code == 200  # recursion through a property is a schema like any other


@pytest.mark.parametrize(
    "schema",
    [{"anyOf": [{"$ref": "#"}]}, {"oneOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"allOf": [{"$ref": "#"}]}}}],
    ids=["anyOf", "oneOf-allOf"],
)
def test_a_schema_that_allows_nothing_is_a_400_not_a_failed_generation(live, schema):
    """Recursion through composition alone: the grammar compiles, but no first token can be written. Each request
    used to fail at its first token with a 500 that dumped the parser's state."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    before = live.health()["failed"]
    for body, param in [
        ({"messages": USER, "response_format": fmt}, "response_format"),
        ({"messages": USER, "tools": tools}, "tools.0.function.parameters"),
    ]:
        r = post(live, "/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "allows no value" in r.json()["error"]["message"] and "<state>" not in r.text
    assert live.health()["failed"] == before
