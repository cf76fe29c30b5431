"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, /v1/responses
(responses.py), /health.

Handlers run on the event loop and never touch the engine: they validate, tokenise (in a one-thread
pool, off the loop), `submit` a ticket to the `Scheduler`, and read the ticket's updates from an
asyncio queue. A client that disconnects (while waiting, mid-generation or mid-stream) cancels its
ticket, which frees its slots before the next decode step. Every error is an OpenAI-style body.
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

from loopcoder.constraints import Constraint, ConstraintError, lark_json
from loopcoder.defaults import BODY_TIMEOUT
from loopcoder.errors import LoopcoderError
from loopcoder.runtime import chat_stop_ids
from loopcoder.sampling import SamplingParams
from loopcoder.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    NamedToolChoice,
    ResponseFormat,
    bad_request,
    parse_request,
)
from loopcoder.serving.responses import ResponsesAPI
from loopcoder.serving.scheduler import Job, Scheduler, Update
from loopcoder.serving.tool_calls import (
    HermesToolCallParser,
    ParsedOutput,
    ToolCallParser,
    ToolCallStream,
    tool_call_grammar,
)

log = logging.getLogger("loopcoder.serve")
T = TypeVar("T")

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (dividing logits by ~0 overflows)
OPEN_PATHS = ("/health",)  # reachable without the API key (for load balancers and scripts)


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
        """(text, completion tokens, finish reason) per choice, once all are done."""
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
            merged[u.index] = Update(u.index, u.text, list(u.token_ids), u.finish_reason, u.error)
        elif not m.done:  # nothing follows a choice's last update
            m.text += u.text
            m.token_ids += u.token_ids
            m.finish_reason, m.error = u.finish_reason, u.error
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
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="loopcoder-tokenizer")

    async def off_loop(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

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

    def jobs(
        self,
        req: Any,
        prompts: list[list[int]],
        limit: int | None,
        default: int,
        stop_ids: list[int] | None,
        constraint: Constraint | None = None,
    ) -> list[Job]:
        """One job per choice: prompt k, sample j is choice k * n + j and samples with seed + that index."""
        total = len(prompts) * req.n
        if total > self.max_n:
            raise bad_request(
                f"{total} choices requested; this server runs at most {self.max_n} per request (its --max-batch)", "n"
            )
        max_new = min(limit or default, self.max_tokens)
        temperature = 0.0 if req.temperature < GREEDY_BELOW else req.temperature
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

    def content_constraint(self, fmt: ResponseFormat | None) -> Constraint | None:
        """What `response_format` asks of the output: none for text, else a JSON schema."""
        if fmt is None or fmt.type == "text":
            return None
        spec = fmt.json_schema
        try:
            if fmt.type == "json_object" or spec.schema_ is None:
                return Constraint.json_object()
            return Constraint.json_schema(spec.schema_, strict=bool(spec.strict))
        except ConstraintError as e:
            raise bad_request(f"'response_format': {e}", "response_format") from None

    def chat_constraint(self, req: ChatRequest, tools_on: bool) -> Constraint | None:
        """The grammar of a chat turn: `response_format` for its content, and with tools, the call format of
        the tool parser (`tool_choice` "auto": content or calls; "required" or a named function: calls only)."""
        content = self.compiled(self.content_constraint(req.response_format), "response_format")
        if not tools_on:
            return content
        indexed = list(enumerate(t.function.model_dump(exclude_none=True) for t in req.tools))
        choice, parallel = req.tool_choice or "auto", req.parallel_tool_calls is not False
        if isinstance(choice, NamedToolChoice):
            indexed = [(i, f) for i, f in indexed if f["name"] == choice.function.name]
            parallel = False
        content_lark = None if content is None else lark_json(json.loads(content.source), content.strict)
        try:
            lark = tool_call_grammar(
                self.grammars,
                self.settings.tool_parser,
                [f for _, f in indexed],
                required=choice != "auto",
                parallel=parallel,
                content=content_lark,
            )
            return self.compiled(Constraint.grammar(lark), "tools")
        except APIError:  # name the tool whose parameters cannot be compiled
            for i, f in indexed:
                self.compiled(
                    Constraint.json_schema(f.get("parameters") or {}, bool(f.get("strict"))),
                    f"tools.{i}.function.parameters",
                )
            raise


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


# Characters that JSON leaves raw but line readers such as httpx's (str.splitlines) treat as line breaks:
# escaped, an event stays on one line for every client. (Control characters are always escaped.)
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':')).translate(_LINE_BREAKS)}\n\n"


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

    def tokenize() -> list[list[int]]:
        return [svc.encode(p) if isinstance(p, str) else list(p) for p in texts_or_ids]

    prompts = await svc.off_loop(tokenize)
    for ids in prompts:
        svc.check_prompt(ids, "prompt")
    constraint = await svc.off_loop(
        lambda: svc.compiled(svc.content_constraint(req.response_format), "response_format")
    )
    jobs = svc.jobs(req, prompts, req.max_tokens, svc.settings.default_completion_tokens, None, constraint)
    prompt_tokens = sum(map(len, prompts))
    meta = _meta(svc, "cmpl", "text_completion")
    pending = Pending(svc.scheduler, jobs, request)
    if not req.stream:
        results = await pending.collect()
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, _, reason) in enumerate(results)
        ]
        return JSONResponse({**meta, "choices": choices, "usage": _usage(prompt_tokens, sum(k for _, k, _ in results))})
    first = await pending.started()

    async def events() -> AsyncIterator[str]:
        ntok = 0
        async for u in pending.updates(first):
            if u.error is not None:
                yield _sse(u.error.body())
                return
            ntok += len(u.token_ids)
            if u.text or u.finish_reason:
                yield _sse(
                    {
                        **meta,
                        "choices": [
                            {"index": u.index, "text": u.text, "logprobs": None, "finish_reason": u.finish_reason}
                        ],
                    }
                )
        if req.include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(prompt_tokens, ntok)})

    return _event_stream(events(), pending)


async def chat_completions(svc: Service, request: Request) -> Response:
    req = await svc.read(request, ChatRequest)
    parser = svc.settings.tool_parser
    tools_on = bool(req.tools) and req.tool_choice != "none"
    ids, constraint = await svc.off_loop(lambda: (svc.render_chat(req, tools_on), svc.chat_constraint(req, tools_on)))
    svc.check_prompt(ids, "messages")
    jobs = svc.jobs(req, [ids], req.output_limit, svc.max_tokens, svc.chat_stop_ids, constraint)
    meta = _meta(svc, "chatcmpl", "chat.completion")
    pending = Pending(svc.scheduler, jobs, request)
    if not req.stream:
        results = await pending.collect()
        choices = []
        for i, (text, _, reason) in enumerate(results):
            parsed = parser.parse(text) if tools_on else ParsedOutput(text)
            message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
            if parsed.tool_calls:
                message["tool_calls"] = [c.to_openai() for c in parsed.tool_calls]
                reason = "tool_calls" if reason == "stop" else reason  # a cut turn says so ("length")
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": reason})
        return JSONResponse({**meta, "choices": choices, "usage": _usage(len(ids), sum(k for _, k, _ in results))})
    first = await pending.started()
    chunk_meta = {**meta, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> str:
        return _sse(
            {**chunk_meta, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        )

    async def events() -> AsyncIterator[str]:
        streams = [ToolCallStream(parser) for _ in range(pending.n)]
        sent = [0] * pending.n  # tool calls sent per choice: the next one's index

        def calls(i: int, found: list) -> Iterator[str]:
            for c in found:  # one delta per call, as soon as it is complete: index, id, type, name, arguments
                yield chunk(i, {"tool_calls": [{"index": sent[i], **c.to_openai()}]})
                sent[i] += 1

        calls_only = tools_on and req.tool_choice not in (None, "auto")  # "required" or a named function
        for i in range(pending.n):  # as OpenAI: a reply that can only be calls has null content
            yield chunk(i, {"role": "assistant", "content": None if calls_only else ""})
        ntok = 0
        async for u in pending.updates(first):
            if u.error is not None:
                yield _sse(u.error.body())
                return
            ntok += len(u.token_ids)
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
                rest = streams[u.index].finish()
                if rest.content:
                    yield chunk(u.index, {"content": rest.content})
                for c in calls(u.index, rest.tool_calls):
                    yield c
                if sent[u.index] and reason == "stop":  # a cut turn says so ("length")
                    reason = "tool_calls"
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
            svc.pool.shutdown(wait=False)

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
        err = APIError(500, f"internal server error ({type(exc).__name__})", code="internal_error")
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
