"""The Hermes tool-call parser, its streaming wrapper, and parser selection."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from loopcoder.serving.tool_calls import (
    HermesToolCallParser,
    ToolCallParser,
    ToolCallStream,
    closed_schema,
    get_tool_parser,
    parse_cut,
)
from loopcoder.utils.errors import LoopcoderError
from support.whole_streams import WholeToolCallStream

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


# ---------------------------------------------------------------------------------------------- a reply cut short
CUT = [  # (cut reply, vLLM's whole-reply answer: (content, calls), its stream's calls (name, arguments))
    ('Let me see. <tool_call>\n{"na', ("same", []), []),  # the name is not complete
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', ("same", []), [("get_weather", '{"city": "Pa')]),
    ('<tool_call>\n{"name": "get_weather"', ("same", []), [("get_weather", "")]),  # no arguments yet
    (  # the body is whole, its closing marker is not: a call, both ways
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n',
        (None, [("get_weather", {"city": "Paris", "days": 2})]),
        [("get_weather", '{"city": "Paris", "days": 2}')],
    ),
    (  # half a closing marker: the whole reply is not JSON after the marker (vLLM's json.loads fails); the stream
        # drops the partial marker first
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_',
        ("same", []),
        [("now", "{}")],
    ),
    (  # a complete call, then a cut one: vLLM's whole-reply parser fails on the second and keeps none
        f'{WEATHER}\n<tool_call>\n{{"name": "now", "argu',
        ("same", []),
        [("get_weather", '{"city": "Paris", "days": 2}'), ("now", "")],
    ),
]


@pytest.mark.parametrize(("text", "whole", "streamed"), CUT)
def test_a_reply_cut_inside_a_call_is_read_as_vllm_reads_it(text, whole, streamed):
    out = parse_cut(P, text)
    content, calls = whole
    assert out.content == (text if content == "same" else content)
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == calls
    for cuts in ([], [len(text) // 3, len(text) // 2]):  # streamed in any pieces
        s = ToolCallStream(P)
        sent, pos, got = "", 0, []
        for cut in [*cuts, len(text)]:
            sent += s.feed(text[pos:cut])
            got += s.calls()
            pos = cut
        rest = s.finish(cut=True)
        got += rest.tool_calls
        assert sent + (rest.content or "") == text[: text.find("<tool_call>")].rstrip()  # nothing from the marker on
        assert [(c.name, c.arguments) for c in got] == streamed


def test_a_reply_that_ends_normally_is_parsed_as_before():
    for text in (WEATHER, f"Sure.\n{WEATHER}", "just text"):
        assert parse_cut(P, text).content == P.parse(text).content
        assert [c.arguments for c in parse_cut(P, text).tool_calls] == [c.arguments for c in P.parse(text).tool_calls]


# ---------------------------------------------------------------------------------------------- closed schemas
def test_tool_parameters_are_closed_where_they_do_not_say_otherwise():
    smol = {  # smolagents' shape: no additionalProperties anywhere
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "The city."},
            "unit": {"type": "string", "nullable": True},
            "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
            "stops": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
            "extra": {"type": "object"},  # a free-form map: closed, it could only be {}
        },
        "required": ["city"],
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}},
    }
    out = closed_schema(smol)
    assert out["additionalProperties"] is False
    assert out["properties"]["where"]["additionalProperties"] is False
    assert out["properties"]["stops"]["items"]["additionalProperties"] is False
    assert out["$defs"]["point"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["extra"]
    assert "additionalProperties" not in smol  # a copy: the request's own schema is untouched
    jsonschema.validate({"city": "Oslo", "where": {"lat": 1.0}}, out)
    for extra in ({"city": "Oslo", "town": "x"}, {"city": "Oslo", "where": {"lat": 1.0, "lon": 2.0}}):
        jsonschema.validate(extra, smol)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(extra, out)
    said = {  # what a schema says stays as it is
        "type": "object",
        "properties": {
            "open": {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
            "typed": {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "integer"}},
            "loose": {"type": "object", "properties": {"a": {}}, "required": ["b"]},  # b is not listed: not closed
            "both": {"allOf": [{"type": "object", "properties": {"a": {}}}, {"properties": {"b": {}}}]},
        },
    }
    out = closed_schema(said)
    props = out["properties"]
    assert props["open"]["additionalProperties"] is True and props["typed"]["additionalProperties"] == {
        "type": "integer"
    }
    assert "additionalProperties" not in props["loose"]
    assert all("additionalProperties" not in m for m in props["both"]["allOf"])
    jsonschema.validate({"both": {"a": 1, "b": 2}}, out)  # composition still works


# ------------------------------------------------------------------ block-by-block streaming against the old whole
class WithoutEndMarker:
    """Hermes without `end_marker`: the stream cannot read it block by block, so it parses the whole buffer."""

    start_marker = P.start_marker
    parse = staticmethod(P.parse)
    call_format = staticmethod(P.call_format)


FRAGMENTS = [
    "Sure.",
    " ",
    "\n",
    "  \n ",
    "<tool_call>",
    "</tool_call>",
    "<tool_",
    "</tool",
    "call>",
    "<",
    '{"name": "f", "arguments": {"x": 1}}',
    '\n{"name": "get_weather", "arguments": {"city": "Zürich 🙂"}}\n',
    '{"name": "g", "arguments": "{\\"a\\": [1, 2]}"}',
    '{"name": "", "arguments": {}}',
    "{bad json",
    '{"name": "h", "argu',
    "<<tool_call>>",
    "日本語",
]


def _drive(stream, pieces: list[str], cut: bool) -> list:
    seen = [(stream.feed(p), [(c.name, c.arguments) for c in stream.calls()]) for p in pieces]
    rest = stream.finish(cut)
    return [seen, rest.content, [(c.name, c.arguments) for c in rest.tool_calls]]


@pytest.mark.parametrize("parser", [P, WithoutEndMarker()], ids=["blocks", "whole"])
@pytest.mark.parametrize("seed", range(4))
def test_streaming_block_by_block_matches_parsing_the_whole_buffer_every_time(parser, seed):
    rng = random.Random(seed)
    for _ in range(300):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 14)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 12))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        if rng.random() < 0.3:
            pieces = list(text)  # a character at a time: a marker completed by every one of its characters
        for cut in (False, True):
            new = _drive(ToolCallStream(parser), pieces, cut)
            assert new == _drive(WholeToolCallStream(parser), pieces, cut), (pieces, cut)


class CountingParser(HermesToolCallParser):
    def __init__(self):
        super().__init__()
        self.seen = 0

    def parse(self, text):
        self.seen += len(text)
        return super().parse(text)


def test_each_block_is_parsed_once_however_long_the_reply():
    parser = CountingParser()
    stream = ToolCallStream(parser)
    reply = f"Calling.\n{WEATHER}\n" + "\n".join([WEATHER] * 200)
    got = []
    for i in range(0, len(reply), 3):  # three characters a token
        stream.feed(reply[i : i + 3])
        got += stream.calls()
    assert len(got) == 201 and parser.seen <= len(reply)  # each block once
    assert stream.finish().tool_calls == []
