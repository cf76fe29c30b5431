"""Agent clients against `loopcoder serve`, unchanged, as a user points them at it: the OpenAI Agents SDK (its default
Responses model and its Chat Completions model), smolagents' ToolCallingAgent and mini-swe-agent's model layer
(litellm, `openai/<id>` with an `api_base`). The target is 0 refused requests: every HTTP response each client gets
is recorded, and must be a 200.

Two servers: a random tiny model, where grammar-constrained tool calls make every call valid (`tool_choice`
"required" where a client would otherwise let a random model ramble), and a scripted engine that calls the tool
until the prompt holds its result and then answers, for a whole tool loop. The clients are in the `agents` extra
(`pip install -e ".[agents]"`); mini-swe-agent, whose litellm is 200 MB, is not: each test skips, saying so, when
its client is missing."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Literal

import httpx
import openai
import pytest

from loopcoder.model.loading import load_for_inference
from loopcoder.serving.server import load_app
from support.serving import LiveServer, build_model_dir, scripted_app

# litellm reads these when it is imported: no download of its price list, no retries, no cost errors
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("MSWEA_COST_TRACKING", "ignore_errors")
os.environ.setdefault("MSWEA_CONFIGURED", "true")
os.environ.setdefault("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "1")

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ANSWER = "It is sunny in Paris."
FORECAST = "sunny, 21 C"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("model"), context=8192)  # smolagents' prompt: ~3000 tokens here


@pytest.fixture(scope="module")
def random_server(model_dir):
    app, scheduler = load_app(str(model_dir), max_batch=4, max_queue=16, model_name="tiny", max_tokens=1500)
    with LiveServer(app, scheduler) as server:
        yield server


@pytest.fixture(scope="module")
def loop_server(model_dir):
    """Calls get_weather(Paris) until the prompt holds the tool's result, then answers."""
    app, scheduler, engine = scripted_app(*load_for_inference(str(model_dir)), script=CALL, max_tokens=500)
    engine.replies = {FORECAST: ANSWER}
    with LiveServer(app, scheduler) as server:
        yield server


class Statuses:
    """httpx event hooks that record the status of every response a client gets."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def sync(self, response: httpx.Response) -> None:
        self.seen.append((response.request.url.path, response.status_code))

    async def async_(self, response: httpx.Response) -> None:
        self.sync(response)

    def refused(self) -> list[tuple[str, int]]:
        return [s for s in self.seen if s[1] != 200]


def async_openai(server, statuses: Statuses) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(event_hooks={"response": [statuses.async_]}, timeout=120)
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, http_client=http)


# ---------------------------------------------------------------------------------------------- OpenAI Agents SDK
@pytest.fixture
def agents():
    sdk = pytest.importorskip("agents", reason="openai-agents is not installed (pip install -e '.[agents]')")
    sdk.set_tracing_disabled(True)  # tracing would export to OpenAI
    return sdk


def weather_tool(agents, calls: list[str]):
    @agents.function_tool
    def get_weather(city: Literal["Paris", "Oslo", "Rome"]) -> str:
        """The weather forecast for a city."""
        calls.append(city)
        return FORECAST

    return get_weather


def run_agent(agents, agent, prompts: list[str], streamed: bool = False) -> list:
    """One run per prompt, in one event loop (the client's connections belong to it)."""

    async def one(prompt: str):
        if not streamed:
            return await agents.Runner.run(agent, prompt, max_turns=4)
        result = agents.Runner.run_streamed(agent, prompt, max_turns=4)
        async for _ in result.stream_events():
            pass
        return result

    async def every():
        return [await one(p) for p in prompts]

    return asyncio.run(every())


@pytest.mark.parametrize("streamed", [False, True])
def test_agents_default_responses_model_runs_a_tool_loop(agents, loop_server, streamed):
    statuses, calls = Statuses(), []
    agents.set_default_openai_client(async_openai(loop_server, statuses), use_for_tracing=False)
    agents.set_default_openai_api("responses")  # the SDK's default: the model is OpenAIResponsesModel
    agent = agents.Agent(
        name="weather", instructions="Answer briefly.", model="scripted", tools=[weather_tool(agents, calls)]
    )
    [result] = run_agent(agents, agent, ["Weather in Paris?"], streamed)
    assert result.final_output == ANSWER and calls == ["Paris"]
    assert [p for p, _ in statuses.seen] == ["/v1/responses"] * 2 and not statuses.refused()
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]


@pytest.mark.parametrize("streamed", [False, True])
def test_agents_chat_completions_model_runs_a_tool_loop(agents, loop_server, streamed):
    statuses, calls = Statuses(), []
    model = agents.OpenAIChatCompletionsModel(model="scripted", openai_client=async_openai(loop_server, statuses))
    agent = agents.Agent(name="weather", model=model, tools=[weather_tool(agents, calls)])
    [result] = run_agent(agents, agent, ["Weather in Paris?"], streamed)
    assert result.final_output == ANSWER and calls == ["Paris"]
    assert [p for p, _ in statuses.seen] == ["/v1/chat/completions"] * 2 and not statuses.refused()


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_agents_on_a_random_model_get_valid_tool_calls(agents, random_server, api):
    """A random model, constrained: each run's first turn must call the tool (tool_choice "required") and the
    SDK validates its arguments against the tool's strict schema, so a run ends with the tool's own output."""
    statuses, calls = Statuses(), []
    client = async_openai(random_server, statuses)
    model = (
        agents.OpenAIResponsesModel(model="tiny", openai_client=client)
        if api == "responses"
        else agents.OpenAIChatCompletionsModel(model="tiny", openai_client=client)
    )
    agent = agents.Agent(
        name="weather",
        model=model,
        tools=[weather_tool(agents, calls)],
        model_settings=agents.ModelSettings(
            tool_choice="required", parallel_tool_calls=False, temperature=0.8, max_tokens=200
        ),  # one call, bounded (its argument is an enum): never cut
        tool_use_behavior="stop_on_first_tool",
    )
    results = run_agent(agents, agent, [f"Weather in city number {i}?" for i in range(5)])
    assert [r.final_output for r in results] == [FORECAST] * 5
    assert len(calls) == 5 and all(isinstance(c, str) for c in calls)
    assert len(statuses.seen) == 5 and not statuses.refused()


# ---------------------------------------------------------------------------------------------- smolagents
def test_smolagents_tool_calling_agent(random_server):
    smolagents = pytest.importorskip("smolagents", reason="smolagents is not installed (pip install -e '.[agents]')")

    class Weather(smolagents.Tool):
        name = "get_weather"
        description = "The weather forecast for a city."
        inputs = {"city": {"type": "string", "description": "the city"}}
        output_type = "string"

        def forward(self, city: str) -> str:
            return FORECAST

    statuses = Statuses()
    model = smolagents.OpenAIServerModel(
        model_id="tiny",
        api_base=random_server.url + "/v1",
        api_key="unused",
        client_kwargs={"max_retries": 0, "http_client": httpx.Client(event_hooks={"response": [statuses.sync]})},
        temperature=0.8,
        max_tokens=1500,  # a random model's unbounded strings end after a few hundred tokens
        parallel_tool_calls=False,  # else a random model calls final_answer beside another tool (smolagents refuses)
        seed=0,  # sent as is: each request samples the same way on every run
    )
    agent = smolagents.ToolCallingAgent(tools=[Weather()], model=model, max_steps=2, verbosity_level=0)
    agent.run("What is the weather in Paris?")
    steps = [s for s in agent.memory.steps if isinstance(s, smolagents.ActionStep)]
    assert steps and len(statuses.seen) == len(steps) and not statuses.refused()
    # every step got tool calls that smolagents accepted: no "not in the tool's input schema", no parse errors
    errors = [str(s.error) for s in steps if s.error is not None]
    assert not [e for e in errors if "Max steps" not in e], errors
    assert all(s.tool_calls for s in steps)


# ---------------------------------------------------------------------------------------------- mini-swe-agent
@pytest.fixture
def litellm_model():
    pytest.importorskip(
        "minisweagent",
        reason="mini-swe-agent is not installed (its litellm is 200 MB: pip install mini-swe-agent==2.4.6)",
    )
    from minisweagent.models.litellm_model import LitellmModel

    return LitellmModel


def test_mini_swe_agent_model_layer_gets_bash_actions(litellm_model, random_server, loop_server):
    """mini-swe-agent's model as its docs configure a local server: `openai/<id>` with `api_base` and a dummy key.
    It sends the bash tool and no tool_choice; on the random model we ask for a call ("required") through its
    `model_kwargs`, as a config file can."""
    kwargs = {"api_base": random_server.url + "/v1", "api_key": "unused", "max_tokens": 1500, "tool_choice": "required"}
    model = litellm_model(model_name="openai/tiny", model_kwargs=kwargs)
    messages = [{"role": "system", "content": "You run bash."}, {"role": "user", "content": "List the files."}]
    for _ in range(3):
        message = model.query(messages)
        actions = message["extra"]["actions"]  # one or more: a random model may call in parallel
        assert actions and all(isinstance(a["command"], str) for a in actions)
        assert {c["function"]["name"] for c in message["tool_calls"]} == {"bash"}

    bash_call = '<tool_call>\n{"name": "bash", "arguments": {"command": "ls -la"}}\n</tool_call>'
    scripted = litellm_model(
        model_name="openai/scripted", model_kwargs={"api_base": loop_server.url + "/v1", "api_key": "x"}
    )
    loop_server.scheduler.engine.script = bash_call
    try:
        message = scripted.query(messages)
    finally:
        loop_server.scheduler.engine.script = CALL
    assert message["extra"]["actions"][0]["command"] == "ls -la"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"command": "ls -la"}
