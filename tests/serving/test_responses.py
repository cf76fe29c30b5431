"""`POST /v1/responses` through the official `openai` client (`responses.create`, `responses.stream`) and raw HTTP:
a random tiny model for the chat path and constrained output, a scripted engine for tool calls and tool loops."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from loopcoder.model.loading import load_for_inference
from loopcoder.serving.responses import IGNORED, ResponseStore
from loopcoder.serving.server import load_app
from support.serving import LiveServer, build_model_dir, scripted_app

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Forecast", "parameters": WEATHER}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
STREAM_ORDER_TEXT = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("model"), context=2048)


@pytest.fixture(scope="module")
def live(model_dir):
    app, scheduler = load_app(str(model_dir), max_batch=4, max_queue=8, model_name="tiny", max_tokens=300)
    with LiveServer(app, scheduler) as server:
        yield server


@pytest.fixture(scope="module")
def scripted(model_dir):
    app, scheduler, engine = scripted_app(*load_for_inference(str(model_dir)), max_tokens=1000)
    with LiveServer(app, scheduler) as server:
        server.engine = engine
        yield server


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, body) -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", json=body, timeout=60)


def last_prompt(server) -> str:
    return server.engine.tokenizer.decode(server.engine.prompts[-1])


# ---------------------------------------------------------------------------------------------- the chat path
def test_a_response_is_the_chat_completion_of_the_same_conversation(live):
    client = client_of(live)
    for instructions in (None, "You write Python."):
        system = [{"role": "system", "content": instructions}] if instructions else []
        chat = client.chat.completions.create(
            model="tiny",
            messages=[*system, {"role": "user", "content": "Write a loop."}],
            max_completion_tokens=24,
            temperature=0,
        )
        r = client.responses.create(
            model="tiny", input="Write a loop.", instructions=instructions, max_output_tokens=24, temperature=0
        )
        assert r.output_text == chat.choices[0].message.content
        assert r.usage.input_tokens == chat.usage.prompt_tokens
        assert r.usage.output_tokens == chat.usage.completion_tokens
        assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
        cut = chat.choices[0].finish_reason == "length"
        assert r.status == ("incomplete" if cut else "completed")
        assert (r.incomplete_details.reason if cut else r.incomplete_details) == ("max_output_tokens" if cut else None)
        assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
        assert r.instructions == instructions and r.max_output_tokens == 24 and r.temperature == 0
        [item] = r.output
        assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"


def test_message_items_with_parts_equal_the_string_input(live):
    client = client_of(live)
    kw = {"model": "tiny", "max_output_tokens": 16, "temperature": 0}
    plain = client.responses.create(input="Sort a list.", **kw)
    parts = client.responses.create(
        input=[{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Sort a list."}]}], **kw
    )
    easy = client.responses.create(input=[{"role": "user", "content": "Sort a list."}], **kw)
    assert plain.output_text == parts.output_text == easy.output_text


def test_text_format_json_schema_always_validates(live):
    client = client_of(live)
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}
    for seed_text in ("Weather?", "Where?", "Reply in JSON."):
        r = client.responses.create(model="tiny", input=seed_text, text={"format": fmt}, temperature=1.0)
        jsonschema.validate(json.loads(r.output_text), WEATHER)
        assert r.status == "completed" and r.text.format.type == "json_schema"
    r = client.responses.create(model="tiny", input="JSON", text={"format": {"type": "json_object"}}, temperature=0)
    assert r.status == "incomplete" or isinstance(json.loads(r.output_text), dict)


def test_the_stream_has_the_typed_events_in_order_and_the_same_text(live):
    client = client_of(live)
    kw = {"model": "tiny", "input": "Write a loop.", "max_output_tokens": 20, "temperature": 0}
    full = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
    final = events[-1].response  # (`get_final_response()` wants response.completed: this one may be incomplete)
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    first_delta = kinds.index("response.output_text.delta")
    last_delta = len(kinds) - 1 - kinds[::-1].index("response.output_text.delta")
    assert kinds[:first_delta] == STREAM_ORDER_TEXT[:4]
    assert set(kinds[first_delta : last_delta + 1]) == {"response.output_text.delta"}
    terminal = "response.incomplete" if full.status == "incomplete" else "response.completed"
    assert kinds[last_delta + 1 :] == [*STREAM_ORDER_TEXT[5:], terminal]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == full.output_text == final.output_text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert final.status == full.status and final.usage.output_tokens == full.usage.output_tokens


# ---------------------------------------------------------------------------------------------- tool calls
def test_tool_calls_become_function_call_items(scripted):
    client = client_of(scripted)
    scripted.engine.script = "Let me look.\n" + CALL
    r = client.responses.create(model="scripted", input="Weather in Paris?", tools=TOOLS)
    assert "<tools>" in last_prompt(scripted)
    message, call = r.output
    assert message.type == "message" and message.content[0].text == "Let me look."
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id.startswith("call_")
    assert call.id.startswith("fc_") and r.status == "completed"

    with client.responses.stream(model="scripted", input="Weather in Paris?", tools=TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    tail = kinds[kinds.index("response.output_text.done") :]
    assert tail == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = next(e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call")
    assert added.output_index == 1 and added.item.arguments == ""
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Paris"} and done.item_id == final.output[1].id
    assert [o.type for o in final.output] == ["message", "function_call"]


def test_only_calls_give_no_message_item_and_tool_choice_is_honoured(scripted):
    client = client_of(scripted)
    scripted.engine.script = CALL.replace("Paris", "Oslo")
    r = client.responses.create(model="scripted", input="Weather?", tools=TOOLS, tool_choice="required")
    [call] = r.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Oslo"}
    named = {"type": "function", "name": "get_weather"}
    r = client.responses.create(model="scripted", input="Weather?", tools=TOOLS, tool_choice=named)
    assert r.tool_choice.name == "get_weather" and r.output[0].type == "function_call"
    r = client.responses.create(model="scripted", input="Weather?", tools=TOOLS, tool_choice="none")
    assert "<tools>" not in last_prompt(scripted) and r.output_text == scripted.engine.script  # not parsed
    scripted.engine.script = "It is sunny."  # text where only a call may come: refused by the grammar
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="scripted", input="Weather?", tools=TOOLS, tool_choice="required")


def test_a_tool_loop_with_previous_response_id_renders_the_whole_conversation(scripted):
    client = client_of(scripted)
    scripted.engine.script = CALL
    first = client.responses.create(
        model="scripted", input="Weather in Paris?", instructions="Be brief.", tools=TOOLS, metadata={"run": "7"}
    )
    assert first.metadata == {"run": "7"} and first.store is True
    [call] = first.output
    scripted.engine.script = "It is sunny."
    second = client.responses.create(
        model="scripted",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'}],
        tools=TOOLS,
    )
    prompt = last_prompt(scripted)
    assert "Weather in Paris?" in prompt and CALL in prompt
    assert '<tool_response>\n{"sky": "clear"}\n</tool_response>' in prompt
    assert "Be brief." not in prompt  # instructions are not carried over (as OpenAI's)
    assert second.output_text == "It is sunny." and second.previous_response_id == first.id

    # the same conversation sent in full, with the client's own output items as input
    client.responses.create(
        model="scripted",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            *[o.model_dump(exclude_none=True) for o in first.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'},
        ],
        tools=TOOLS,
    )
    assert last_prompt(scripted) == prompt

    third = client.responses.create(model="scripted", previous_response_id=second.id, input="And tomorrow?")
    prompt = last_prompt(scripted)
    assert CALL in prompt and "It is sunny." in prompt and prompt.index("It is sunny.") < prompt.index("And tomorrow?")
    assert third.status == "completed"


def test_store_false_and_unknown_ids_are_a_clear_400(scripted):
    client = client_of(scripted)
    scripted.engine.script = "ok"
    kept = client.responses.create(model="scripted", input="hi", store=False)
    assert kept.store is False
    for rid in (kept.id, "resp_nothing"):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="scripted", input="again", previous_response_id=rid)
        assert e.value.body["code"] == "previous_response_not_found" and e.value.body["param"] == "previous_response_id"
        assert rid in e.value.body["message"] and "keeps the last" in e.value.body["message"]


def test_the_store_has_a_cap_and_an_age_limit():
    now = [0.0]
    store = ResponseStore(capacity=2, max_age=10.0, clock=lambda: now[0])
    store.put("a", [{"role": "user", "content": "a"}])
    store.put("b", [])
    assert store.get("a")[0]["content"] == "a"  # used: now the most recent
    store.put("c", [])
    assert len(store) == 2
    with pytest.raises(Exception, match="'b' not found"):
        store.get("b")  # least recently used: evicted
    now[0] = 10.5
    store.put("d", [])
    for old in ("a", "c"):
        with pytest.raises(Exception, match="not found"):
            store.get(old)
    assert store.get("d") == [] and len(store) == 1


def test_a_cut_output_is_incomplete_and_the_stream_says_so(scripted):
    scripted.engine.script = "a b c d e f g h i j"
    client = client_of(scripted)
    r = client.responses.create(model="scripted", input="x", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 3
    with client.responses.stream(model="scripted", input="x", max_output_tokens=3) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == r.output_text


# ---------------------------------------------------------------------------------------------- the request surface
def test_unknown_fields_are_refused_by_name_and_standard_ones_ignored(scripted):
    scripted.engine.script = "ok"
    r = post(scripted, {"model": "scripted", "input": "x", "temprature": 0.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temprature"
    assert "Unrecognized request argument supplied: temprature" in r.json()["error"]["message"]
    values = {
        "include": ["message.output_text.logprobs"],
        "max_tool_calls": 3,
        "prompt_cache_key": "k",
        "prompt_cache_retention": "24h",
        "prompt_cache_options": {"mode": "implicit"},
        "reasoning": {"effort": "low"},
        "safety_identifier": "s",
        "service_tier": "auto",
        "stream_options": {"include_obfuscation": False},
        "truncation": "auto",
        "user": "u",
        "context_management": [{"type": "compaction"}],
        "moderation": {"mode": "off"},
    }
    assert set(values) == set(IGNORED)
    body = {"model": "scripted", "input": "x", "store": False, "background": False, "top_logprobs": 0, **values}
    r = post(scripted, body)
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"][0]["text"] == "ok"
    nulls = {k: None for k in [*values, "tools", "tool_choice", "text", "metadata", "instructions"]}
    assert post(scripted, {"model": "scripted", "input": "x", **nulls}).status_code == 200


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"background": True}, "background", "background"),
        ({"conversation": "conv_1"}, "conversation", "previous_response_id"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "stored prompts"),
        ({"top_logprobs": 2}, "top_logprobs", "top_logprobs"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type", "function"),
        ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools.0.name", "pattern"),
        ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "f"}}, "tool_choice", "not in 'tools'"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content",
            "only text content parts",
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.0", "function_call_output"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id", "required"),
        ({"input": []}, "input", "empty"),
        ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name", "name"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "response_format", ""),
        ({"metadata": {"k": "v" * 513}}, "metadata.k", "512"),
        ({"model": "gpt-4o"}, "model", "does not exist"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_that_names_it(scripted, extra, param, says):
    r = post(scripted, {"model": "scripted", "input": "x", **extra})
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_a_stream_over_raw_http_names_each_event(scripted):
    scripted.engine.script = "hi"
    with httpx.stream("POST", scripted.url + "/v1/responses", json={"input": "x", "stream": True}, timeout=60) as r:
        lines = list(r.iter_lines())
    named = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert named == [d["type"] for d in data] and named[-1] == "response.completed"
    assert "[DONE]" not in "".join(lines)  # the Responses API's streams end with their terminal event


def test_a_request_that_fails_mid_generation_ends_with_an_error_and_response_failed(scripted):
    scripted.engine.script = "a b c d"
    r = post(scripted, {"input": "POISON"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
    url = scripted.url + "/v1/responses"
    with httpx.stream("POST", url, json={"input": "POISON", "stream": True}, timeout=60) as r:
        data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [d["type"] for d in data[-2:]] == ["error", "response.failed"]
    assert data[-2]["code"] == "generation_failed" and data[-1]["response"]["status"] == "failed"
    assert data[-1]["response"]["error"]["code"] == "generation_failed"
    assert post(scripted, {"input": "fine"}).status_code == 200  # the server goes on
