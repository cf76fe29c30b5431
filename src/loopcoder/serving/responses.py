"""`POST /v1/responses`: the part of OpenAI's Responses API that agents use, on the chat path.

A Responses request is converted to a `ChatRequest` (input items become chat messages, the flat function tools
become chat tools, `text.format` becomes `response_format`), and then runs exactly as a chat completion does:
the same chat template, tool-call grammar, jobs, scheduler ticket and tool-call parser (`Service` in app.py).
What comes back is turned into Responses output items: a `message` with `output_text`, and one `function_call`
item per call. Streams carry the typed events (`response.created` ... `response.completed`), numbered by
`sequence_number`.

`previous_response_id` continues a stored conversation: a response with `store` not false keeps its messages
(input and output, not `instructions`, as OpenAI does) in memory, for `MAX_AGE` seconds and at most `CAPACITY`
responses; an id that is not kept is a 400 (`previous_response_not_found`) that says so.

Fields are validated strictly, as in protocol.py: unknown ones are refused with a 400 that names them. `IGNORED`
lists the standard fields that are accepted and have no effect here; `check_supported` refuses values that cannot
be honoured (hosted tools, `background: true`, `conversation`, stored prompts, image or file inputs, logprobs).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from loopcoder.serving.protocol import APIError, ChatRequest, _Strict, bad_request, parse_request, sse_json
from loopcoder.serving.scheduler import Job
from loopcoder.serving.tool_calls import ParsedOutput, ToolCall, ToolCallParser, ToolCallStream

CAPACITY = 1024  # stored responses (for previous_response_id), least recently used evicted first
MAX_AGE = 3600.0  # seconds a stored response stays usable

# Standard request fields that are accepted and change nothing here (docs/serving.md says why, field by field).
IGNORED = (
    "include",
    "max_tool_calls",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "reasoning",
    "safety_identifier",
    "service_tier",
    "stream_options",
    "truncation",
    "user",
    "context_management",
    "moderation",
)


# ---------------------------------------------------------------------------------------------- request
class _TextPart(_Strict):
    """A text content part: `input_text` (what a user, system or developer says), `output_text` (an earlier
    assistant reply, as the `openai` client sends it back, with its annotations and logprobs) or `refusal`."""

    type: Literal["input_text", "output_text", "refusal", "text"]
    text: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


def _text_parts_only(v: Any) -> Any:
    if isinstance(v, list):
        for part in v:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text", "refusal", "text"):
                raise ValueError(f"only text content parts are supported (got type {kind!r})")
    return v


def _join(content: str | list[_TextPart]) -> str:
    if isinstance(content, str):
        return content
    return "".join((p.text if p.text is not None else p.refusal) or "" for p in content)


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[_TextPart]
    id: str | None = None  # an earlier response's output item, sent back as input
    status: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        return _text_parts_only(v)


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[_TextPart]
    id: str | None = None
    status: str | None = None

    @field_validator("output", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        return _text_parts_only(v)


def _item_kind(v: Any) -> str:
    """The union tag of an input item. Tags are in parentheses, which protocol.validation_error leaves out of the
    parameter path: an error names `input.0.call_id`, not `input.0.(function_call).call_id`."""
    kind = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", None)  # easy messages: no type
    return f"({kind})"


InputItem = Annotated[
    Annotated[MessageItem, Tag("(message)")]
    | Annotated[FunctionCallItem, Tag("(function_call)")]
    | Annotated[FunctionCallOutputItem, Tag("(function_call_output)")],
    Discriminator(
        _item_kind,
        custom_error_type="unsupported_item",
        custom_error_message="input items may be messages, function_call or function_call_output",
    ),
]


class FunctionTool(_Strict):
    """A function tool in the Responses API's flat shape (no nested `function` object)."""

    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Any = None  # a hint for reasoning models: ignored


class ResponsesRequest(_Strict):
    model: str | None = None
    input: list[InputItem]  # a string is one user message
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    # accepted, and refused unless at a value that asks nothing (check_supported)
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: int | None = None
    # accepted and ignored (IGNORED)
    include: list[str] | None = None
    max_tool_calls: int | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: Any = None
    reasoning: Any = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    stream_options: Any = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    context_management: Any = None
    moderation: Any = None

    @field_validator("input", mode="before")
    @classmethod
    def _string_is_a_user_message(cls, v: Any) -> Any:
        return [{"role": "user", "content": v}] if isinstance(v, str) else v

    def check_supported(self) -> None:
        if self.background:
            raise bad_request("'background' mode is not supported by this server", "background")
        if self.conversation is not None:
            raise bad_request(
                "'conversation' is not supported by this server (use previous_response_id)", "conversation"
            )
        if self.prompt is not None:
            raise bad_request("stored prompts ('prompt') are not supported by this server", "prompt")
        if self.top_logprobs:
            raise bad_request("'top_logprobs' is not supported by this server", "top_logprobs")
        if self.metadata is not None:
            if len(self.metadata) > 16:
                raise bad_request("'metadata' has more than 16 keys", "metadata")
            long = next((k for k in self.metadata if len(k) > 64), None)
            if long is not None:
                raise bad_request(f"'metadata' key {long[:70]!r} is longer than 64 characters", "metadata")
        if not self.input and self.previous_response_id is None:
            raise bad_request("'input' is empty", "input")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        if isinstance(self.tool_choice, FunctionChoice) and self.tool_choice.name not in {
            t.name for t in self.tools or []
        }:
            raise bad_request(
                f"tool_choice names function {self.tool_choice.name!r}, which is not in 'tools'", "tool_choice"
            )
        if self.text and self.text.format and self.text.format.type == "json_schema" and not self.text.format.name:
            raise bad_request("'text.format' of type json_schema needs a 'name'", "text.format.name")

    # ------------------------------------------------------------------ conversion to a chat request
    def messages(self) -> list[dict[str, Any]]:
        """The input as chat messages: function_call items join the assistant message before them (or start
        one), function_call_output items become tool messages."""
        out: list[dict[str, Any]] = []
        for item in self.input:
            if isinstance(item, MessageItem):
                out.append({"role": item.role, "content": _join(item.content)})
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                last = out[-1] if out else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": _join(item.output)})
        return out

    def to_chat(self, history: list[dict[str, Any]]) -> ChatRequest:
        """The chat request that this request asks for, after the stored conversation `history`."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        body: dict[str, Any] = {
            "messages": system + history + self.messages(),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_completion_tokens": self.max_output_tokens,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        if self.tools:
            body["tools"] = [
                {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})} for t in self.tools
            ]
            choice = self.tool_choice
            named = isinstance(choice, FunctionChoice)
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}} if named else choice
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema":
            spec = {"name": fmt.name, "description": fmt.description, "schema": fmt.schema_, "strict": fmt.strict}
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
        elif fmt is not None:
            body["response_format"] = {"type": fmt.type}
        chat = parse_request(ChatRequest, json.dumps(body).encode())
        chat.check_supported()
        return chat

    def echo(self) -> dict[str, Any]:
        """The request's settings, as a response object repeats them."""
        fmt = self.text.format if self.text and self.text.format else None
        choice = self.tool_choice or "auto"
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id,
            "store": self.store,
            "temperature": self.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice) else choice,
            "tools": [t.model_dump(exclude_none=True) for t in self.tools or []],
            "top_p": self.top_p,
            "truncation": "disabled",
            "user": self.user,
        }


# ---------------------------------------------------------------------------------------------- stored responses
class ResponseStore:
    """The conversations of recent responses (chat messages), for `previous_response_id`: at most `capacity`,
    each for `max_age` seconds, least recently used evicted first. Used on the event loop only."""

    def __init__(self, capacity: int = CAPACITY, max_age: float = MAX_AGE, clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.max_age = max_age
        self.clock = clock
        self._kept: OrderedDict[str, tuple[float, list[dict[str, Any]]]] = OrderedDict()

    def put(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        self._kept[response_id] = (self.clock(), messages)
        self._kept.move_to_end(response_id)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def get(self, response_id: str) -> list[dict[str, Any]]:
        now = self.clock()
        while self._kept:  # drop the expired ones (the oldest are first)
            oldest, (t, _) = next(iter(self._kept.items()))
            if now - t <= self.max_age:
                break
            del self._kept[oldest]
        if response_id not in self._kept:
            raise APIError(
                400,
                f"Previous response with id '{response_id}' not found: this server keeps the last "
                f"{self.capacity} stored responses for {self.max_age:g} s, in memory (a restart forgets them; "
                "'store': false keeps none)",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        self._kept.move_to_end(response_id)
        return self._kept[response_id][1]

    def __len__(self) -> int:
        return len(self._kept)


# ---------------------------------------------------------------------------------------------- output items
def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputBuilder:
    """The output items of one response, and the stream events that build them, in order: text opens a
    `message` item (and its `output_text` part), a tool call closes it and adds a `function_call` item.
    The non-streamed response uses the same builder, so both give the same items."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None  # the open message item
        self._text: list[str] = []  # the open message's text, in pieces (joined once, when it closes)

    def text(self, delta: str) -> Iterator[dict[str, Any]]:
        if not delta:
            return
        if self._message is None:
            yield from self._open_message()
        self._text.append(delta)
        yield self._at("response.output_text.delta", content_index=0, delta=delta, logprobs=[])

    def call(self, call: ToolCall) -> Iterator[dict[str, Any]]:
        yield from self.close_message("completed")
        item = {
            "type": "function_call",
            "id": _new_id("fc"),
            "call_id": call.id,
            "name": call.name,
            "arguments": call.arguments,
            "status": "completed",
        }
        index = len(self.items)
        yield {"type": "response.output_item.added", "output_index": index, "item": {**item, "arguments": ""}}
        self.items.append(item)
        ids = {"item_id": item["id"], "output_index": index}
        yield {"type": "response.function_call_arguments.delta", **ids, "delta": call.arguments}
        yield {"type": "response.function_call_arguments.done", **ids, "name": call.name, "arguments": call.arguments}
        yield {"type": "response.output_item.done", "output_index": index, "item": item}

    def finish(self, status: str) -> Iterator[dict[str, Any]]:
        """Close the open message; a response with no output at all gets an empty message (as OpenAI's)."""
        if not self.items and self._message is None:
            yield from self._open_message()
        yield from self.close_message(status)

    def close_message(self, status: str) -> Iterator[dict[str, Any]]:
        if self._message is None:
            return
        text = "".join(self._text)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        yield self._at("response.output_text.done", content_index=0, text=text, logprobs=[])
        yield self._at("response.content_part.done", content_index=0, part=part)
        item = {**self._message, "status": status, "content": [part]}
        yield {"type": "response.output_item.done", "output_index": len(self.items), "item": item}
        self.items.append(item)
        self._message, self._text = None, []

    def _open_message(self) -> Iterator[dict[str, Any]]:
        self._message = {"type": "message", "id": _new_id("msg"), "status": "in_progress", "role": "assistant"}
        item = {**self._message, "content": []}
        yield {"type": "response.output_item.added", "output_index": len(self.items), "item": item}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield self._at("response.content_part.added", content_index=0, part=part)

    def _at(self, kind: str, **fields: Any) -> dict[str, Any]:
        assert self._message is not None
        return {"type": kind, "item_id": self._message["id"], "output_index": len(self.items), **fields}


def output_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages that stand for a response's output items (what `previous_response_id` continues)."""
    text = "".join(p["text"] for it in items if it["type"] == "message" for p in it["content"])
    calls = [
        {"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
        for it in items
        if it["type"] == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


def _status(finish_reason: str) -> tuple[str, dict[str, str] | None]:
    if finish_reason == "length":  # max_output_tokens, the server's --max-tokens or the context
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


# ---------------------------------------------------------------------------------------------- the route
@dataclass
class _Turn:
    """One request's response object, and what finishing it needs: the conversation to store, the prompt size."""

    req: ResponsesRequest
    model: str
    conversation: list[dict[str, Any]]
    prompt_tokens: int
    tools_on: bool
    store: ResponseStore
    response: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.response = {
            "id": _new_id("resp"),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "model": self.model,
            "output": [],
            "usage": None,
            **self.req.echo(),
        }

    def finish(self, out: OutputBuilder, reason: str, output_tokens: int) -> None:
        """Fill in the finished response, and keep its conversation unless `store` is false."""
        status, details = _status(reason)
        self.response.update(
            status=status,
            incomplete_details=details,
            output=out.items,
            usage=_usage(self.prompt_tokens, output_tokens),
            completed_at=int(time.time()) if status == "completed" else None,
        )
        if self.req.store:
            self.store.put(self.response["id"], self.conversation + output_messages(out.items))


class ResponsesAPI:
    """`POST /v1/responses` on a `Service` (app.py, which imports this module: hence the service and the
    ticket factory are handed in, not imported)."""

    def __init__(self, svc: Any, start: Callable[[list[Job], Request], Any], store: ResponseStore | None = None):
        self.svc = svc
        self.start = start  # (jobs, request) -> app.Pending
        self.store = store or ResponseStore()

    @property
    def parser(self) -> ToolCallParser:
        return self.svc.settings.tool_parser

    async def create(self, request: Request) -> Response:
        svc = self.svc
        req: ResponsesRequest = await svc.read(request, ResponsesRequest)
        history = self.store.get(req.previous_response_id) if req.previous_response_id else []
        chat = req.to_chat(history)
        tools_on = bool(chat.tools) and chat.tool_choice != "none"
        ids, constraint = await svc.off_loop(
            lambda: (svc.render_chat(chat, tools_on), svc.chat_constraint(chat, tools_on)), request
        )
        svc.check_prompt(ids, "input")
        jobs = svc.jobs(chat, [ids], chat.output_limit, svc.max_tokens, svc.chat_stop_ids, constraint)
        turn = _Turn(req, svc.settings.model_name, history + req.messages(), len(ids), tools_on, self.store)
        pending = self.start(jobs, request)
        if not req.stream:
            [(text, ntok, reason)] = await pending.collect()
            out = OutputBuilder()
            parsed = self.parser.parse(text) if tools_on else ParsedOutput(text)
            # the builder's events are what a stream would send; only its items are needed here
            for _ in (*out.text(parsed.content or ""), *(e for c in parsed.tool_calls for e in out.call(c))):
                pass
            for _ in out.finish(_status(reason)[0]):
                pass
            turn.finish(out, reason, ntok)
            return JSONResponse(turn.response)
        first = await pending.started()
        return self._stream(turn, pending, first)

    def _stream(self, turn: _Turn, pending: Any, first: list[Any]) -> StreamingResponse:
        response = turn.response
        seq = iter(range(2**62))

        def sse(event: dict[str, Any]) -> str:
            event = {**event, "sequence_number": next(seq)}
            return f"event: {event['type']}\ndata: {sse_json(event)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield sse({"type": "response.created", "response": response})
            yield sse({"type": "response.in_progress", "response": response})
            out = OutputBuilder()
            stream = ToolCallStream(self.parser) if turn.tools_on else None
            ntok = 0
            async for u in pending.updates(first):
                if u.error is not None:
                    err = u.error
                    yield sse({"type": "error", "code": err.code, "message": err.message, "param": err.param})
                    response.update(status="failed", error={"code": err.code or "server_error", "message": err.message})
                    yield sse({"type": "response.failed", "response": response})
                    return
                ntok += len(u.token_ids)
                for ev in out.text(stream.feed(u.text) if stream else u.text):
                    yield sse(ev)
                for call in stream.calls() if stream else []:
                    for ev in out.call(call):
                        yield sse(ev)
                if u.finish_reason is None:
                    continue
                if stream is not None:
                    rest = stream.finish()
                    for ev in out.text(rest.content or ""):
                        yield sse(ev)
                    for call in rest.tool_calls:
                        for ev in out.call(call):
                            yield sse(ev)
                for ev in out.finish(_status(u.finish_reason)[0]):
                    yield sse(ev)
                turn.finish(out, u.finish_reason, ntok)
                kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
                yield sse({"type": kind, "response": response})

        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in events():
                    yield chunk
            finally:  # also when the client disconnects (the response task is cancelled)
                pending.close()

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
