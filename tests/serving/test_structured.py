"""Structured outputs and tool calls that always parse: `loopcoder serve` with a randomly initialised model,
through the official `openai` client. A random model, constrained, must always produce output that validates."""

from __future__ import annotations

import json
import threading
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from loopcoder.serving.server import load_app
from loopcoder.utils.errors import LoopcoderError
from support.constraints import SCHEMAS
from support.serving import LiveServer, build_model_dir

USER = [{"role": "user", "content": "Reply in JSON."}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
    "additionalProperties": False,
}
TESTS = {
    "type": "object",
    "properties": {
        "paths": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        "timeout": {"type": "integer", "minimum": 0, "maximum": 600},
    },
    "required": ["paths", "timeout"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "run_tests", "parameters": TESTS, "strict": True}},
    {"type": "function", "function": {"name": "now"}},
]  # no parameters: takes none
PARAMS = {
    t["function"]["name"]: t["function"].get(
        "parameters", {"type": "object", "properties": {}, "additionalProperties": False}
    )
    for t in TOOLS
}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # a long context: a tools prompt is ~900 tokens of this tokenizer, and parallel calls are as many as the model
    # writes (a random one stops after ~3)
    model = build_model_dir(tmp_path_factory.mktemp("model"), context=4096)
    app, scheduler = load_app(
        str(model), max_batch=4, max_queue=16, queue_timeout=120, model_name="tiny", max_tokens=1000
    )
    with LiveServer(app, scheduler) as server:
        yield server


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def json_schema_format(schema, strict=True):
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": strict}}


def check_calls(message, finish_reason):
    """Every tool call names one of TOOLS and its arguments validate; returns the calls as (name, args)."""
    assert message.tool_calls and finish_reason == "tool_calls"
    out = []
    for call in message.tool_calls:
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, PARAMS[call.function.name])
        assert call.id.startswith("call_") and call.type == "function"
        out.append((call.function.name, args))
    return out


def assert_valid_prefix(live, text, constraint):
    """`text` begins an output the constraint allows (outputs cut by max_tokens): a matcher accepts all of it
    (the grammar works on bytes, so any tokenisation of the text will do)."""
    engine = live.scheduler.engine
    m = engine.grammars.matcher(constraint, sorted(engine.eos_ids))
    for t in engine.tokenizer(text, add_special_tokens=False)["input_ids"]:
        m.accept(t)  # raises ConstraintError on the first character the grammar refuses


# ---------------------------------------------------------------------------------------------- response_format
@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_responses_always_validate(client, name):
    for seed in (None, 0, 1, 2):
        r = client.chat.completions.create(
            model="tiny",
            messages=USER,
            seed=seed,
            temperature=0 if seed is None else 1,
            response_format=json_schema_format(SCHEMAS[name]),
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[name])


def test_parse_with_a_pydantic_model(client):
    class Forecast(BaseModel):
        city: str = Field(max_length=8)
        days: int = Field(ge=1, le=7)
        unit: Literal["celsius", "fahrenheit"] | None
        alerts: list[Literal["wind", "rain"]] = Field(max_length=2)

    for seed in range(3):
        r = client.chat.completions.parse(model="tiny", messages=USER, response_format=Forecast, seed=seed)
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Forecast) and 1 <= parsed.days <= 7 and len(parsed.city) <= 8


def test_json_object_is_an_object_or_an_honest_length(live, client):
    from loopcoder.inference.constraints import Constraint

    reasons = set()
    for seed in range(4):
        r = client.chat.completions.create(
            model="tiny", messages=USER, seed=seed, max_tokens=60, response_format={"type": "json_object"}
        )
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        reasons.add(reason)
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_tokens: not JSON yet, but every character so far was allowed
            assert reason == "length" and r.usage.completion_tokens == 60
            assert_valid_prefix(live, text, Constraint.json_object())
    assert reasons <= {"stop", "length"}


def test_max_tokens_too_small_gives_length_and_the_text_so_far(live, client):
    from loopcoder.inference.constraints import Constraint

    r = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=5, response_format=json_schema_format(SCHEMAS["nested"])
    )
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and text.startswith('{"') and r.usage.completion_tokens == 5
    with pytest.raises(ValueError):
        json.loads(text)
    assert_valid_prefix(live, text, Constraint.json_schema(SCHEMAS["nested"]))
    with pytest.raises(LoopcoderError):  # the check can fail
        assert_valid_prefix(live, text + "]", Constraint.json_schema(SCHEMAS["nested"]))


def test_completions_take_response_format_too(client):
    r = client.completions.create(
        model="tiny",
        prompt="JSON: ",
        max_tokens=200,
        seed=3,
        extra_body={"response_format": json_schema_format(SCHEMAS["flat"])},
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["flat"])


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"response_format": json_schema_format({"type": "foo"})}, "response_format", "Invalid type: foo"),
        ({"response_format": json_schema_format({"not": {"const": 1}})}, "response_format", "not"),
        ({"response_format": json_schema_format({"type": "string", "pattern": "(a"})}, "response_format", "unclosed"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
            "response_format.json_schema.schema",
            "",
        ),
        (
            {
                "tools": [TOOLS[0], {"type": "function", "function": {"name": "bad", "parameters": {"type": "wat"}}}],
                "tool_choice": "required",
            },
            "tools.1.function.parameters",
            "Invalid type: wat",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "s", "strict": True, "parameters": {"type": "object", "not": {}}},
                    }
                ]
            },
            "tools.0.function.parameters",
            "not",
        ),
    ],
)
def test_a_schema_the_grammar_cannot_compile_is_a_400_that_names_it(client, body, param, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, **body)
    err = e.value.body
    assert err["param"] == param and message in err["message"], err


def test_strict_false_ignores_keywords_the_grammar_cannot_enforce(client):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
        "not": {"required": ["m"]},
    }
    r = client.chat.completions.create(
        model="tiny", messages=USER, seed=1, response_format=json_schema_format(schema, strict=False)
    )
    assert 0 <= json.loads(r.choices[0].message.content)["n"] <= 9


# ---------------------------------------------------------------------------------------------- tool calls
def test_required_and_named_tool_calls_always_validate(client):
    for seed in range(2):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", seed=seed)
        calls = check_calls(r.choices[0].message, r.choices[0].finish_reason)
        assert r.choices[0].message.content is None and len(calls) >= 1
        for name in PARAMS:
            named = {"type": "function", "function": {"name": name}}
            r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=named, seed=seed)
            assert [n for n, _ in check_calls(r.choices[0].message, r.choices[0].finish_reason)] == [name]


def test_parallel_tool_calls(client):
    counts = set()
    for seed in range(8):
        for parallel in (True, False):
            r = client.chat.completions.create(
                model="tiny",
                messages=USER,
                tools=TOOLS,
                tool_choice="required",
                parallel_tool_calls=parallel,
                seed=seed,
            )
            n = len(check_calls(r.choices[0].message, r.choices[0].finish_reason))
            assert n == 1 if not parallel else n >= 1
            counts.add((parallel, n))
    assert any(parallel and n > 1 for parallel, n in counts)  # a random model does use the freedom


def test_auto_is_free_until_a_call_opens_then_the_call_validates(client):
    opened = 0
    for seed in range(12):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, seed=seed, max_tokens=120)
        message, reason = r.choices[0].message, r.choices[0].finish_reason
        if message.tool_calls:  # complete calls validate; a further call may be cut by max_tokens ("length")
            opened += 1
            check_calls(message, "tool_calls" if reason == "length" else reason)
            assert "<tool_call>" not in (message.content or "") or reason == "length"
        else:  # free text that never spelled the opening out, or a call cut by max_tokens
            assert reason in ("stop", "length")
            assert "<tool_call>" not in (message.content or "") or reason == "length"
    assert opened >= 1  # a random model at temperature 1 opens calls now and then


def test_streamed_tool_calls_assemble_in_the_openai_client_to_the_non_streamed_reply(client):
    for seed in range(3):
        body = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", seed=seed)
        whole = client.chat.completions.create(**body)
        with client.chat.completions.stream(**body) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        a, b = whole.choices[0], final.choices[0]
        assert (b.finish_reason, b.message.content) == (a.finish_reason, a.message.content)
        assert [(c.function.name, c.function.arguments) for c in b.message.tool_calls] == [
            (c.function.name, c.function.arguments) for c in a.message.tool_calls
        ]
        chunks = list(client.chat.completions.create(**body, stream=True))
        deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
        assert [d.index for d in deltas] == list(range(len(a.message.tool_calls)))
        assert all(d.id and d.type == "function" and d.function.name for d in deltas)


def test_streamed_json_equals_the_non_streamed(client):
    for seed in (None, 5):
        body = dict(
            model="tiny",
            messages=USER,
            seed=seed,
            temperature=0 if seed is None else 1,
            response_format=json_schema_format(SCHEMAS["nested"]),
        )
        whole = client.chat.completions.create(**body).choices[0]
        chunks = list(client.chat.completions.create(**body, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
        assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "stop"


def test_a_tool_round_trip_through_several_turns(live, client):
    messages = [{"role": "user", "content": "What's the weather, then run the tests."}]
    for turn, choice in enumerate(["required", {"type": "function", "function": {"name": "now"}}]):
        r = client.chat.completions.create(
            model="tiny", messages=messages, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, seed=turn
        )
        message = r.choices[0].message
        [(name, _args)] = check_calls(message, r.choices[0].finish_reason)
        messages.append(message)  # the client's own object, sent back as is
        messages.append({"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": json.dumps({"ok": name})})
    final = client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=TOOLS,
        tool_choice="none",
        seed=9,
        response_format=json_schema_format(SCHEMAS["flat"]),
    )
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.tool_calls is None
    jsonschema.validate(json.loads(final.choices[0].message.content), SCHEMAS["flat"])
    # the server rendered both calls and both results: its prompt is the template's rendering of them
    tok = live.scheduler.engine.tokenizer
    plain = [
        m
        if isinstance(m, dict)
        else {"role": "assistant", "content": m.content, "tool_calls": [c.model_dump() for c in m.tool_calls]}
        for m in messages
    ]
    text = tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    assert text.count("<tool_call>") == 2 and text.count("<tool_response>") == 2
    assert final.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])


def test_constrained_and_free_requests_at_once_each_get_what_they_get_alone(client):
    bodies = [
        dict(messages=USER, seed=1, response_format=json_schema_format(SCHEMAS["flat"])),
        dict(messages=USER, seed=2, max_tokens=40),
        dict(messages=USER, seed=3, tools=TOOLS, tool_choice="required"),
        dict(messages=USER, temperature=0, max_tokens=40),
        dict(messages=USER, seed=4, response_format={"type": "json_object"}, max_tokens=60),
        dict(messages=USER, seed=5, tools=TOOLS, max_tokens=40),
    ]

    def ask(body):
        m = client.chat.completions.create(model="tiny", **body).choices[0]
        return (
            m.message.content,
            [(c.function.name, c.function.arguments) for c in m.message.tool_calls or []],
            m.finish_reason,
        )

    alone = [ask(b) for b in bodies]
    together: list = [None] * len(bodies)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(bodies[i]))) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEMAS)
def test_many_seeds_always_validate_streaming_or_not(client, name):
    for seed in range(16):
        body = dict(model="tiny", messages=USER, seed=seed, response_format=json_schema_format(SCHEMAS[name]))
        whole = client.chat.completions.create(**body).choices[0]
        jsonschema.validate(json.loads(whole.message.content), SCHEMAS[name])
        streamed = "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
        )
        assert streamed == whole.message.content
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", seed=seed)
        check_calls(r.choices[0].message, r.choices[0].finish_reason)
