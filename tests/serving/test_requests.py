"""The request surface with a scripted engine (the real engine's bookkeeping, a fixed output): legacy functions,
allowed tools, closed tool schemas and their flag, the request log, and one client's huge prompts against the
others' small ones."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import openai
import pytest

from loopcoder.model.loading import load_for_inference
from support.serving import LiveServer, build_model_dir, scripted_app, sse_events

USER = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {
    "name": "get_weather",
    "description": "Weather forecast for a city",
    # smolagents' shape: no additionalProperties anywhere
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "where": {"type": "object", "properties": {"lat": {}}}},
        "required": ["city"],
    },
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}


def call(name: str, args: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


@pytest.fixture(scope="module")
def live(loaded):
    app, scheduler, engine = scripted_app(*loaded, max_tokens=400, log_requests=True)
    with LiveServer(app, scheduler) as server:
        server.engine = engine
        yield server


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def prompt_text(live) -> str:
    return live.engine.tokenizer.decode(live.engine.prompts[-1])


# ---------------------------------------------------------------------------------------------- legacy functions
def test_legacy_functions_are_tools_answered_as_function_call(live, client):
    live.engine.script = call("get_weather", {"city": "Paris"})
    r = client.chat.completions.create(model="scripted", messages=USER, functions=[WEATHER])
    assert "<tools>" in prompt_text(live) and '"get_weather"' in prompt_text(live)
    choice = r.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model="scripted", messages=USER, functions=[WEATHER], stream=True))
    [delta] = [c.choices[0].delta.function_call for c in chunks if c.choices[0].delta.function_call]
    assert delta.name == "get_weather" and json.loads(delta.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "function_call"
    # the call and its result sent back in the legacy form are rendered as a tool call and a tool result
    live.engine.script = "It is sunny."
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"role": "function", "name": "get_weather", "content": '{"sky": "clear"}'},
    ]
    r = client.chat.completions.create(model="scripted", messages=messages, functions=[WEATHER], function_call="auto")
    text = prompt_text(live)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"sky": "clear"}\n</tool_response>' in text
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"


def test_legacy_function_call_by_name_and_none(live, client):
    live.engine.script = call("get_time", {"zone": "UTC"})
    r = client.chat.completions.create(
        model="scripted", messages=USER, functions=[WEATHER, TIME], function_call={"name": "get_time"}
    )
    assert r.choices[0].message.function_call.name == "get_time"
    live.engine.script = call("get_weather", {"city": "Oslo"})  # the named function only: this is refused
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(
            model="scripted", messages=USER, functions=[WEATHER, TIME], function_call={"name": "get_time"}
        )
    assert "grammar" in e.value.message and "<state>" not in e.value.message
    r = client.chat.completions.create(model="scripted", messages=USER, functions=[WEATHER], function_call="none")
    assert r.choices[0].message.function_call is None and r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------- allowed tools
def test_allowed_tools_limit_the_calls_and_keep_every_tool_in_the_prompt(live, client):
    tools = [{"type": "function", "function": f} for f in (WEATHER, TIME)]
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]},
    }
    live.engine.script = call("get_time", {"zone": "CET"})
    r = client.chat.completions.create(model="scripted", messages=USER, tools=tools, tool_choice=allowed)
    assert '"get_weather"' in prompt_text(live)  # still in the prompt (its cache stays the same)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]
    live.engine.script = call("get_weather", {"city": "Oslo"})
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="scripted", messages=USER, tools=tools, tool_choice=allowed)
    live.engine.script = "No call."  # mode "auto": text is allowed, a call only to the allowed tools
    allowed["allowed_tools"]["mode"] = "auto"
    r = client.chat.completions.create(model="scripted", messages=USER, tools=tools, tool_choice=allowed)
    assert r.choices[0].message.content == "No call." and r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------- closed schemas
@pytest.mark.parametrize("args", [{"city": "Paris", "town": "x"}, {"city": "Paris", "where": {"lat": 1, "lon": 2}}])
def test_the_model_cannot_add_keys_to_a_tools_arguments_unless_the_server_opens_them(loaded, live, client, args):
    """The scripted model writes an extra key (at the top, or in a nested object): the closed grammar refuses it (the
    scripted model has no other token to write, so the request fails; a real model writes another key). With
    --open-tool-schemas (plain JSON Schema) the same call is allowed."""
    live.engine.script = call("get_weather", args)
    tools = [{"type": "function", "function": WEATHER}]
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="scripted", messages=USER, tools=tools, tool_choice="required")
    assert e.value.body["code"] == "generation_failed" and "grammar" in e.value.message
    app, scheduler, engine = scripted_app(*loaded, max_tokens=400, open_tool_schemas=True)
    engine.script = call("get_weather", args)
    with LiveServer(app, scheduler) as server:
        open_client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        r = open_client.chat.completions.create(model="scripted", messages=USER, tools=tools, tool_choice="required")
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == args


# ---------------------------------------------------------------------------------------------- the request log
def test_user_and_metadata_go_into_the_request_log_one_line_each(live, client, caplog):
    live.engine.script = "ok"
    caplog.set_level(logging.INFO, logger="loopcoder.serve")
    client.chat.completions.create(
        model="scripted",
        messages=USER,
        user="alice\nFORGED line",
        metadata={"run": "r1", "task": "swe-7"},
        safety_identifier="h-9",
    )
    client.completions.create(model="scripted", prompt="x", max_tokens=2, user="bob")
    lines = [
        r.getMessage() for r in caplog.records if r.name == "loopcoder.serve" and "prompt tokens" in r.getMessage()
    ]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    chat, completion = lines
    assert chat.startswith("chat.completions chatcmpl-") and 'user="alice\\nFORGED line"' in chat
    assert 'metadata={"run": "r1", "task": "swe-7"}' in chat and 'safety_identifier="h-9"' in chat
    assert completion.startswith("completions cmpl-") and 'user="bob"' in completion


# ---------------------------------------------------------------------------------------------- huge prompts
def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenised(live):
    svc = live.server.config.app.state.service
    seen: list[int] = []
    real = svc.encode
    svc.encode = lambda text: seen.append(len(text)) or real(text)
    try:
        huge = "word " * (svc.max_prompt_chars // 5 + 1)
        for path, body in [
            ("/v1/completions", {"prompt": huge}),
            ("/v1/completions", {"prompt": ["x", huge]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}),
        ]:
            r = httpx.post(live.url + path, json=body, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
            assert "characters" in r.json()["error"]["message"]
        assert all(n < svc.max_prompt_chars for n in seen)  # the huge texts never reached the tokenizer
    finally:
        svc.encode = real


def test_small_requests_are_answered_while_huge_prompts_are_being_tokenised(tmp_path):
    """Huge prompts (bodies over 64 KiB) are tokenised in a lane of their own. Here their tokenising blocks until the
    test lets it go: the small request must be answered meanwhile. (With one tokenizer thread for everything, the
    small request waited behind every huge one: 32.7 s against 0.08 s, with fourteen 1.9 MB prompts.)"""
    # a context long enough that 120,000 characters may fit (16 characters per token at most): they are tokenised
    long_context = load_for_inference(str(build_model_dir(tmp_path / "model", context=16384)))
    app, scheduler, engine = scripted_app(*long_context, max_body_bytes=4 * 2**20)
    engine.script = "hi"
    svc = app.state.service
    release, entered = threading.Event(), threading.Event()
    real = svc.encode

    def slow_encode(text: str) -> list[int]:
        if len(text) > 100_000:
            entered.set()
            assert release.wait(60), "the test never released the huge prompts"
        return real(text)

    svc.encode = slow_encode
    huge = {"prompt": "x " * 60_000, "max_tokens": 1}
    assert len(huge["prompt"]) < svc.max_prompt_chars  # could fit from its size: it must be tokenised
    with LiveServer(app, scheduler) as server:
        results: list = []
        big = [
            threading.Thread(
                target=lambda: results.append(httpx.post(server.url + "/v1/completions", json=huge, timeout=90))
            )
            for _ in range(3)
        ]
        for t in big:
            t.start()
        try:
            assert entered.wait(30)
            small = httpx.post(server.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=20)
            assert small.status_code == 200 and small.json()["choices"][0]["text"] == "hi"
            assert not results  # the huge ones are all still being tokenised
            chat = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=20)
            assert chat.status_code == 200 and not results
        finally:
            release.set()
            for t in big:
                t.join(60)
        assert len(results) == 3 and all(r.status_code in (200, 400) for r in results)  # then they are answered


def test_streamed_echo_with_max_tokens_0_is_the_prompt(live):
    with httpx.stream(
        "POST",
        live.url + "/v1/completions",
        json={"prompt": ["ab", "cd"], "max_tokens": 0, "echo": True, "stream": True},
    ) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert [(e["choices"][0]["index"], e["choices"][0]["text"]) for e in events[:-1]] == [(0, "ab"), (1, "cd")]
