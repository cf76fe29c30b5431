"""`loopcoder serve` against a live server on loopback, through the official `openai` client and raw HTTP:
a tiny random model with a real tokenizer and chat template."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from loopcoder.cli import main
from loopcoder.serving.server import load_app
from support.serving import AUTH, CONTEXT, KEY, LiveServer

MAX_TOKENS = 300  # the server's cap on max_tokens
PROMPT = "def step(self, tokens):\n    "


@pytest.fixture(scope="module")
def live(model_dir):
    app, scheduler = load_app(
        str(model_dir),
        max_batch=4,
        max_queue=8,
        queue_timeout=30,
        model_name="tiny",
        api_key=KEY,
        max_tokens=MAX_TOKENS,
        max_body_bytes=64 * 1024,
    )
    with LiveServer(app, scheduler) as server:
        yield server


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(live, path, body, headers=AUTH, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        live.url + path, content=data, headers={"Content-Type": "application/json", **headers}, timeout=60, **kw
    )


# ---------------------------------------------------------------------------------------------- basics
def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    h = httpx.get(live.url + "/health").json()  # open without the key
    assert h["status"] == "ok" and h["running"] == 0 and h["engine_thread_alive"]


def test_every_endpoint_but_health_needs_the_key(live):
    wrong = openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert e.value.status_code == 401
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/nothing-here"),
    ]:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
            r = httpx.request(method, live.url + path, headers=headers, content=b"{}")
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(live.url + "/health").status_code == 200


# ---------------------------------------------------------------------------------------------- outputs
def test_greedy_completion_equals_loopcoder_generate(live, client, model_dir, capsys):
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "24"]) == 0
    expected = capsys.readouterr().out
    assert expected.endswith("\n")
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == expected[:-1]
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(live.scheduler.engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 24 else "stop")


def test_greedy_chat_equals_loopcoder_generate_chat(client, model_dir, capsys):
    capsys.readouterr()
    assert (
        main(["generate", "--model", str(model_dir), "--chat", "--prompt", "Write a loop.", "--max-new-tokens", "24"])
        == 0
    )
    generated = capsys.readouterr().out[:-1]
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Write a loop."}], max_tokens=24, temperature=0
    )
    # the server also stops at the end of the assistant turn; `generate` stops only at end-of-text
    assert r.choices[0].message.content == generated.split("<|im_end|>")[0]
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.tool_calls is None
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_streaming_gives_the_same_text_as_non_streaming(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len([c for c in chunks if c.choices]) >= 2  # streamed (pieces merge when the client lags)

    messages = [{"role": "system", "content": "You write code."}, {"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0)
    chunks = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[0].object == "chat.completion.chunk" and len({c.id for c in chunks}) == 1


def test_stop_sequences_cut_the_output_streaming_or_not(client):
    text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=60, temperature=0).choices[0].text
    stop = text[20:24]
    assert len(stop) == 4
    cut = text[: text.index(stop)]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=60, temperature=0, stop=[stop, "\x00zz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=60, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_n_samples_with_seed_are_reproducible_and_sample_i_uses_seed_plus_i(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9)
    r = client.completions.create(n=3, seed=7, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1  # different samples
    assert [c.text for c in client.completions.create(n=3, seed=7, **kw).choices] == texts
    assert client.completions.create(n=1, seed=8, **kw).choices[0].text == texts[1]
    assert r.usage.prompt_tokens == client.completions.create(n=1, seed=7, **kw).usage.prompt_tokens  # once
    assert r.usage.completion_tokens == sum(  # counted over the choices
        client.completions.create(n=1, seed=7 + i, **kw).usage.completion_tokens for i in range(3)
    )
    greedy = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a"}], n=2, max_tokens=8, temperature=0
    )
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_max_tokens_is_capped_by_the_server(client):
    r = client.completions.create(
        model="tiny", prompt="x", max_tokens=10**6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == MAX_TOKENS and r.choices[0].finish_reason == "length"
    # without max_tokens: OpenAI's default of 16 for completions
    r = client.completions.create(model="tiny", prompt="x", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_a_batch_of_prompts_text_and_token_ids(live, client):
    ids = live.scheduler.engine.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    r = client.completions.create(model="tiny", prompt=[PROMPT, "class A:"], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    as_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert as_ids.choices[0].text == r.choices[0].text == r.choices[1].text


def test_concurrent_requests_share_decode_steps(live, client):
    """Four clients at once: they run in one batch (far fewer engine steps than tokens), each with the
    output it gets alone."""
    prompts = ["def a(", "class B:", "import torch\n", "x = [i for"]
    alone = [
        client.completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        .choices[0]
        .text
        for p in prompts
    ]
    before = live.health()["steps"]
    out = [None] * 4

    def one(i):
        out[i] = (
            client.completions.create(
                model="tiny", prompt=prompts[i], max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
            )
            .choices[0]
            .text
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == alone
    assert live.health()["steps"] - before < 4 * 40 * 0.75  # 160 tokens if nothing were shared


def stream_text(live, body: dict) -> tuple[str, list]:
    """A streaming completion over raw HTTP: its text and the finish reasons / errors it reported."""
    text, ends = "", []
    with httpx.stream(
        "POST", live.url + "/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    ends.append(event["error"]["code"])
                    continue
                text += event["choices"][0]["text"]
                if event["choices"][0]["finish_reason"]:
                    ends.append(event["choices"][0]["finish_reason"])
    return text, ends


def test_an_extreme_top_p_neither_fails_nor_disturbs_the_streams_beside_it(live):
    """`top_p` 1e-300 is 0 in fp32: sampling used to raise inside the shared decode step, which failed
    every request in flight. Now it keeps the most likely token (or is refused up front), and three
    streams running beside it end as they would alone."""
    prompts = ["def a(", "class B:", "import torch\n"]
    body = dict(max_tokens=150, temperature=0, ignore_eos=True)
    alone = [stream_text(live, {"prompt": p, **body}) for p in prompts]
    before = live.wait_idle()
    out: list = [None] * 3
    threads = [
        threading.Thread(target=lambda i=i: out.__setitem__(i, stream_text(live, {"prompt": prompts[i], **body})))
        for i in range(3)
    ]
    for t in threads:
        t.start()
    live.wait_for(lambda h: h["running"] == 3)
    r = post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2, "top_p": 1e-300})
    assert r.status_code in (200, 400), r.text  # 400 if the server refuses such a value; never a 500
    if r.status_code == 200:
        greedy = post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 0})
        assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    running = live.health()["running"]
    for t in threads:
        t.join(60)
    assert running >= 1, "the streams ended before the extreme request: nothing was tested"
    assert out == alone and all(ends == ["length"] for _, ends in out)
    assert live.wait_idle()["failed"] == before["failed"]


def test_null_parameters_mean_their_defaults(live):
    nulls = dict.fromkeys(
        [
            "max_tokens",
            "temperature",
            "top_p",
            "n",
            "seed",
            "stop",
            "stream",
            "stream_options",
            "user",
            "logprobs",
            "suffix",
            "model",
        ]
    )
    r = post(live, "/v1/completions", {"prompt": PROMPT, **nulls})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16
    del nulls["suffix"]  # completions only
    r = post(
        live,
        "/v1/chat/completions",
        {
            **nulls,
            "messages": [{"role": "user", "content": "a", "name": None}],
            "tools": None,
            "tool_choice": None,
            "max_tokens": 4,
        },
    )
    assert r.status_code == 200, r.text
    r = post(live, "/v1/completions", {"prompt": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


# ---------------------------------------------------------------------------------------------- errors
BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"\xff\xfe", 400, None),
    ({"prompt": "x", "max_tokenz": 5}, 400, "max_tokenz"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [[1, 2], []]}, 400, "prompt"),
    ({"prompt": [1, 2, 10**6]}, 400, "prompt"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 5}, 400, "n"),  # more choices than the batch (4)
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "stop": ["s"] * 33}, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "x", "logit_bias": {"a": 5}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"100000": 5}}, 400, "logit_bias"),  # outside the vocabulary
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),  # only with echo
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs"),  # an integer for completions
    ({"prompt": "x", "model": "other"}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_completion_requests_get_an_openai_style_4xx(live, body, status, param):
    r = post(live, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x", "mood": "happy"}]}, "messages.0.mood"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages.0.content",
    ),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "tool_choice"),
    (
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "a b"}}]},
        "tools.0.function.name",
    ),
    (
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "tool_choice",
    ),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),  # needs logprobs
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "modalities": ["text", "audio"]}, "modalities"),
    ({"messages": [{"role": "user", "content": "x"}], "audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
    ({"messages": [{"role": "user", "content": "x"}], "moderation": {"model": "omni"}}, "moderation"),
    ({"messages": [{"role": "user", "content": "x"}], "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"messages": [{"role": "user", "content": "x"}], "store": "no"}, "store"),  # ignored, but typed
    ({"messages": [{"role": "user", "content": "x"}], "function_call": "auto"}, "function_call"),  # no functions
    (
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "functions": [{"name": "g"}],
        },
        "functions",
    ),
    (
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "custom", "custom": {"name": "grep"}}],
        },
        "tools.0",
    ),
    (
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {
                "type": "allowed_tools",
                "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "g"}}]},
            },
        },
        "tool_choice",
    ),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages.0.name"),  # a legacy result names its function
]


@pytest.mark.parametrize(("body", "param"), BAD_CHAT)
def test_bad_chat_requests_get_a_400_naming_the_field(live, body, param):
    r = post(live, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_too_long_prompts_body_limits_and_unknown_routes(live, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=list(range(5, 5 + CONTEXT)), max_tokens=1)
    assert e.value.code == "context_length_exceeded" and f"{CONTEXT - 1} tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 2000}])
    assert e.value.code == "context_length_exceeded"
    r = post(live, "/v1/completions", {"prompt": "x" * 100_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = post(live, "/v1/embeddings", {"input": "x"})
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(live.url + "/v1/completions", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()
    assert live.health()["failed"] == 0  # nothing reached the engine as an error
