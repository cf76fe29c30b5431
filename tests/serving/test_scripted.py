"""The server with a scripted engine (real slot bookkeeping, fixed output, a set time per step): tool calls
end to end, admission limits (429, queue timeout), disconnects freeing slots, graceful shutdown."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from support.serving import LiveServer, scripted_app, sse_events

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def live(loaded):
    """Two slots, one queue place, 1 s queue timeout, 10 ms per step."""
    app, scheduler, engine = scripted_app(
        *loaded, delay=0.01, max_batch=2, max_queue=1, queue_timeout=3.0, max_tokens=1000
    )
    with LiveServer(app, scheduler) as server:
        server.engine = engine
        yield server


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def last_prompt(live) -> str:
    return live.engine.tokenizer.decode(live.engine.prompts[-1])


# ---------------------------------------------------------------------------------------------- tool calls
def test_tools_reach_the_template_and_calls_come_back_as_tool_calls(live, client):
    live.engine.script = "Let me look.\n" + CALL
    r = client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS)
    prompt = last_prompt(live)
    assert "<tools>" in prompt and json.dumps(TOOLS[0]) in prompt and prompt.endswith("<|im_start|>assistant\n")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert content == "Let me look."
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert calls[0].id.startswith("call_") and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_call_cut_by_max_tokens_is_answered_as_vllm_answers_it(client, live):
    """vLLM's Hermes parser and serving_chat.py (docs/serving.md, "A tool call cut off by max_tokens"), cut at every
    token of a call. Whole reply: a call whose JSON is complete is a call ("tool_calls"); otherwise the whole text
    is content ("length"). Stream: nothing from the marker on is content; the call is sent once its name is
    complete, with the arguments written so far, and the reply ends with "tool_calls"."""
    live.engine.script = CALL
    ids = live.engine.tokenizer(CALL, add_special_tokens=False)["input_ids"]
    seen = set()
    for k in range(1, len(ids)):
        cut = live.engine.tokenizer.decode(ids[:k])
        named = '"get_weather"' in cut
        complete = cut.rstrip().endswith("}}")  # the JSON body is whole, only the closing marker is missing
        seen.add((named, complete))
        r = client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, max_tokens=k)
        choice = r.choices[0]
        if complete:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None, cut
            assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris"}
        else:  # not JSON yet: the text as the model wrote it, and the honest reason
            assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (cut, None, "length")
        chunks = list(
            client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, max_tokens=k, stream=True)
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
        calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
        if named:
            [call] = calls
            assert call.function.name == "get_weather" and call.id.startswith("call_")
            args = cut.split('"arguments": ', 1)[1].rstrip() if '"arguments": ' in cut else ""  # vLLM strips the body
            assert call.function.arguments == (args[: len('{"city": "Paris"}')] if complete else args)
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
        else:
            assert calls == [] and chunks[-1].choices[0].finish_reason == "length"
    assert seen >= {(False, False), (True, False), (True, True)}  # every case was met


@pytest.mark.parametrize(
    "script",
    [
        '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>',  # not JSON
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',  # not one of the tools
        '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Oslo"}}\n</tool_call>',  # not its schema
        'Sure: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call> done',  # text after
    ],
)
def test_with_tools_the_grammar_refuses_a_call_that_breaks_the_format(client, live, script):
    """The scripted model can write nothing but its script: where the grammar refuses the script's next token,
    no token is left, and the request fails (a real model's next allowed token would be sampled instead)."""
    live.engine.script = script
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS)
    assert e.value.body["code"] == "generation_failed" and "grammar" in e.value.body["message"]
    live.engine.script = script.replace("<tool_call>", "").replace("</tool_call>", "")  # no call opened: free text
    r = client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS)
    assert r.choices[0].message.content == live.engine.script and r.choices[0].finish_reason == "stop"


def test_tool_choice_none_required_and_named(live, client):
    live.engine.script = CALL
    r = client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, tool_choice="none")
    assert "<tools>" not in last_prompt(live)
    assert r.choices[0].message.content == CALL and r.choices[0].finish_reason == "stop"  # not parsed

    live.engine.script = CALL.replace("Paris", "Oslo")
    r = client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, tool_choice="required")
    assert last_prompt(live).endswith("<|im_start|>assistant\n")  # the grammar opens the call, not the prompt
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    assert r.choices[0].finish_reason == "tool_calls"

    live.engine.script = CALL.replace("Paris", "Rome")
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, tool_choice=named)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
    chunks = list(
        client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, tool_choice=named, stream=True)
    )
    [call] = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert json.loads(call.function.arguments) == {"city": "Rome"}

    for choice in ("required", named):  # text instead of a call: refused from the first token
        live.engine.script = "It is sunny."
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS, tool_choice=choice)


def test_a_tool_round_trip_renders_the_call_and_its_result(live, client):
    live.engine.script = CALL
    first = client.chat.completions.create(model="scripted", messages=USER, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    live.engine.script = "It is sunny."
    messages = [
        *USER,
        first.choices[0].message,  # the client's own message object, sent back as is
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
    ]
    r = client.chat.completions.create(model="scripted", messages=messages, tools=TOOLS)
    prompt = last_prompt(live)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"sky": "clear"}\n</tool_response>' in prompt
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------- admission
class Streamer(threading.Thread):
    """A streaming completion read in the background until `stop()` (which drops the connection)."""

    def __init__(self, url: str, **body) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, {"prompt": "x", "stream": True, **body}
        self.events: list = []
        self._stop_reading = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as h, h.stream("POST", self.url + "/v1/completions", json=self.body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                if self._stop_reading.is_set():
                    return

    def stop(self) -> None:
        self._stop_reading.set()
        self.join(30)


def test_a_full_queue_gets_429_and_a_long_wait_503(live, client):
    live.engine.script = "a b c d e f g h"
    live.wait_idle()
    # two streams of at least 10 s hold both slots while a third waits out its 3 s in the queue (generous: a
    # loaded machine must not let the 429 probe arrive after the waiting request has already timed out)
    long = [Streamer(live.url, max_tokens=1000, ignore_eos=True) for _ in range(2)]
    for s in long:
        s.start()
    live.wait_for(lambda h: h["running"] == 2)
    waited: dict = {}

    def queued() -> None:
        start = time.monotonic()
        waited["response"] = httpx.post(live.url + "/v1/completions", json={"prompt": "y", "max_tokens": 3}, timeout=30)
        waited["seconds"] = time.monotonic() - start

    t = threading.Thread(target=queued)
    t.start()
    live.wait_for(lambda h: h["waiting"] == 1)
    with pytest.raises(openai.RateLimitError) as e:  # 2 running + 1 waiting: full
        client.completions.create(model="scripted", prompt="z", max_tokens=3)
    assert e.value.status_code == 429 and e.value.code == "queue_full"
    t.join(30)
    r = waited["response"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
    assert 2.9 < waited["seconds"] < 20
    for s in long:
        s.stop()
    h = live.wait_idle()
    assert h["rejected"] >= 1 and h["timed_out"] >= 1


def test_a_client_that_drops_mid_stream_frees_its_slot(live):
    live.engine.script = "a b c d e f g h"
    before = live.wait_idle()
    s = Streamer(live.url, max_tokens=400, ignore_eos=True)
    s.start()
    live.wait_for(lambda h: h["running"] == 1)
    while len(s.events) < 3:
        time.sleep(0.01)
    s.stop()
    after = live.wait_idle(timeout=3)  # far sooner than the 400 steps (4 s) it would take to finish
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]


def test_a_client_that_gives_up_without_streaming_frees_its_slot(live):
    live.engine.script = "a b c d e f g h"
    before = live.wait_idle()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 400, "ignore_eos": True}, timeout=0.5
        )
    after = live.wait_idle(timeout=3)
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]


def test_a_failed_engine_step_fails_its_requests_with_500_and_serving_goes_on(live, client, caplog):
    live.engine.script = "fine"
    before = live.wait_idle()
    live.engine.fail_next = True
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="scripted", prompt="x", max_tokens=5)
    assert e.value.status_code == 500 and e.value.code == "internal_error"
    # what failed inside stays in the server's log: the client learns that the step failed, nothing more
    assert "simulated" not in e.value.message and "RuntimeError" not in e.value.message
    assert "engine step failed" in e.value.message and "simulated failure" in caplog.text
    assert client.completions.create(model="scripted", prompt="x", max_tokens=5).choices[0].text == "fine"
    after = live.wait_idle()
    assert after["failed"] == before["failed"] + 1 and after["engine_thread_alive"]


def text(streamer: Streamer) -> str:
    return "".join(e["choices"][0]["text"] for e in streamer.events if isinstance(e, dict))


def test_a_request_that_fails_in_the_shared_step_fails_alone(live, client):
    """A request whose logits turn NaN mid-generation (its own failure) ends with 500 generation_failed,
    streamed or not; a stream running beside it goes on to its end, token for token."""
    live.engine.script = "a b c d e f g h"
    body = dict(max_tokens=60, ignore_eos=True)
    alone = Streamer(live.url, **body)
    alone.run()
    before = live.wait_idle()
    for stream in (False, True):
        beside = Streamer(live.url, **body)
        beside.start()
        live.wait_for(lambda h: h["running"] == 1)
        r = httpx.post(
            live.url + "/v1/completions", json={"prompt": "POISON", "max_tokens": 20, "stream": stream}, timeout=30
        )
        if stream:
            events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
            assert r.status_code == 200 and events[-1]["error"]["code"] == "generation_failed"
            assert "not finite" in events[-1]["error"]["message"] and r.text.endswith("data: [DONE]\n\n")
        else:
            assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        assert live.health()["running"] == 1, "the stream beside it ended first: nothing was tested"
        beside.join(30)
        assert text(beside) == text(alone) and len(text(alone)) > 20
        assert beside.events[-2]["choices"][0]["finish_reason"] == "length" and beside.events[-1] == "[DONE]"
    after = live.wait_idle()
    assert after["failed"] == before["failed"] + 2 and after["engine_thread_alive"]


# ---------------------------------------------------------------------------------------------- shutdown
def test_shutdown_lets_in_flight_requests_finish_within_the_grace_period(loaded):
    app, scheduler, _ = scripted_app(*loaded, script="one two three four five six seven eight", delay=0.03)
    server = LiveServer(app, scheduler, grace=20).__enter__()
    s = Streamer(server.url, max_tokens=100)
    s.start()
    server.wait_for(lambda h: h["running"] == 1)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    deadline = time.monotonic() + 10
    while scheduler.accepting and time.monotonic() < deadline:
        time.sleep(0.01)
    # still listening while it drains: a load balancer's probe sees 503, and new requests are refused
    health = httpx.get(server.url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "shutting_down"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=5)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    stopper.join(30)
    s.join(30)
    with pytest.raises(httpx.ConnectError):  # drained: no longer listening
        httpx.get(server.url + "/health", timeout=5)
    assert s.events[-1] == "[DONE]" and s.events[-2]["choices"][0]["finish_reason"] == "stop"
    assert "".join(e["choices"][0]["text"] for e in s.events[:-1]) == "one two three four five six seven eight"
    assert scheduler.join(0) and scheduler.counters["completed"] == 1
    assert scheduler.counters["aborted_at_shutdown"] == 0


def test_shutdown_aborts_what_is_left_after_the_grace_period_and_closes_cleanly(loaded):
    app, scheduler, _ = scripted_app(*loaded, script="a b c", delay=0.02)
    server = LiveServer(app, scheduler, grace=0.3).__enter__()
    s = Streamer(server.url, max_tokens=400, ignore_eos=True)  # about 8 s of work
    s.start()
    plain: dict = {}
    t = threading.Thread(
        target=lambda: plain.update(
            r=httpx.post(
                server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 400, "ignore_eos": True}, timeout=30
            )
        )
    )
    t.start()
    server.wait_for(lambda h: h["running"] == 2)
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 5
    s.join(10)
    t.join(10)
    assert s.events[-1] == "[DONE]" and s.events[-2]["error"]["code"] == "shutting_down"
    assert plain["r"].status_code == 503 and plain["r"].json()["error"]["code"] == "shutting_down"
    assert scheduler.join(0) and scheduler.counters["aborted_at_shutdown"] == 2


def test_sse_wire_format(live):
    live.engine.script = "hi there, a b c d"  # at 10 ms a step, tokens arrive one by one
    with (
        httpx.Client() as h,
        h.stream("POST", live.url + "/v1/chat/completions", json={"messages": USER, "stream": True}) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    pieces = [e["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert len(pieces) >= 5 and "".join(pieces) == "hi there, a b c d"


def test_text_with_unicode_line_separators_stays_one_event_per_line(live):
    """httpx (like str.splitlines) also breaks lines at U+0085, U+2028, U+2029: they must be escaped."""
    text = "a\u2028b\u2029c\x85d\x1ce\r\nf\u00e9\U0001f40d"
    live.engine.script = text
    with (
        httpx.Client() as h,
        h.stream("POST", live.url + "/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 100}) as r,
    ):
        events = sse_events(r)  # json.loads of every line: a split line would fail here
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text
