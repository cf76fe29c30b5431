"""Tool calls in model output: a pluggable parser, the default Hermes/Qwen one, its streaming wrapper, and the
grammar that constrains decoding to a parser's call format.

A parser turns the assistant's raw text into `content` plus `tool_calls`. Valid calls leave the text;
malformed ones stay in `content` verbatim, so the client sees everything the model wrote. The server
picks a parser by name (`--tool-parser`), from the registry or as `package.module:Class`. Its `call_format`
says how a call is written, and `tool_call_grammar` turns that and the request's tools into a Lark grammar
(`tool_choice` "required", a named function, or "auto": free text until the call's opening marker).
"""

from __future__ import annotations

import importlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from loopcoder.constraints import GrammarCompiler, lark_json, lark_text_without
from loopcoder.errors import LoopcoderError


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
    """

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self._held = ""  # not yet sent: whitespace or a partial marker at the end of the text so far
        self._buffer: str | None = None  # from the first marker on
        self._sent = 0  # calls already returned by calls()
        self._checked = 0  # length of the buffer when calls() last parsed it

    def calls(self) -> list[ToolCall]:
        """The tool calls completed since the last call of `calls()`."""
        if self._buffer is None or len(self._buffer) == self._checked:
            return []
        self._checked = len(self._buffer)
        found = self.parser.parse(self._buffer).tool_calls
        new, self._sent = found[self._sent :], len(found)
        return new

    def feed(self, text: str) -> str:
        if self._buffer is not None:
            self._buffer += text
            return ""
        held = self._held + text
        marker = self.parser.start_marker
        at = held.find(marker)
        if at >= 0:
            head = held[:at]
            out = head.rstrip()
            self._buffer = head[len(out) :] + held[at:]
            self._held = ""
            return out
        keep = _partial_suffix(held, marker)
        head = held[: len(held) - keep]
        out = head.rstrip()
        self._held = held[len(out) :]
        return out

    def finish(self) -> ParsedOutput:
        """The content not yet sent, and the calls `calls()` has not returned."""
        if self._buffer is None:
            return ParsedOutput(self._held)
        parsed = self.parser.parse(self._buffer)
        return ParsedOutput(parsed.content or "", parsed.tool_calls[self._sent :])


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
