"""Tool calls in model output: a pluggable parser, the default Hermes/Qwen one, its streaming wrapper, and the
grammar that constrains decoding to a parser's call format.

A parser turns the assistant's raw text into `content` plus `tool_calls`. Valid calls leave the text;
malformed ones stay in `content` verbatim, so the client sees everything the model wrote. The server
picks a parser by name (`--tool-parser`), from the registry or as `package.module:Class`. Its `call_format`
says how a call is written, and `tool_call_grammar` turns that and the request's tools into a Lark grammar
(`tool_choice` "required", a named function, or "auto": free text until the call's opening marker).

Two rules come from other systems, so that clients meet what they already handle:
- a tool's parameters are a closed object (`closed_schema`), as OpenAI's strict function calling reads them;
- a reply cut by `max_tokens` inside a call is answered as vLLM's Hermes parser and serving_chat.py answer it
  (`parse_cut` for a whole reply, `ToolCallStream.finish(cut=True)` for a stream): docs/serving.md.
"""

from __future__ import annotations

import importlib
import io
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from loopcoder.inference.constraints import GrammarCompiler, lark_json, lark_text_without
from loopcoder.utils.errors import LoopcoderError


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, serialised (what the OpenAI API returns)
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class CallFormat:
    """How a parser's tool calls are written, so that decoding can be constrained to them: `begin` (which starts
    with the parser's `start_marker`), a JSON object {name_key: the function's name, arguments_key: its
    arguments}, then `end`; several calls are separated by `separator`."""

    begin: str
    end: str
    separator: str = "\n"
    name_key: str = "name"
    arguments_key: str = "arguments"

    def body_schema(self, name: str, parameters: dict | None) -> dict:
        """The JSON schema of one call to `name` (no `parameters`: a function that takes none)."""
        args = (
            parameters
            if parameters is not None
            else {"type": "object", "properties": {}, "additionalProperties": False}
        )
        return {
            "type": "object",
            "properties": {self.name_key: {"const": name}, self.arguments_key: args},
            "required": [self.name_key, self.arguments_key],
            "additionalProperties": False,
        }


@runtime_checkable
class ToolCallParser(Protocol):
    """Splits assistant text into content and tool calls.

    `start_marker` is where a call can begin: the streaming path sends text before it as content as
    soon as it is final, and hands everything from it on to `parse` (calls are sent as they close).
    `call_format()` is how a call is written: the server constrains decoding to it (`tool_call_grammar`).
    Optional `end_marker`: the parser's calls are the blocks from `start_marker` to the next `end_marker`, each
    parsed on its own; the streaming path then parses each block once (`ToolCallStream`).
    """

    start_marker: str

    def parse(self, text: str) -> ParsedOutput: ...

    def call_format(self) -> CallFormat: ...


class HermesToolCallParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen 2.5+ templates).

    A block is valid when its body is one JSON object with a non-empty string `name` and `arguments`
    that is an object, a string holding a JSON object, or absent (`{}`). Whitespace around removed
    blocks is dropped; text with no valid block comes back unchanged.
    """

    start_marker = "<tool_call>"
    end_marker = "</tool_call>"

    def __init__(self) -> None:
        s, e = re.escape(self.start_marker), re.escape(self.end_marker)
        # a closed block, or an unterminated one running to the end (generation stopped inside it)
        self._block = re.compile(f"{s}(.*?){e}|{s}(.*)\\Z", re.DOTALL)

    def parse(self, text: str) -> ParsedOutput:
        pieces: list[str] = []  # text outside valid blocks, in order
        calls: list[ToolCall] = []
        pos, strip_next = 0, False
        for m in self._block.finditer(text):
            before = text[pos : m.start()]
            call = self._call(m.group(1)) if m.group(1) is not None else None
            if call is None:  # malformed or unterminated: keep it as the model wrote it
                pieces.append(before.lstrip() if strip_next else before)
                pieces.append(m.group(0))
                strip_next = False
            else:
                before = before.rstrip()
                pieces.append(before.lstrip() if strip_next else before)
                calls.append(call)
                strip_next = True
            pos = m.end()
        rest = text[pos:]
        pieces.append(rest.lstrip() if strip_next else rest)
        if not calls:
            return ParsedOutput(text)
        content = "".join(pieces)
        return ParsedOutput(content or None, calls)

    def call_format(self) -> CallFormat:
        return CallFormat(self.start_marker + "\n", "\n" + self.end_marker)  # as the chat template renders calls

    @staticmethod
    def _call(body: str) -> ToolCall | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        name, args = obj.get("name"), obj.get("arguments", {})
        if not isinstance(name, str) or not name:
            return None
        if isinstance(args, str):  # some models write the arguments already serialised
            try:
                if not isinstance(json.loads(args), dict):
                    return None
            except ValueError:
                return None
        elif isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        else:
            return None
        return ToolCall(name, args)


class ToolCallStream:
    """Incremental view of one choice for streaming.

    `feed(text)` returns the content that is safe to send now: text before the parser's start marker,
    holding back trailing whitespace and a possible partial marker. Once the marker appears, the rest
    is buffered; `calls()` returns the calls completed since its last call (a call is final once the
    parser finds it: what follows cannot change it), and `finish()` parses the rest. The streamed
    content plus `finish().content`, and the calls from `calls()` and `finish()`, equal what `parse`
    returns on the whole text.

    A parser with an `end_marker` (its calls are the blocks from `start_marker` to the next `end_marker`, each
    parsed on its own, as Hermes's are) is read block by block: `calls()` looks for markers only in the text fed
    since it last looked and parses each block once it closes, so a reply costs time linear in its length.
    Other parsers see the whole buffer again whenever it grew.
    """

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self._end: str | None = getattr(parser, "end_marker", None) or None
        self._held = ""  # not yet sent: whitespace or a partial marker at the end of the text so far
        self._buffer: io.StringIO | None = None  # from the first marker on
        self._size = 0  # characters in the buffer
        self._sent = 0  # calls already returned by calls()
        self._checked = 0  # length of the buffer when calls() last looked at it
        self._closed = 0  # where the text after the last closed block begins (block parsers)
        self._open: int | None = None  # where the block being written begins, if one is open

    def calls(self) -> list[ToolCall]:
        """The tool calls completed since the last call of `calls()`."""
        if self._buffer is None or self._size == self._checked:
            return []
        if self._end is None:
            self._checked = self._size
            found = self.parser.parse(self._buffer.getvalue()).tool_calls
            new, self._sent = found[self._sent :], len(found)
            return new
        new: list[ToolCall] = []
        start = self.parser.start_marker
        while True:
            if self._open is None:  # a block begins at the next start marker after the last closed block
                at = self._find(start, max(self._closed, self._checked - len(start) + 1))
                if at < 0:
                    break
                self._open = self._checked = at
            body = self._open + len(start)
            at = self._find(self._end, max(body, self._checked - len(self._end) + 1))
            if at < 0:
                break
            self._closed = self._checked = at + len(self._end)
            new += self.parser.parse(self._read(self._open, self._closed)).tool_calls
            self._open = None
        self._checked = self._size
        self._sent += len(new)
        return new

    def _read(self, start: int, end: int | None = None) -> str:
        assert self._buffer is not None
        self._buffer.seek(start)
        text = self._buffer.read(-1 if end is None else end - start)
        self._buffer.seek(0, io.SEEK_END)
        return text

    def _find(self, marker: str, start: int) -> int:
        """Where `marker` first begins at `start` or later in the buffer, or -1."""
        at = self._read(start).find(marker)
        return at if at < 0 else start + at

    def feed(self, text: str) -> str:
        if self._buffer is not None:
            self._size += self._buffer.write(text)
            return ""
        held = self._held + text
        marker = self.parser.start_marker
        at = held.find(marker)
        if at >= 0:
            head = held[:at]
            out = head.rstrip()
            self._buffer = io.StringIO()
            self._size = self._buffer.write(head[len(out) :] + held[at:])
            self._held = ""
            return out
        keep = _partial_suffix(held, marker)
        head = held[: len(held) - keep]
        out = head.rstrip()
        self._held = held[len(out) :]
        return out

    def finish(self, cut: bool = False) -> ParsedOutput:
        """The content not yet sent, and the calls `calls()` has not returned.

        `cut`: the reply was cut by max_tokens (or the context). Then, as vLLM's streaming Hermes parser does,
        nothing from the first call marker on is content, and a call left open is sent as far as it got: its
        name once the name is complete, with the arguments written so far (possibly not yet valid JSON)."""
        if self._buffer is None:
            return ParsedOutput(self._held)
        buffer = self._buffer.getvalue()
        if not cut:
            parsed = self.parser.parse(buffer)
            return ParsedOutput(parsed.content or "", parsed.tool_calls[self._sent :])
        calls = self.parser.parse(buffer).tool_calls
        open_call = _open_call(self.parser, buffer)
        return ParsedOutput("", calls[self._sent :] + ([open_call] if open_call else []))


def parse_cut(parser: ToolCallParser, text: str) -> ParsedOutput:
    """What vLLM's Hermes parser (vllm/tool_parsers/hermes_tool_parser.py, `extract_tool_calls`) makes of a
    whole reply cut by max_tokens: the text after an unterminated call's marker is parsed as that call's body
    (a call if it is already complete); if any call then fails to parse, the whole reply is content and there are
    no calls at all."""
    marker = parser.start_marker
    at = text.rfind(marker)
    if at < 0:
        return parser.parse(text)
    closed = bool(parser.parse(text[at:]).tool_calls)
    out = parser.parse(text if closed else text + parser.call_format().end)
    if not out.tool_calls or marker in (out.content or ""):  # a block that is not a valid call
        return ParsedOutput(text)
    return out


def _open_call(parser: ToolCallParser, buffer: str) -> ToolCall | None:
    """The call a cut stream left open, as far as vLLM's streaming Hermes parser has sent it; None when the last
    call is closed or its name is not complete yet."""
    marker, fmt = parser.start_marker, parser.call_format()
    at = buffer.rfind(marker)
    if at < 0 or parser.parse(buffer[at:]).tool_calls:
        return None
    body = buffer[at + len(marker) :]
    end = fmt.end.strip() or fmt.end
    body = body[: len(body) - _partial_suffix(body, end)].strip()  # a partial closing marker is not the body's
    whole = parser.parse(marker + body + fmt.end).tool_calls
    if whole:  # the body was complete: only its closing marker was cut
        return whole[0]
    name = re.search(rf'"{re.escape(fmt.name_key)}"\s*:\s*"([^"]+)"', body)
    if name is None:
        return None
    args = re.search(rf'"{re.escape(fmt.arguments_key)}"\s*:\s*', body)
    return ToolCall(name.group(1), "" if args is None else _json_value_prefix(body[args.end() :]))


def _json_value_prefix(raw: str) -> str:
    """The JSON value at the start of `raw` (an object or array up to its matching bracket), or all of `raw` when it
    does not close: how vLLM's Hermes parser extracts streamed arguments."""
    if not raw or raw[0] not in "{[":
        return raw
    close, depth, in_string, escaped = "}" if raw[0] == "{" else "]", 0, False, False
    for i, c in enumerate(raw):
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
            continue
        if c == '"':
            in_string = True
        elif c == raw[0]:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return raw[: i + 1]
    return raw


def closed_schema(schema: Any, member: bool = False) -> Any:
    """A copy of a JSON schema in which every object schema that lists `properties` and does not say otherwise is
    closed (`additionalProperties: false`), recursively, as OpenAI's strict function calling reads a tool's
    parameters. Saying otherwise: `additionalProperties` or `unevaluatedProperties` given, a `required` key that
    is not among the `properties`, or composition by `allOf` (a member alone does not list the other members' keys,
    so neither the members nor their parent are closed). An object without `properties` (a free-form map) stays
    open: closed, it could only be `{}`."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed_schema(v) for name, v in value.items()}
        elif key == "allOf" and isinstance(value, list):
            out[key] = [closed_schema(v, member=True) for v in value]
        elif key in _SUBSCHEMAS:
            out[key] = closed_schema(value)
        else:
            out[key] = value
    properties = schema.get("properties")
    if (
        isinstance(properties, dict)
        and not member
        and "allOf" not in schema
        and "additionalProperties" not in schema
        and "unevaluatedProperties" not in schema
        and all(k in properties for k in schema.get("required") or [] if isinstance(k, str))
    ):
        out["additionalProperties"] = False
    return out


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = (
    "items",
    "prefixItems",
    "additionalItems",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "anyOf",
    "oneOf",
    "additionalProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
    "propertyNames",
)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def tool_call_grammar(
    compiler: GrammarCompiler,
    parser: ToolCallParser,
    functions: list[dict],
    *,
    required: bool,
    parallel: bool,
    content: str | None = None,
) -> str:
    """A Lark grammar for an assistant turn that calls `functions` (OpenAI function objects: name, parameters,
    strict) in the parser's call format.

    `required`: the turn is one call (several with `parallel`) and nothing else. Otherwise ("auto") it is content
    or calls, and free content may be followed by calls: the text may not spell out the start marker, so a call
    can only begin with its opening, from which on it is constrained. `content`: a Lark expression the content
    must match instead of free text (`response_format` beside tools). Nothing follows the calls."""
    fmt, literal = parser.call_format(), compiler.lark_literal
    bodies = [lark_json(fmt.body_schema(f["name"], f.get("parameters")), bool(f.get("strict"))) for f in functions]
    lines = [
        f"call: {literal(fmt.begin)} body {literal(fmt.end)}",
        "body: " + " | ".join(f"body_{i}" for i in range(len(bodies))),
        *(f"body_{i}: {b}" for i, b in enumerate(bodies)),
        f"calls: call ({literal(fmt.separator)} call)*" if parallel else "calls: call",
    ]
    if required:
        lines.insert(0, "start: calls")
    elif content is not None:
        lines[:0] = ["start: content | calls", f"content: {content}"]
    else:
        lines[:0] = ["start: TEXT | TEXT calls", f"TEXT: {lark_text_without(parser.start_marker)}"]
    return "\n".join(lines) + "\n"


TOOL_PARSERS: dict[str, Callable[[], ToolCallParser]] = {"hermes": HermesToolCallParser}


def register_tool_parser(name: str, factory: Callable[[], ToolCallParser]) -> None:
    TOOL_PARSERS[name] = factory


def get_tool_parser(name: str) -> ToolCallParser:
    """A registered parser by name, or `package.module:Class` (a class with the `ToolCallParser` shape)."""
    if name in TOOL_PARSERS:
        return TOOL_PARSERS[name]()
    if ":" not in name:
        raise LoopcoderError(
            f"unknown tool parser {name!r} (choose from {', '.join(TOOL_PARSERS)}, or give package.module:Class)"
        )
    module, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise LoopcoderError(f"tool parser {name!r}: cannot import it ({e})") from None
    parser = factory()
    if not isinstance(parser, ToolCallParser):
        raise LoopcoderError(f"tool parser {name!r} lacks start_marker, parse() or call_format()")
    return parser
