"""The OpenAI-compatible request schemas and error bodies.

Requests are validated strictly (JSON types as sent, unknown fields refused): a typo in a parameter
name is a 400 that names it, not a silently ignored setting. Every parameter of OpenAI's Chat Completions
and Completions APIs has a field here (the `openai` package's `completion_create_params`), in one of three
groups, each listed in docs/serving.md: honoured; ignored, because it cannot apply to this server (`store`,
`service_tier`, ...); refused with a 400 only for a value that cannot be honoured (`modalities: ["audio"]`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

MAX_STOP = 32  # stop strings per request (OpenAI allows 4; editors often send more)
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20  # most likely tokens per position (OpenAI's cap for chat, vLLM's default)
MAX_METADATA = (16, 64, 512)  # OpenAI's limits on `metadata`: pairs, key characters, value characters


class APIError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, *, type: str | None = None, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Characters that JSON leaves raw but line readers such as httpx's (str.splitlines) treat as line breaks:
# escaped, an event stays on one line for every client. (Control characters are always escaped.)
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(obj: Any) -> str:
    """`obj` as compact JSON on one line, for a server-sent event's `data:` (app.py's and responses.py's streams)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """`"param": null` means the default for optional parameters (many clients send nulls)."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if not (v is None and k in fields and not fields[k].is_required())}
        return data


# ---------------------------------------------------------------------------------------------- shared
class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: the chunks carry no obfuscation padding


class JSONSchemaFormat(_Strict):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_\-]{1,64}$")  # OpenAI requires it; we do not use it
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # none: any JSON object
    strict: bool | None = None  # true: a keyword the grammar cannot enforce is a 400 (else it is ignored)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs 'json_schema': {\"name\": ..., \"schema\": {...}}")
        return self


class _SamplingRequest(_Strict):
    model: str | None = None  # default: the served model
    max_tokens: int | None = Field(None, ge=1)  # capped by the server's --max-tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # extension (vLLM): 0 or -1 = off
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # choice i samples with seed + i
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (vLLM): generate max_tokens tokens regardless of end-of-text
    user: str | None = None  # logged with the request (--access-log)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # vLLM's and OpenAI's definition (sampling.py)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)  # extension (vLLM)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias, clamped to [-100, 100]
    response_format: ResponseFormat | None = None  # chat, and an extension (vLLM) for completions

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key!r}")
            if not math.isfinite(bias):
                raise ValueError(f"values must be finite numbers, got {bias!r} for token {key}")
        return v

    def bias_by_token(self) -> dict[int, float] | None:
        return {int(k): b for k, b in self.logit_bias.items()} if self.logit_bias else None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be 1 to {MAX_STOP_CHARS} characters")
        return v

    @property
    def include_usage(self) -> bool:
        """A streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_supported(self) -> None:
        """Refuse combinations and values that cannot be honoured (each names its parameter)."""
        if self.stream_options is not None and not self.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")


# ---------------------------------------------------------------------------------------------- completions
class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with `echo`: the prompt alone (scored, with `logprobs`)
    echo: bool = False  # the prompt comes back before the completion (and its tokens' logprobs, with logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the chosen token's and this many most likely
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("'max_tokens' 0 generates nothing; it is allowed with 'echo' only", "max_tokens")
        if self.best_of not in (None, self.n):
            raise bad_request("'best_of' is not supported by this server (only equal to n)", "best_of")
        if self.suffix:
            raise bad_request("'suffix' (fill-in-the-middle) is not supported by this server", "suffix")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: text, or token ids (a batch gives one entry per prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("'prompt' is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# ---------------------------------------------------------------------------------------------- chat
class TextPart(_Strict):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # ignored: prefix caching is automatic


class RefusalPart(_Strict):  # an earlier assistant turn's refusal, sent back
    type: Literal["refusal"]
    refusal: str


class FunctionCallIn(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn
    index: int | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]  # "function": legacy results
    content: str | list[TextPart | RefusalPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallIn | None = None  # legacy: an earlier assistant turn's call
    # what the openai client sends back when a previous response's message is reused as input
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None  # an earlier audio reply: refused (this server writes none)

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "refusal"):
                    raise ValueError(f"only text content parts are supported (got type {kind!r})")
        return v

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text if isinstance(p, TextPart) else p.refusal for p in self.content)
        return self.content

    def for_template(self) -> dict[str, Any]:
        """The dict the chat template sees (roles mapped to the template's, text parts joined, legacy function
        calls and results as tool calls and tool results)."""
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        out: dict[str, Any] = {"role": role}
        text = self.text()
        if text is not None:
            out["content"] = text
        calls = list(self.tool_calls or [])
        if self.function_call is not None:
            calls.append(ToolCallIn(function=self.function_call))
        if calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") == "custom":
            raise ValueError("custom tools (free-form input) are not supported by this server; use function tools")
        return data


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(_Strict):
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice] = Field(min_length=1)


class AllowedToolChoice(_Strict):
    """Calls limited to some of `tools` (all of them stay in the prompt)."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class ChatRequest(_SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call (default: any number)
    functions: list[FunctionDef] | None = None  # legacy tools: one call at most, answered as `function_call`
    function_call: Literal["none", "auto"] | NamedFunction | None = None  # legacy tool_choice
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    metadata: dict[str, str] | None = None  # logged with the request (--access-log)
    safety_identifier: str | None = None  # logged with the request, as `user`
    # refused unless neutral: this server writes text only and moderates nothing
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    # ignored: they cannot apply here (docs/serving.md says why, one by one)
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None
    reasoning_effort: str | None = None
    prediction: dict[str, Any] | None = None
    _legacy_functions: bool = PrivateAttr(False)

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        pairs, key_chars, value_chars = MAX_METADATA
        if v is not None:
            if len(v) > pairs:
                raise ValueError(f"at most {pairs} key-value pairs")
            for key, value in v.items():
                if len(key) > key_chars or len(value) > value_chars:
                    raise ValueError(f"keys may have {key_chars} characters and values {value_chars} at most")
        return v

    @property
    def legacy_functions(self) -> bool:
        """The request used `functions`: the reply's call is `message.function_call` (finish_reason
        "function_call"), as the legacy API answers."""
        return self._legacy_functions

    def _adopt_functions(self) -> None:
        """The legacy `functions` / `function_call` become `tools` / `tool_choice` with at most one call."""
        if self.functions is None:
            if self.function_call is not None:
                raise bad_request("'function_call' needs 'functions'", "function_call")
            return
        if self.tools is not None or self.tool_choice is not None:
            raise bad_request("give either 'tools' or the legacy 'functions', not both", "functions")
        self.tools = [Tool(type="function", function=f) for f in self.functions]
        choice = self.function_call
        self.tool_choice = (
            NamedToolChoice(type="function", function=choice) if isinstance(choice, NamedFunction) else choice
        )
        self.parallel_tool_calls = False
        self._legacy_functions = True

    def check_supported(self) -> None:
        super().check_supported()
        self._adopt_functions()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if self.modalities is not None and "audio" in self.modalities:
            raise bad_request("this server writes text only: 'modalities' cannot include 'audio'", "modalities")
        for name in ("audio", "moderation"):
            if getattr(self, name) is not None:
                what = "audio output" if name == "audio" else "moderation"
                raise bad_request(f"'{name}': this server does not support {what}", name)
        for i, m in enumerate(self.messages):
            if m.role in ("system", "developer", "user", "tool", "function") and m.content is None:
                raise bad_request(f"messages[{i}] ({m.role}) has no content", f"messages.{i}.content")
            if m.role == "assistant" and m.content is None and not m.tool_calls and m.function_call is None:
                raise bad_request(
                    f"messages[{i}] (assistant) has neither content nor tool_calls", f"messages.{i}.content"
                )
            if m.role == "function" and not m.name:
                raise bad_request(f"messages[{i}] (function) needs the function's 'name'", f"messages.{i}.name")
            if m.audio is not None:
                raise bad_request(
                    f"messages[{i}] refers to an audio reply; this server has none", f"messages.{i}.audio"
                )
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        names = {t.function.name for t in self.tools or []}
        for named in self.named_choices():
            if named not in names:
                raise bad_request(f"tool_choice names function {named!r}, which is not in 'tools'", "tool_choice")

    def named_choices(self) -> list[str]:
        """The functions `tool_choice` names (one, or the allowed tools), else []."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return [choice.function.name]
        if isinstance(choice, AllowedToolChoice):
            return [t.function.name for t in choice.allowed_tools.tools]
        return []

    @property
    def calls_required(self) -> bool:
        """The reply can only be tool calls: "required", a named function, or allowed tools in mode "required"."""
        choice = self.tool_choice
        if isinstance(choice, AllowedToolChoice):
            return choice.allowed_tools.mode == "required"
        return choice not in (None, "auto", "none")

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---------------------------------------------------------------------------------------------- errors
_MODEL_NAMES = {
    cls.__name__ for cls in list(globals().values()) if isinstance(cls, type) and issubclass(cls, BaseModel)
}
_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def _clean_loc(loc: tuple) -> tuple:
    """The field path of a validation error, without pydantic's union-member tags ('str', 'list[int]')."""
    return tuple(
        x
        for x in loc
        if not (isinstance(x, str) and (x in _MODEL_NAMES or x in _TYPE_NAMES or re.search(r"[\[\]'(]", x)))
    )


def validation_error(e: ValidationError) -> APIError:
    """A 400 that names the first offending field, from a pydantic error (malformed JSON included)."""
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON ({first['msg']})")
    loc = _clean_loc(first["loc"])
    param = ".".join(str(x) for x in loc) or None
    if first["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param)
    if first["type"] == "model_type" and not loc:
        return bad_request("the request body must be a JSON object")
    msgs = []
    for err in errors:  # one union field fails once per member: list the alternatives
        if _clean_loc(err["loc"]) == loc and err["msg"] not in msgs:
            msgs.append(err["msg"])
    return bad_request(f"invalid value for '{param}': {'; or '.join(msgs[:4])}", param)


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None
    except (ValueError, json.JSONDecodeError) as e:  # e.g. undecodable bytes
        raise bad_request(f"the request body is not valid JSON ({e})") from None
