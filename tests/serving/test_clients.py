"""Requests exactly as real clients send them (tests/serving/fixtures/client_requests.json, recorded from the wire
by capture_client_requests.py): BFCL's function-calling mode (its converted tool schemas, `store: false`,
temperature 0.001, no tool_choice), the OpenAI Agents SDK's Chat Completions model (plain and streamed) and
smolagents' ToolCallingAgent (`tool_choice: "required"`, schemas without additionalProperties). Each is answered
(never a 400 for a parameter), and every tool call parses and passes the client's own check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema
import pytest

from loopcoder.model.loading import load_for_inference
from loopcoder.serving.server import load_app
from loopcoder.serving.tool_calls import closed_schema
from support.serving import LiveServer, build_model_dir, scripted_app, sse_events

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "client_requests.json").read_text())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("model"), context=4096)  # smolagents' system prompt is long


@pytest.fixture(scope="module")
def live(model_dir):
    model = model_dir
    app, scheduler = load_app(
        str(model), max_batch=4, max_queue=16, queue_timeout=120, model_name="tiny", max_tokens=MAX_TOKENS
    )
    with LiveServer(app, scheduler) as server:
        yield server


MAX_TOKENS = 80  # the servers' cap: clients that send no max_tokens get this many


def ask(live, body: dict) -> tuple[dict, str]:
    """The reply's message and finish reason; a streamed reply is assembled as the openai client does. A streamed
    reply cut by max_tokens inside a call (vLLM's rule: the call as far as it got) is marked `cut`."""
    before = live.health()["tokens"]
    if not body.get("stream"):
        r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"], choice["finish_reason"]
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    cut = live.wait_idle()["tokens"] - before >= MAX_TOKENS  # the only request: the server's count is its own
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
    content, calls, reason = "", {}, None
    for e in events[:-1]:
        delta = e["choices"][0]["delta"]
        content += delta.get("content") or ""
        for c in delta.get("tool_calls") or []:
            calls.setdefault(c["index"], c)
        reason = e["choices"][0]["finish_reason"] or reason
    return {"content": content or None, "tool_calls": [calls[i] for i in sorted(calls)] or None, "cut": cut}, reason


def check_calls(body: dict, message: dict, reason: str) -> list[tuple[str, dict]]:
    """Every call names one of the request's tools, and its arguments are JSON that validates against that tool's
    parameters read as a closed object (the server's default)."""
    params = {t["function"]["name"]: t["function"].get("parameters", {}) for t in body.get("tools", [])}
    out = []
    calls = message.get("tool_calls") or []
    if message.get("cut") and calls:  # streamed and cut inside its last call: sent as far as it got, as vLLM does
        assert calls[-1]["function"]["name"] in params and reason == "tool_calls"
        calls = calls[:-1]
    for call in calls:
        name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
        jsonschema.validate(args, closed_schema(params[name]))
        out.append((name, args))
    if out:
        assert reason in ("tool_calls", "length"), reason
    return out


@pytest.mark.parametrize("entry", FIXTURES["bfcl"], ids=[e["id"] for e in FIXTURES["bfcl"]])
def test_bfcl_function_calling_requests_are_answered_with_calls_that_bfcl_decodes(live, entry):
    body = entry["body"]
    assert body["store"] is False and body["temperature"] == 0.001 and "tool_choice" not in body
    message, reason = ask(live, body)
    calls = check_calls(body, message, reason)
    # BFCL's own decoding (OpenAICompletionsHandler.decode_ast): [{name: json.loads(arguments)}]
    decoded = [{c["function"]["name"]: json.loads(c["function"]["arguments"])} for c in message.get("tool_calls") or []]
    assert decoded == [{n: a} for n, a in calls]


@pytest.mark.parametrize("kind", ["agents_sdk", "agents_sdk_streamed"])
def test_the_agents_sdk_tool_loop_requests_are_answered(live, kind):
    for body in FIXTURES[kind]:  # the first turn, then the turn with the tool call and its result
        message, reason = ask(live, body)
        check_calls(body, message, reason)
        assert reason in ("stop", "length", "tool_calls")


def keys_so_far(text: str) -> list[tuple[str, list[str]]]:
    """(function name, the keys of its arguments object written so far) of every call in a reply's text, finished
    or cut short (a JSON scanner that stops where the text does)."""
    out = []
    for m in re.finditer(r'"name": "([^"]+)", "arguments": ', text):
        keys, depth, i, expect_key, body = [], 0, 0, False, text[m.end() :]
        while i < len(body) and (depth > 0 or i == 0):
            c = body[i]
            if c == '"':
                try:
                    value, i = json.decoder.scanstring(body, i + 1)
                except ValueError:  # cut inside a string
                    break
                if depth == 1 and expect_key:
                    keys.append(value)
                expect_key = False
                continue
            if c in "{[":
                depth += 1
                expect_key = c == "{" and depth == 1
            elif c in "}]":
                depth -= 1
            elif c == "," and depth == 1:
                expect_key = True
            i += 1
        out.append((m.group(1), keys))
    return out


def test_smolagents_requests_always_get_calls_that_pass_its_own_check(live):
    """`tool_choice: "required"`: every reply is calls. smolagents refuses an argument that is not in the tool's
    schema; its schemas do not say additionalProperties, so only the closed reading keeps the model from adding
    keys (2 of 15 constrained calls were refused before). A reply cut by max_tokens is text (vLLM's rule): the keys
    it had written are checked there."""
    for body in FIXTURES["smolagents"]:
        assert body["tool_choice"] == "required" and all(
            "additionalProperties" not in t["function"]["parameters"] for t in body["tools"]
        )
        properties = {t["function"]["name"]: t["function"]["parameters"]["properties"] for t in body["tools"]}
        for _ in range(4):  # the client sends no seed: four different samples
            message, reason = ask(live, body)
            if reason == "tool_calls":
                written = [(n, list(a)) for n, a in check_calls(body, message, reason)]
            else:
                assert reason == "length" and message["content"].startswith("<tool_call>")
                written = keys_so_far(message["content"])
            assert written
            for name, keys in written:
                assert set(keys) <= set(properties[name]), (name, keys)  # smolagents' check


def example(schema: dict) -> object:
    """A value of a BFCL parameter schema: its required keys only, the first enum value, ..."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "string")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: example(props[k]) for k in schema.get("required", []) if k in props}
    return {"integer": 3, "number": 2.5, "boolean": True, "array": [], "string": "x"}[kind]


def test_bfcl_requests_get_back_the_calls_a_model_writes(model_dir):
    """A model that does call (the scripted engine writes a call to each request's first tool): BFCL's converted
    schemas compile, closed; the call passes the grammar, comes back in `tool_calls`, and BFCL decodes it."""
    app, scheduler, engine = scripted_app(*load_for_inference(str(model_dir)), model_name="tiny", max_tokens=400)
    with LiveServer(app, scheduler) as server:
        for entry in FIXTURES["bfcl"]:
            body, tool = entry["body"], entry["body"]["tools"][0]["function"]
            args = example(tool["parameters"])
            engine.script = f"<tool_call>\n{json.dumps({'name': tool['name'], 'arguments': args})}\n</tool_call>"
            message, reason = ask(server, body)
            assert check_calls(body, message, reason) == [(tool["name"], args)], entry["id"]
