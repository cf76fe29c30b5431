"""`loopcoder bfcl`: BFCL's own checker and data (bfcl-eval 2026.3.23, from loopcoder's private directory, installed
there on first use), the requests as bfcl's function-calling mode sends them, and the command end to end on a random
tiny model (served in-process, and as a running server)."""

from __future__ import annotations

import importlib
import json

import httpx
import pytest

from loopcoder.cli import main
from loopcoder.evaluation import bfcl
from loopcoder.serving.server import load_app
from loopcoder.utils.errors import LoopcoderError
from support.serving import LiveServer, build_model_dir

FIRST = 3  # entries of each category that the checker tests read


@pytest.fixture(scope="module")
def tools():
    return bfcl.load_bfcl(bfcl.ensure_bfcl(bfcl.default_dir()))


def gold_value(options):
    """The first acceptable value of a possible answer's list ("" marks an optional parameter left out)."""
    value = next(v for v in options if v != "")
    if isinstance(value, dict):  # a dict parameter: each of its keys has its own list of acceptable values
        return {k: gold_value(v) for k, v in value.items() if any(x != "" for x in v)}
    return value


def gold_calls(answer: list[dict]) -> list[dict]:
    """A model result (as the handler reads a response: name -> JSON arguments) that makes the possible answer's
    first choices, with dots in names replaced as OpenAI's function names need (bfcl's underscore_to_dot)."""
    return [
        {name.replace(".", "_"): json.dumps({p: gold_value(v) for p, v in args.items() if any(x != "" for x in v)})}
        for call in answer
        for name, args in call.items()
    ]


@pytest.mark.parametrize("category", [c for c in bfcl.CATEGORIES if "relevance" not in c])
def test_the_checker_scores_gold_answers_right_and_wrong_ones_wrong(tools, category):
    cat = bfcl.load_category(tools, category, FIRST)
    assert len(cat.entries) == FIRST
    for entry in cat.entries:
        answer, functions = cat.answers[entry["id"]], cat.plain[entry["id"]]["function"]
        gold = gold_calls(answer)
        assert bfcl.score(tools, category, gold, functions, answer)["valid"], (entry["id"], gold)
        name, arguments = next(iter(gold[0].items()))
        wrong_name = [{"not_" + name: arguments}, *gold[1:]]
        args = json.loads(arguments)
        first = next(iter(args))
        wrong_value = [{name: json.dumps({**args, first: "surely not this"})}, *gold[1:]]
        text = "I would call a function here."
        for wrong in (wrong_name, wrong_value, text, []):
            checked = bfcl.score(tools, category, wrong, functions, answer)
            assert not checked["valid"] and checked["error_type"], (entry["id"], wrong)


@pytest.mark.parametrize("category", ["irrelevance", "live_irrelevance", "live_relevance"])
def test_relevance_is_whether_a_call_was_made(tools, category):
    cat = bfcl.load_category(tools, category, FIRST)
    for entry in cat.entries:
        name = entry["function"][0]["name"].replace(".", "_")
        call, text = [{name: "{}"}], "There is no function for this."
        expected = {"irrelevance": (False, True), "live_irrelevance": (False, True), "live_relevance": (True, False)}
        assert (
            bfcl.score(tools, category, call, [], None)["valid"],
            bfcl.score(tools, category, text, [], None)["valid"],
        ) == (expected[category])


def test_requests_are_shaped_as_bfcl_sends_them(tools):
    entry = next(e for e in tools.load_dataset_entry("simple_python") if "." in e["function"][0]["name"])
    body = bfcl.request_body(tools, entry, "m")
    assert set(body) == {"input", "model", "store", "temperature", "tools"}  # no tool_choice, as bfcl
    assert body["store"] is False and body["temperature"] == 0.001 and body["model"] == "m"
    [tool] = body["tools"]
    assert (
        tool["type"] == "function"
        and "." not in tool["name"]
        and tool["name"] == entry["function"][0]["name"].replace(".", "_")
    )
    assert tool["parameters"]["type"] == "object"  # bfcl's "dict", converted by its own convert_to_tool
    assert tool["description"].endswith("Note that the provided function is in Python 3 syntax.")
    live = next(e for e in tools.load_dataset_entry("live_multiple") if e["question"][0][0]["role"] == "system")
    assert bfcl.request_body(tools, live, "m")["input"][0]["role"] == "developer"


def test_the_model_result_is_read_as_bfcls_handler_reads_it():
    call = {"type": "function_call", "name": "f", "arguments": '{"x": 1}', "call_id": "c"}
    text = {"type": "message", "content": [{"type": "output_text", "text": "hi"}]}
    assert bfcl.model_result({"output": [text, call, call]}) == [{"f": '{"x": 1}'}, {"f": '{"x": 1}'}]
    assert bfcl.model_result({"output": [text]}) == "hi"
    assert bfcl.decode_ast([{"f": '{"x": 1}'}]) == [{"f": {"x": 1}}]
    with pytest.raises(AttributeError):
        bfcl.decode_ast("hi")


def test_categories_and_bad_input():
    assert bfcl.parse_categories("simple,live_relevance") == ["simple_python", "live_relevance"]
    assert bfcl.parse_categories("all") == list(bfcl.CATEGORIES)
    assert bfcl.parse_categories("live") == list(bfcl.LIVE)
    with pytest.raises(LoopcoderError, match="unknown BFCL category 'multi_turn_base'"):
        bfcl.parse_categories("simple,multi_turn_base")


def test_a_directory_the_user_names_is_never_installed_into(tmp_path):
    with pytest.raises(LoopcoderError, match="no bfcl-eval there"):
        bfcl.ensure_bfcl(tmp_path, install=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("model"), context=8192)  # BFCL's tools, in a 400-token vocabulary


CATEGORIES = "simple,parallel,irrelevance,live_relevance"


def test_the_command_runs_end_to_end_and_resumes(tools, model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bfcl.json"
    args = ["bfcl", "--model", str(model_dir), "--categories", CATEGORIES, "--limit", "2", "--out", str(out)]
    assert main([*args, "--max-tokens", "64", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    cats = results["bfcl"]["categories"]
    assert list(cats) == ["simple_python", "parallel", "irrelevance", "live_relevance"]
    for name, cat in cats.items():
        assert cat["n"] == 2 and len(cat["items"]) == 2 and 0 <= cat["correct"] <= 2
        low, high = cat["ci95"]
        assert low <= cat["accuracy"] <= high and f"{name:24s}" in printed
        assert all(
            item["refused"] is False and item["status"] in ("completed", "incomplete") for item in cat["items"].values()
        )
    assert results["bfcl"]["overall"]["n"] == 8 and results["identity"]["bfcl_eval"] == bfcl.BFCL_VERSION

    def no_request(*a, **k):
        raise AssertionError("a resumed run sent a request")

    monkeypatch.setattr(bfcl, "post_json", no_request)
    assert main([*args, "--max-tokens", "64", "--threads", "1"]) == 0
    assert json.loads(out.read_text())["bfcl"]["categories"] == cats
    assert main([*args, "--max-tokens", "65", "--threads", "1"]) == 2  # other settings: refused, names them
    assert "max_tokens 64 -> 65" in capsys.readouterr().err


def test_the_command_against_a_running_server(tools, model_dir, tmp_path, capsys):
    app, scheduler = load_app(str(model_dir), max_batch=4, model_name="served", max_tokens=64)
    out = tmp_path / "bfcl.json"
    with LiveServer(app, scheduler) as server:
        args = [
            "bfcl",
            "--server",
            server.url + "/v1",
            "--categories",
            "irrelevance",
            "--limit",
            "2",
            "--out",
            str(out),
        ]
        assert main(args) == 0
    results = json.loads(out.read_text())
    assert results["model_id"] == "served" and results["bfcl"]["categories"]["irrelevance"]["n"] == 2


@pytest.mark.parametrize("handler", ["responses", "chat_completions"])
def test_bfcl_shaped_requests_are_accepted(tools, model_dir, handler):
    """bfcl's two OpenAI-compatible function-calling handlers, with their own tool conversion: OpenAIResponsesHandler
    (its gpt-4o/gpt-4.1 `-FC` entries) posts to /v1/responses, OpenAICompletionsHandler (the entries that read
    OPENAI_BASE_URL for Chat Completions) to /v1/chat/completions; both send `store: false`, temperature 0.001 and
    no tool_choice. The chat one passes where the chat endpoint accepts `store` (issue 23, item 1)."""
    styles = importlib.import_module("bfcl_eval.constants.enums").ModelStyle
    app, scheduler = load_app(str(model_dir), max_batch=4, model_name="m", max_tokens=16)
    with LiveServer(app, scheduler) as server:
        for category in ("simple_python", "parallel_multiple", "live_multiple", "irrelevance"):
            entry = tools.load_dataset_entry(category)[0]
            if handler == "responses":
                path, body = "/v1/responses", bfcl.request_body(tools, entry, "m")
            else:
                converted = tools.convert_to_tool(entry["function"], tools.openapi_types, styles.OPENAI_COMPLETIONS)
                path = "/v1/chat/completions"
                body = {"messages": entry["question"][0], "model": "m", "temperature": 0.001, "store": False}
                body["tools"] = converted
            r = httpx.post(server.url + path, json=body, timeout=120)
            assert r.status_code == 200, (category, r.text)
            assert ("output" if handler == "responses" else "choices") in r.json()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--server", "http://127.0.0.1:9/v1", "--categories", "nope"], "unknown BFCL category"),
        (["--model", "x", "--served-model", "m"], "--served-model goes with --server"),
        (["--server", "http://127.0.0.1:9/v1", "--limit", "0"], "--limit must be >= 1"),
        (["--server", "http://127.0.0.1:9/v1", "--limit", "1"], "cannot list its models"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tools, args, message, capsys, tmp_path):
    assert main(["bfcl", *args, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
