"""The agent's model: one chat turn at a time, through loopcoder's engine in process or any
OpenAI-compatible endpoint.

`EngineChat` renders the conversation with the model's own chat template (tools included, as the
server does), decodes on a long-lived `Engine` (so each turn's prompt, the last one's plus the new
messages, is served from the prefix cache as far as it matches), constrains a tool call to the bash
tool's schema with the server's grammar (`serving.tool_calls.tool_call_grammar`) and parses it with
the server's Hermes parser. `OpenAIChat` sends the same messages to `/v1/chat/completions`.
Both report the turn's token counts and prefix-cache hits (`cached_tokens`: the engine's count, or
the endpoint's `usage.prompt_tokens_details.cached_tokens` when it gives one).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from loopcoder.inference.constraints import Constraint
from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.model.loading import chat_stop_ids
from loopcoder.serving.tool_calls import HermesToolCallParser, tool_call_grammar
from loopcoder.utils.errors import LoopcoderError


class ContextExceededError(LoopcoderError):
    """The conversation no longer fits the model's context."""


@dataclass
class Reply:
    content: str | None
    tool_calls: list[dict[str, Any]]  # OpenAI's shape: {"id", "type": "function", "function": {"name", "arguments"}}
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None  # prompt tokens served from a prefix cache (None: the endpoint does not say)
    seconds: float
    raw: dict[str, Any] = field(default_factory=dict)  # what the backend returned, for the trajectory


class ChatModel(Protocol):
    name: str

    def chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *, max_tokens: int, seed: int
    ) -> Reply: ...


def api_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages without loopcoder's bookkeeping (`extra`), as an API or a chat template takes them."""
    return [{k: v for k, v in m.items() if k != "extra"} for m in messages]


class EngineChat:
    """Chat turns on loopcoder's engine, in this process."""

    def __init__(self, name: str, engine: Engine, tokenizer: Any, temperature: float = 0.0) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise LoopcoderError(f"{name}: the tokenizer has no chat template, which the agent needs")
        self.name = name
        self.engine = engine
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.parser = HermesToolCallParser()
        self.stop_ids = chat_stop_ids(engine.eos_ids, tokenizer)
        self._grammars: dict[str, Constraint] = {}

    def _tool_constraint(self, tools: list[dict[str, Any]]) -> Constraint:
        """The server's grammar for tool_choice "auto": free text, or calls in the parser's format."""
        key = json.dumps(tools, sort_keys=True)
        if key not in self._grammars:
            functions = [t["function"] for t in tools]
            lark = tool_call_grammar(self.engine.grammars, self.parser, functions, required=False, parallel=True)
            self._grammars[key] = Constraint.grammar(lark)
        return self._grammars[key]

    def chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *, max_tokens: int, seed: int
    ) -> Reply:
        t0 = time.perf_counter()
        text = self.tokenizer.apply_chat_template(
            api_messages(messages), tools=tools or None, add_generation_prompt=True, tokenize=False
        )
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        room = self.engine.max_seq_len - len(ids)
        if room < 1:
            raise ContextExceededError(
                f"the conversation has {len(ids)} tokens; the model's context is {self.engine.max_seq_len}"
            )
        params = SamplingParams(
            max_new_tokens=min(max_tokens, room),
            temperature=self.temperature,
            seed=seed,
            stop_token_ids=self.stop_ids,
            constraint=self._tool_constraint(tools) if tools else None,
        )
        req = self.engine.add_request(ids, params)
        while not req.finished:
            self.engine.step()
        if req.error is not None:
            raise LoopcoderError(f"generation failed: {req.error}")
        out = req.text
        parsed = self.parser.parse(out) if tools else None
        calls = [c.to_openai() for c in parsed.tool_calls] if parsed else []
        reason = req.finish_reason or "stop"
        if calls and reason == "stop":
            reason = "tool_calls"
        return Reply(
            content=parsed.content if parsed else out,
            tool_calls=calls,
            finish_reason=reason,
            prompt_tokens=len(ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            seconds=time.perf_counter() - t0,
            raw={"text": out},
        )


class OpenAIChat:
    """Chat turns from an OpenAI-compatible endpoint (`loopcoder serve`, vLLM, a hosted API)."""

    def __init__(self, base_url: str, model: str, api_key: str = "none", temperature: float = 0.0) -> None:
        try:
            import openai  # a dev dependency: only this backend needs it
        except ImportError:
            raise LoopcoderError("--endpoint needs the `openai` package: pip install openai") from None
        self.name = model
        self.temperature = temperature
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=2, timeout=600)
        self._errors = (openai.APIError,)

    def chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *, max_tokens: int, seed: int
    ) -> Reply:
        t0 = time.perf_counter()
        extra = {"tools": tools} if tools else {}
        try:
            r = self.client.chat.completions.create(
                model=self.name,
                messages=api_messages(messages),
                max_tokens=max_tokens,
                temperature=self.temperature,
                seed=seed,
                **extra,
            )
        except self._errors as e:
            if "context" in str(e).lower():
                raise ContextExceededError(str(e)) from None
            raise LoopcoderError(f"the endpoint refused the request: {e}") from None
        choice = r.choices[0]
        usage = r.usage
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        return Reply(
            content=choice.message.content,
            tool_calls=[c.model_dump() for c in choice.message.tool_calls or []],
            finish_reason=choice.finish_reason or "stop",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cached_tokens=getattr(details, "cached_tokens", None) if details else None,
            seconds=time.perf_counter() - t0,
            raw={"id": r.id},
        )
