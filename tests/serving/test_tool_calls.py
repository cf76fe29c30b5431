"""The Hermes tool-call parser, its streaming wrapper, and parser selection."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from loopcoder.errors import LoopcoderError
from loopcoder.serving.tool_calls import (
    HermesToolCallParser,
    ToolCallParser,
    ToolCallStream,
    get_tool_parser,
)

P = HermesToolCallParser()
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


def test_one_call_becomes_a_tool_call_and_leaves_no_content():
    out = P.parse(WEATHER)
    assert out.content is None
    [call] = out.tool_calls
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris", "days": 2}
    assert call.id.startswith("call_") and len(call.id) == 29
    assert call.to_openai() == {
        "id": call.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": call.arguments},
    }


def test_text_around_calls_is_content_and_several_calls_keep_their_order():
    text = f'Let me check.\n{WEATHER}\n<tool_call>{{"name": "now"}}</tool_call>\n\nDone.'
    out = P.parse(text)
    assert [c.name for c in out.tool_calls] == ["get_weather", "now"]
    assert out.tool_calls[1].arguments == "{}"  # no arguments: an empty object
    assert out.content == "Let me check.Done."
    assert len({c.id for c in out.tool_calls}) == 2


def test_arguments_given_as_a_json_string_are_kept_as_is():
    out = P.parse('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert out.tool_calls[0].arguments == '{"x": 1}'


def test_unicode_arguments_survive():
    out = P.parse('<tool_call>{"name": "say", "arguments": {"text": "héllo ✓"}}</tool_call>')
    assert json.loads(out.tool_calls[0].arguments) == {"text": "héllo ✓"}


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "", "arguments": {}}</tool_call>',
        '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>',
        '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>',
        '<tool_call>["f", {}]</tool_call>',
        '<tool_call>{"name": "f"} {"name": "g"}</tool_call>',
        "<tool_call></tool_call>",
        '<tool_call>{"name": "f", "arguments": {}}',  # unterminated: generation stopped inside the call
    ],
)
def test_malformed_calls_stay_in_the_content_verbatim(block):
    text = f"before {block} after"
    out = P.parse(text)
    assert out.tool_calls == []
    assert out.content == text


def test_a_malformed_call_next_to_a_valid_one_is_kept_as_text():
    bad = "<tool_call>{oops}</tool_call>"
    out = P.parse(f"{bad}\n{WEATHER}")
    assert [c.name for c in out.tool_calls] == ["get_weather"]
    assert out.content == bad


def test_text_without_calls_is_unchanged():
    for text in ["", "  plain text \n", "a <tool_call without close", "</tool_call> stray close"]:
        out = P.parse(text)
        assert out.content == text and out.tool_calls == []


def test_a_call_written_in_the_call_format_parses_back():
    fmt = P.call_format()
    schema = fmt.body_schema("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}})
    body = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    jsonschema.validate(body, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "other", "arguments": {}}, schema)
    out = P.parse(fmt.begin + json.dumps(body) + fmt.end + fmt.separator + fmt.begin + json.dumps(body) + fmt.end)
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [("get_weather", {"city": "Oslo"})] * 2
    assert out.content is None
    assert fmt.body_schema("now", None)["properties"]["arguments"] == {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }


def _stream(text: str, cuts: list[int]) -> tuple[str, list]:
    """Feed `text` cut at `cuts`, collecting calls as they complete: (content, calls)."""
    s = ToolCallStream(P)
    streamed, pos, calls = "", 0, []
    for cut in [*cuts, len(text)]:
        streamed += s.feed(text[pos:cut])
        calls += s.calls()
        pos = cut
    rest = s.finish()
    return streamed + (rest.content or ""), calls + rest.tool_calls


@pytest.mark.parametrize(
    "text",
    [
        "no calls at all, just text  \n",
        f"Sure.\n\n{WEATHER}",
        f"{WEATHER}\n{WEATHER}",
        f"x <tool_call>{{bad}}</tool_call> y {WEATHER} z",
        "ends with a partial marker <tool_",
        'ends inside a call <tool_call>{"name": "f"',
        '<<tool_call>{"name": "f"}</tool_call>>',
        "   ",
    ],
)
def test_streaming_in_any_pieces_equals_parsing_the_whole(text):
    whole = P.parse(text)
    rng = random.Random(0)
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), rng.randint(0, 8))))
        content, calls = _stream(text, cuts)
        assert content == (whole.content or "")
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.tool_calls]


def test_streaming_sends_text_before_the_marker_early_and_holds_a_partial_marker():
    s = ToolCallStream(P)
    assert s.feed("Hello") == "Hello"
    assert s.feed(" wor") == " wor"
    assert s.feed("ld <tool") == "ld"  # " <tool" could open a call: held back
    assert s.feed("box>") == " <toolbox>"  # it did not
    assert s.feed('\n<tool_call>{"name": "f"}') == ""
    assert s.calls() == []
    assert s.feed("</tool_call>") == ""
    [call] = s.calls()  # complete: sent before the choice ends
    assert call.name == "f" and s.calls() == []
    rest = s.finish()
    assert rest.content == "" and rest.tool_calls == []


def test_parsers_are_pluggable_by_name_or_import_path():
    assert isinstance(get_tool_parser("hermes"), HermesToolCallParser)
    custom = get_tool_parser("support.serving:CallLineParser")
    assert isinstance(custom, ToolCallParser)
    assert [
        c.name
        for c in custom.parse('CALL {"name": "f", "arguments": {}}\nCALL {"name": "g", "arguments": {}}').tool_calls
    ] == ["f", "g"]
    with pytest.raises(LoopcoderError, match="unknown tool parser"):
        get_tool_parser("nope")
    with pytest.raises(LoopcoderError, match="cannot import"):
        get_tool_parser("no_such_module_xyz:Parser")
    with pytest.raises(LoopcoderError, match="lacks"):
        get_tool_parser("json:JSONDecoder")
