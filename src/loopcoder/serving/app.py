"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, /v1/responses
(responses.py), /health.

Handlers run on the event loop and never touch the engine: they validate, tokenise (off the loop, in one of
two one-thread lanes: large request bodies in their own, so that they cannot hold up small ones), `submit` a
ticket to the `Scheduler`, and read the ticket's updates from an asyncio queue. A client that disconnects
(while waiting, mid-generation or mid-stream) cancels its ticket, which frees its slots before the next
decode step. Every error is an OpenAI-style body; a 500 says what failed in a fixed phrase, never internal
state (that goes to the server log).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from loopcoder.inference.constraints import Constraint, ConstraintError, lark_json
from loopcoder.inference.sampling import SamplingParams, TokenLogprob
from loopcoder.model.loading import chat_stop_ids
from loopcoder.serving.logprobs import TokenTexts, chat_content, completion_logprobs
from loopcoder.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    NamedToolChoice,
    ResponseFormat,
    bad_request,
    parse_request,
    sse_json,
)
from loopcoder.serving.responses import ResponsesAPI
from loopcoder.serving.scheduler import Job, Scheduler, Update
from loopcoder.serving.tool_calls import (
    HermesToolCallParser,
    ParsedOutput,
    ToolCall,
    ToolCallParser,
    ToolCallStream,
    closed_schema,
    parse_cut,
    tool_call_grammar,
)
from loopcoder.utils.defaults import BODY_TIMEOUT
from loopcoder.utils.errors import LoopcoderError

log = logging.getLogger("loopcoder.serve")
T = TypeVar("T")

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (dividing logits by ~0 overflows)
OPEN_PATHS = ("/health",)  # reachable without the API key (for load balancers and scripts)
BIG_BODY_BYTES = 64 * 1024  # request bodies above this are rendered and tokenised in a lane of their own


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_prompt_tokens: int | None = None  # None: the model's context minus one
    max_tokens: int = 2048  # cap on a request's max_tokens
    default_completion_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)
    max_body_bytes: int = 2 * 2**20
    body_timeout: float = BODY_TIMEOUT  # seconds a client may take to send a request body (then 408)
    tool_parser: ToolCallParser = field(default_factory=HermesToolCallParser)
    open_tool_schemas: bool = False  # tool parameters as plain JSON Schema (default: closed objects, as OpenAI strict)
    log_requests: bool = False  # one line per request: its id, endpoint, user, metadata (`--access-log`)


class ClientGone(Exception):
    """The client disconnected before its response started (raised in a route, before any response:
    the app's handler answers 499)."""


# ---------------------------------------------------------------------------------------------- tickets
class Pending:
    """The event-loop side of a ticket: the updates of its choices, and its cancellation."""

    def __init__(self, scheduler: Scheduler, jobs: list[Job], request: Request) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.n = len(jobs)
        self.finished = False
        # what `collect` gathered besides the text: per choice, its tokens' and its prompt's log-probabilities
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in jobs]
        self.prompt_logprobs: list[list[TokenLogprob | None] | None] = [None] * len(jobs)
        self._scheduler = scheduler
        self.id = scheduler.submit(jobs, lambda u: loop.call_soon_threadsafe(self.queue.put_nowait, u))
        # Until a response starts, nothing else reads the connection: watch it for a disconnect.
        self._gone = asyncio.ensure_future(_wait_disconnect(request))

    def close(self) -> None:
        """Cancel whatever has not finished (the client left, or the response failed)."""
        self._gone.cancel()
        if not self.finished:
            self.finished = True
            self._scheduler.cancel(self.id)

    async def _next(self) -> Update:
        if not self.queue.empty():  # already here: no need to watch the connection meanwhile
            return self.queue.get_nowait()
        get = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({get, self._gone}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        self.close()
        raise ClientGone

    async def started(self) -> list[Update]:
        """Wait until every choice has a slot (its first update); raise its error (e.g. queue timeout)."""
        got: list[Update] = []
        seen: set[int] = set()
        while len(seen) < self.n:
            u = await self._next()
            if u.error is not None:
                self.close()
                raise u.error
            got.append(u)
            seen.add(u.index)
        self._gone.cancel()  # the streaming response watches the connection from here on
        return got

    async def collect(self) -> list[tuple[str, int, str]]:
        """(text, completion tokens, finish reason) per choice, once all are done (their log-probabilities, when
        asked for, in `logprobs` and `prompt_logprobs`)."""
        texts, ntok = [""] * self.n, [0] * self.n
        reasons: list[str | None] = [None] * self.n
        try:
            while any(r is None for r in reasons):
                u = await self._next()
                if u.error is not None:
                    raise u.error
                texts[u.index] += u.text
                ntok[u.index] += len(u.token_ids)
                reasons[u.index] = u.finish_reason
                self.logprobs[u.index] += u.logprobs or []
                if u.prompt_logprobs is not None:
                    self.prompt_logprobs[u.index] = u.prompt_logprobs
            self.finished = True
        finally:
            self.close()
        return [(t, k, r or "stop") for t, k, r in zip(texts, ntok, reasons)]

    async def updates(self, first: list[Update]) -> AsyncIterator[Update]:
        """The updates `started` returned, then the rest, until every choice is done or one fails."""
        left = self.n
        for u in first:
            yield u
            left -= u.done
        while left > 0:
            for u in _coalesce([await self.queue.get()], self.queue):
                yield u
                if u.error is not None:
                    return
                left -= u.done
        self.finished = True


def _coalesce(got: list[Update], queue: asyncio.Queue[Update]) -> list[Update]:
    """`got` plus whatever else is queued, merged per choice: when the client side falls behind the
    engine, it sends one event per choice instead of one per token."""
    while not queue.empty():
        got.append(queue.get_nowait())
    if len(got) == 1:  # the usual case when the client keeps up
        return got
    merged: dict[int, Update] = {}
    for u in got:
        m = merged.get(u.index)
        if m is None:
            lp = None if u.logprobs is None else list(u.logprobs)
            merged[u.index] = Update(
                u.index, u.text, list(u.token_ids), u.finish_reason, u.error, lp, u.prompt_logprobs
            )
        elif not m.done:  # nothing follows a choice's last update
            m.text += u.text
            m.token_ids += u.token_ids
            m.finish_reason, m.error = u.finish_reason, u.error
            if u.logprobs is not None:
                m.logprobs = (m.logprobs or []) + u.logprobs
            m.prompt_logprobs = m.prompt_logprobs or u.prompt_logprobs
    return list(merged.values())


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------------------- the service
class Service:
    """What the routes share: the scheduler, the tokenizer, the limits."""

    def __init__(self, scheduler: Scheduler, tokenizer: Any, settings: ServerSettings) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.settings = settings
        engine = scheduler.engine
        self.vocab_size = engine.config.vocab_size
        self.context = engine.max_seq_len
        limit = engine.max_seq_len - 1
        self.max_prompt_tokens = min(settings.max_prompt_tokens or limit, limit)
        self.max_tokens = settings.max_tokens
        self.max_n = scheduler.max_batch  # all choices of a request must fit the batch together
        self.created = int(time.time())
        # chat turns end with <|im_end|> (if the tokenizer has it) as well as at the model's end-of-text
        self.chat_stop_ids = chat_stop_ids(engine.eos_ids, tokenizer)
        self.grammars = engine.grammars  # thread-safe: handlers compile constraints, the engine reuses them
        # No token is longer than this many characters (a byte-level token's text has one character per byte,
        # a character has at least one byte): a text longer than max prompt tokens x this cannot fit.
        self.longest_token = max(map(len, tokenizer.get_vocab()), default=1) if tokenizer is not None else 1
        self.max_prompt_chars = self.max_prompt_tokens * self.longest_token
        self.token_texts = TokenTexts(tokenizer)
        # two lanes, one thread each: a few huge prompts keep one busy, small requests go on in the other
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="loopcoder-tokenizer")
        self.big_pool = ThreadPoolExecutor(1, thread_name_prefix="loopcoder-tokenizer-big")

    async def off_loop(self, fn: Callable[[], T], request: Request | None = None) -> T:
        """Run `fn` (rendering, tokenising, compiling a grammar) off the event loop, in the lane of `request`'s size."""
        big = request is not None and getattr(request.state, "body_bytes", 0) > BIG_BODY_BYTES
        return await asyncio.get_running_loop().run_in_executor(self.big_pool if big else self.pool, fn)

    def shutdown(self) -> None:
        for pool in (self.pool, self.big_pool):
            pool.shutdown(wait=False)

    async def read(self, request: Request, model: type[T]) -> T:
        limit = self.settings.max_body_bytes
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > limit:
            raise APIError(413, f"the request body has {size} bytes; the limit is {limit}", code="body_too_large")
        body = bytearray()
        timeout = self.settings.body_timeout

        async def receive_body() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")

        try:
            await asyncio.wait_for(receive_body(), timeout)  # a slow body must not hold a connection for ever
        except asyncio.TimeoutError:
            log.warning(
                "%s %s: the request body did not arrive within %g s (%d bytes received)",
                request.method,
                request.url.path,
                timeout,
                len(body),
            )
            raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="body_timeout") from None
        except ClientDisconnect:
            log.info(
                "%s %s: the client disconnected while sending its request body (%d bytes received)",
                request.method,
                request.url.path,
                len(body),
            )
            raise ClientGone from None
        request.state.body_bytes = len(body)
        req = parse_request(model, bytes(body))
        req.check_supported()
        if req.model is not None and req.model != self.settings.model_name:
            raise APIError(
                404,
                f"The model '{req.model}' does not exist (this server has '{self.settings.model_name}')",
                param="model",
                code="model_not_found",
            )
        return req

    def check_prompt_size(self, text: str, param: str) -> None:
        """Refuse a prompt that cannot fit from its length alone, before it is tokenised (tokenising megabytes
        takes seconds): every token is at most `longest_token` characters long."""
        if len(text) > self.max_prompt_chars:
            raise bad_request(
                f"the prompt has {len(text)} characters; this server's maximum prompt length is "
                f"{self.max_prompt_tokens} tokens (model context {self.context}), and no token of this tokenizer "
                f"is longer than {self.longest_token} characters, so it cannot fit",
                param,
                "context_length_exceeded",
            )

    def log_request(self, rid: str, endpoint: str, req: Any, prompt_tokens: int, choices: int) -> None:
        """One line per request (with `log_requests`): the client's `user`, `metadata` and `safety_identifier`,
        JSON-escaped (a newline in them cannot forge a log line) and cut to 200 characters each."""
        if not self.settings.log_requests:
            return
        fields = {k: getattr(req, k, None) for k in ("user", "safety_identifier", "metadata")}
        extra = "".join(f" {k}={json.dumps(v)[:200]}" for k, v in fields.items() if v is not None)
        log.info("%s %s: %d prompt tokens, %d choices%s", endpoint, rid, prompt_tokens, choices, extra)

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise bad_request("the prompt is empty", param)
        if len(ids) > self.max_prompt_tokens:
            raise bad_request(
                f"the prompt has {len(ids)} tokens; this server's maximum prompt length is "
                f"{self.max_prompt_tokens} tokens (model context {self.context})",
                param,
                "context_length_exceeded",
            )
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (size {self.vocab_size})", param)

    def check_choices(self, req: Any, prompts: int) -> None:
        """All choices of a request must fit the batch together; logit_bias must name tokens of the vocabulary."""
        total = prompts * req.n
        if total > self.max_n:
            raise bad_request(
                f"{total} choices requested; this server runs at most {self.max_n} per request (its --max-batch)", "n"
            )
        bias = req.bias_by_token()
        if bias and max(bias) >= self.vocab_size:
            raise bad_request(
                f"'logit_bias' names token {max(bias)}, outside the vocabulary (size {self.vocab_size})", "logit_bias"
            )

    def jobs(
        self,
        req: Any,
        prompts: list[list[int]],
        limit: int | None,
        default: int,
        stop_ids: list[int] | None,
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> list[Job]:
        """One job per choice: prompt k, sample j is choice k * n + j and samples with seed + that index. `req`'s
        penalties and logit bias apply; `logprobs` / `prompt_logprobs`: how many most likely tokens to report per
        generated / prompt token (None: no log-probabilities)."""
        self.check_choices(req, len(prompts))
        max_new = min(default if limit is None else limit, self.max_tokens)
        temperature = 0.0 if req.temperature < GREEDY_BELOW else req.temperature
        bias = req.bias_by_token()
        out = []
        for k, ids in enumerate(prompts):
            for j in range(req.n):
                i = k * req.n + j
                params = SamplingParams(
                    max_new_tokens=max_new,
                    temperature=temperature,
                    top_p=req.top_p,
                    top_k=max(req.top_k, 0),
                    seed=None if req.seed is None else req.seed + i,
                    stop=req.stop_list,
                    stop_token_ids=stop_ids,
                    ignore_eos=req.ignore_eos,
                    constraint=constraint,
                    presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty,
                    repetition_penalty=req.repetition_penalty,
                    logit_bias=bias,
                    logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs,
                )
                try:
                    params.validate()
                except LoopcoderError as e:
                    raise bad_request(str(e)) from None
                out.append(Job(ids, params))
        return out

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_chat(self, req: ChatRequest, tools_on: bool) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template; use /v1/completions")
        messages = [m.for_template() for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if tools_on else None
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja errors, raise_exception() in a template, bad message shapes
            raise bad_request(
                f"the chat template cannot render these messages ({type(e).__name__}: {e})", "messages"
            ) from None
        self.check_prompt_size(text, "messages")
        return self.encode(text)

    # ------------------------------------------------------------------ constraints (on the tokenizer thread)
    def compiled(self, constraint: Constraint | None, param: str) -> Constraint | None:
        """`constraint`, compiled now (the engine reuses the cached grammar); a 400 naming `param` if it cannot be."""
        if constraint is not None:
            try:
                self.grammars.compile(constraint)
            except ConstraintError as e:
                raise bad_request(f"'{param}': {e}", param) from None
        return constraint

    def schema_constraint(self, schema: Any, strict: bool, param: str) -> Constraint:
        """A JSON schema's constraint, compiled and checked (a `$ref` cycle, a schema that allows nothing: a 400
        naming `param`). `response_format` and every tool's `parameters` go through here, so both agree."""
        try:
            constraint = Constraint.json_schema(schema, strict=strict)
        except ConstraintError as e:
            raise bad_request(f"'{param}': {e}", param) from None
        return self.compiled(constraint, param)

    def content_constraint(self, fmt: ResponseFormat | None) -> Constraint | None:
        """What `response_format` asks of the output (compiled): none for text, else a JSON schema."""
        if fmt is None or fmt.type == "text":
            return None
        spec = fmt.json_schema
        if fmt.type == "json_object" or spec.schema_ is None:
            return self.compiled(Constraint.json_object(), "response_format")
        return self.schema_constraint(spec.schema_, bool(spec.strict), "response_format")

    def tool_functions(self, req: ChatRequest) -> list[dict[str, Any]]:
        """`req`'s function definitions as the grammar reads them, each checked as `response_format` is: parameters
        closed (`closed_schema`) unless the server runs with open tool schemas."""
        out = []
        for i, tool in enumerate(req.tools or []):
            f = tool.function.model_dump(exclude_none=True)
            if "parameters" in f and not self.settings.open_tool_schemas:
                f["parameters"] = closed_schema(f["parameters"])
            empty = {"type": "object", "properties": {}, "additionalProperties": False}
            self.schema_constraint(f.get("parameters", empty), bool(f.get("strict")), f"tools.{i}.function.parameters")
            out.append(f)
        return out

    def chat_constraint(self, req: ChatRequest, tools_on: bool) -> Constraint | None:
        """The grammar of a chat turn: `response_format` for its content, and with tools, the call format of
        the tool parser (`tool_choice` "auto": content or calls; "required", a named function or allowed tools in
        mode "required": calls only; a named function or allowed tools: calls to those only)."""
        content = self.content_constraint(req.response_format)
        if not tools_on:
            return content
        functions = self.tool_functions(req)
        named = req.named_choices()
        if named:
            functions = [f for f in functions if f["name"] in named]
        parallel = req.parallel_tool_calls is not False and not isinstance(req.tool_choice, NamedToolChoice)
        content_lark = None if content is None else lark_json(json.loads(content.source), content.strict)
        lark = tool_call_grammar(
            self.grammars,
            self.settings.tool_parser,
            functions,
            required=req.calls_required,
            parallel=parallel,
            content=content_lark,
        )
        constraint = Constraint.grammar(lark)
        try:
            self.grammars.compile(constraint)
        except ConstraintError as e:  # every tool's schema compiled alone: the details are ours, not the client's
            log.warning("the tool-call grammar failed to compile: %s", e)
            raise bad_request("'tools': the tool-call grammar cannot be built from these tools", "tools") from None
        return constraint


def _meta(svc: Service, prefix: str, kind: str) -> dict[str, Any]:
    """The fields every response (or chunk) of one request shares."""
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": svc.settings.model_name,
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(obj: Any) -> str:
    return f"data: {sse_json(obj)}\n\n"


def _event_stream(events: AsyncIterator[str], pending: Pending) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in events:
                yield chunk
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects (the response task is cancelled) or we fail
            pending.close()

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


# ---------------------------------------------------------------------------------------------- routes
async def completions(svc: Service, request: Request) -> Response:
    req = await svc.read(request, CompletionRequest)
    texts_or_ids = req.prompts()
    for p in texts_or_ids:  # on the loop, before any tokenising: a prompt too long to fit is refused at once
        if isinstance(p, str):
            svc.check_prompt_size(p, "prompt")

    def tokenize() -> list[list[int]]:
        return [svc.encode(p) if isinstance(p, str) else list(p) for p in texts_or_ids]

    prompts = await svc.off_loop(tokenize, request)
    for ids in prompts:
        svc.check_prompt(ids, "prompt")
    constraint = await svc.off_loop(lambda: svc.content_constraint(req.response_format), request)
    meta = _meta(svc, "cmpl", "text_completion")
    prompt_tokens = sum(map(len, prompts))
    echoed = [p if isinstance(p, str) else svc.tokenizer.decode(p) for p in texts_or_ids] if req.echo else None
    if req.max_tokens == 0 and req.logprobs is None:  # the prompt alone, as it is: nothing to run
        svc.check_choices(req, len(prompts))
        svc.log_request(meta["id"], "completions", req, prompt_tokens, len(prompts) * req.n)
        return _echo_only(req, meta, echoed, prompt_tokens)
    jobs = svc.jobs(
        req,
        prompts,
        req.max_tokens,
        svc.settings.default_completion_tokens,
        None,
        constraint,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if req.echo else None,
    )
    svc.log_request(meta["id"], "completions", req, prompt_tokens, len(jobs))
    pending = Pending(svc.scheduler, jobs, request)

    def choice_logprobs(i: int, generated: list[TokenLogprob], prompt: list | None, offset: int) -> dict | None:
        """Choice i's `logprobs`: the prompt's tokens first when echoed, then the generated ones."""
        if req.logprobs is None:
            return None
        ids = (prompts[i // req.n] if prompt is not None else []) + [e.token for e in generated]
        return completion_logprobs(ids, (prompt or []) + generated, svc.token_texts, offset)

    if not req.stream:
        results = await pending.collect()
        choices = []
        for i, (text, _, reason) in enumerate(results):
            head = echoed[i // req.n] if echoed else ""
            lp = choice_logprobs(i, pending.logprobs[i], pending.prompt_logprobs[i] if echoed else None, 0)
            choices.append({"index": i, "text": head + text, "logprobs": lp, "finish_reason": reason})
        return JSONResponse({**meta, "choices": choices, "usage": _usage(prompt_tokens, sum(k for _, k, _ in results))})
    first = await pending.started()

    async def events() -> AsyncIterator[str]:
        ntok = 0
        started = [False] * pending.n
        offsets = [0] * pending.n  # where each choice's next token starts (`text_offset`)
        async for u in pending.updates(first):
            if u.error is not None:
                yield _sse(u.error.body())
                return
            ntok += len(u.token_ids)
            text, prompt = u.text, None
            if echoed and not started[u.index]:  # the prompt comes first
                text, prompt = echoed[u.index // req.n] + text, u.prompt_logprobs or []
            started[u.index] = True
            lp = choice_logprobs(u.index, u.logprobs or [], prompt, offsets[u.index])
            if lp and lp["tokens"]:  # the next token starts where this one ends, as in the whole response
                offsets[u.index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
            if text or u.finish_reason or (lp and lp["tokens"]):
                yield _sse(
                    {
                        **meta,
                        "choices": [{"index": u.index, "text": text, "logprobs": lp, "finish_reason": u.finish_reason}],
                    }
                )
        if req.include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(prompt_tokens, ntok)})

    return _event_stream(events(), pending)


def _echo_only(req: CompletionRequest, meta: dict[str, Any], echoed: list[str], prompt_tokens: int) -> Response:
    """`echo` with `max_tokens` 0 and no `logprobs`: each choice is its prompt, as written."""
    choices = [
        {"index": i, "text": echoed[i // req.n], "logprobs": None, "finish_reason": "length"}
        for i in range(len(echoed) * req.n)
    ]
    if not req.stream:
        return JSONResponse({**meta, "choices": choices, "usage": _usage(prompt_tokens, 0)})

    async def events() -> AsyncIterator[str]:
        for c in choices:
            yield _sse({**meta, "choices": [c]})
        if req.include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(prompt_tokens, 0)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def reply_calls(parser: ToolCallParser, text: str, reason: str) -> ParsedOutput:
    """A finished chat reply with tools: its content and calls. Cut by max_tokens or the context ("length"), as
    vLLM's Hermes parser reads such a reply (`parse_cut`: docs/serving.md, "A tool call cut off")."""
    return parse_cut(parser, text) if reason == "length" else parser.parse(text)


def _legacy_call(call: ToolCall) -> dict[str, str]:
    return {"name": call.name, "arguments": call.arguments}


async def chat_completions(svc: Service, request: Request) -> Response:
    req = await svc.read(request, ChatRequest)
    parser = svc.settings.tool_parser
    tools_on = bool(req.tools) and req.tool_choice != "none"
    ids, constraint = await svc.off_loop(
        lambda: (svc.render_chat(req, tools_on), svc.chat_constraint(req, tools_on)), request
    )
    svc.check_prompt(ids, "messages")
    top = (req.top_logprobs or 0) if req.logprobs else None
    jobs = svc.jobs(req, [ids], req.output_limit, svc.max_tokens, svc.chat_stop_ids, constraint, logprobs=top)
    meta = _meta(svc, "chatcmpl", "chat.completion")
    svc.log_request(meta["id"], "chat.completions", req, len(ids), len(jobs))
    pending = Pending(svc.scheduler, jobs, request)
    called = "function_call" if req.legacy_functions else "tool_calls"  # the finish_reason of a reply with calls
    if not req.stream:
        results = await pending.collect()
        choices = []
        for i, (text, _, reason) in enumerate(results):
            parsed = reply_calls(parser, text, reason) if tools_on else ParsedOutput(text)
            message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
            if parsed.tool_calls:
                if req.legacy_functions:
                    message["function_call"] = _legacy_call(parsed.tool_calls[0])
                else:
                    message["tool_calls"] = [c.to_openai() for c in parsed.tool_calls]
                reason = called  # also when cut after a call: as vLLM answers
            lp = (
                {"content": chat_content(pending.logprobs[i], svc.token_texts), "refusal": None}
                if req.logprobs
                else None
            )
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
        return JSONResponse({**meta, "choices": choices, "usage": _usage(len(ids), sum(k for _, k, _ in results))})
    first = await pending.started()
    chunk_meta = {**meta, "object": "chat.completion.chunk"}
    unsent: list[list[TokenLogprob]] = [[] for _ in range(pending.n)]  # logprobs not yet in a chunk, per choice

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> str:
        lp = None
        if req.logprobs and unsent[index]:  # the tokens' logprobs ride on the next chunk the choice sends
            lp, unsent[index] = {"content": chat_content(unsent[index], svc.token_texts), "refusal": None}, []
        return _sse(
            {**chunk_meta, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        )

    async def events() -> AsyncIterator[str]:
        streams = [ToolCallStream(parser) for _ in range(pending.n)]
        sent = [0] * pending.n  # tool calls sent per choice: the next one's index

        def calls(i: int, found: list[ToolCall]) -> Iterator[str]:
            for c in found:  # one delta per call, as soon as it is complete: index, id, type, name, arguments
                if req.legacy_functions:
                    yield chunk(i, {"function_call": _legacy_call(c)})
                else:
                    yield chunk(i, {"tool_calls": [{"index": sent[i], **c.to_openai()}]})
                sent[i] += 1

        for i in range(pending.n):  # as OpenAI: a reply that can only be calls has null content
            yield chunk(i, {"role": "assistant", "content": None if tools_on and req.calls_required else ""})
        ntok = 0
        async for u in pending.updates(first):
            if u.error is not None:
                yield _sse(u.error.body())
                return
            ntok += len(u.token_ids)
            unsent[u.index] += u.logprobs or []
            text = streams[u.index].feed(u.text) if tools_on else u.text
            if text:
                yield chunk(u.index, {"content": text})
            if tools_on:
                for c in calls(u.index, streams[u.index].calls()):
                    yield c
            if u.finish_reason is None:
                continue
            reason = u.finish_reason
            if tools_on:
                rest = streams[u.index].finish(cut=reason == "length")
                if rest.content:
                    yield chunk(u.index, {"content": rest.content})
                for c in calls(u.index, rest.tool_calls):
                    yield c
                if sent[u.index]:  # also when cut after (or inside) a call: as vLLM's stream answers
                    reason = called
            yield chunk(u.index, {}, reason)
        if req.include_usage:
            yield _sse({**chunk_meta, "choices": [], "usage": _usage(len(ids), ntok)})

    return _event_stream(events(), pending)


# ---------------------------------------------------------------------------------------------- the app
class APIKeyMiddleware:
    """Refuse (401) every request without `Authorization: Bearer KEY`, except the open paths."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = APIError(
                    401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
                )
                response = JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(scheduler: Scheduler, tokenizer: Any, settings: ServerSettings) -> FastAPI:
    """The API around a scheduler. Its lifespan starts the engine thread and, at exit, stops it
    (aborting whatever is still running: a graceful drain happens before, see `server.GracefulServer`)."""
    svc = Service(scheduler, tokenizer, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.begin_shutdown(0.0)
            await asyncio.to_thread(scheduler.join, 60.0)
            svc.shutdown()

    app = FastAPI(title="loopcoder", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, key=settings.api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        # after a 408 the rest of the body may still be on its way: close rather than read it
        return JSONResponse(exc.body(), exc.status, headers={"Connection": "close"} if exc.status == 408 else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, f"{exc.detail} ({request.method} {request.url.path})")
        return JSONResponse(err.body(), exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: the status is for the access log

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        err = APIError(500, "internal server error (details in the server log)", code="internal_error")
        return JSONResponse(err.body(), 500)

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = scheduler.stats()
        ok = stats["accepting"]
        return JSONResponse(
            {"status": "ok" if ok else "shutting_down", "model": settings.model_name, **stats}, 200 if ok else 503
        )

    def model_card() -> dict[str, Any]:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": svc.created,
            "owned_by": "loopcoder",
            "max_model_len": svc.context,
        }

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        if model_id != settings.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return JSONResponse(model_card())

    @app.post("/v1/completions")
    async def _completions(request: Request) -> Response:
        return await completions(svc, request)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Response:
        return await chat_completions(svc, request)

    responses_api = ResponsesAPI(svc, lambda jobs, request: Pending(scheduler, jobs, request))

    @app.post("/v1/responses")
    async def _responses(request: Request) -> Response:
        return await responses_api.create(request)

    return app
