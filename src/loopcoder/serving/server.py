"""Putting a server together: model + engine + scheduler + app, and uvicorn with a graceful drain."""

from __future__ import annotations

import asyncio
import copy
import errno
import os
import socket
import time
from pathlib import Path
from typing import Any

import uvicorn

from loopcoder.inference.engine import Engine
from loopcoder.model.loading import load_for_inference
from loopcoder.serving.app import ServerSettings, create_app
from loopcoder.serving.limits import guarded_protocol
from loopcoder.serving.scheduler import Scheduler
from loopcoder.serving.tool_calls import get_tool_parser
from loopcoder.utils.defaults import HEADER_TIMEOUT, MAX_CONNECTIONS
from loopcoder.utils.errors import LoopcoderError


def load_app(
    model_dir: str,
    tokenizer_dir: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    mode: str = "parallel",
    max_batch: int = 8,
    max_queue: int = 64,
    queue_timeout: float = 30.0,
    model_name: str | None = None,
    tool_parser: str = "hermes",
    engine_options: dict | None = None,
    allow_tokenizer_mismatch: bool = False,
    **settings: Any,
) -> tuple[Any, Scheduler]:
    """(FastAPI app, its scheduler) serving the model in `model_dir`. `engine_options`: the `Engine`'s cache and
    scheduling options (`paged`, `block_size`, `kv_cache_tokens`, `prefix_caching`, `max_step_tokens`);
    `settings`: `ServerSettings` fields."""
    parser = get_tool_parser(tool_parser)
    model, tokenizer = load_for_inference(model_dir, tokenizer_dir, device, dtype, allow_tokenizer_mismatch)
    engine = Engine(model, tokenizer, max_batch=max_batch, mode=mode, **(engine_options or {}))
    scheduler = Scheduler(engine, max_queue=max_queue, queue_timeout=queue_timeout)
    name = model_name or Path(model_dir).resolve().name
    app = create_app(scheduler, tokenizer, ServerSettings(model_name=name, tool_parser=parser, **settings))
    return app, scheduler


class GracefulServer(uvicorn.Server):
    """uvicorn's server, whose shutdown (SIGINT, SIGTERM, `should_exit`) first drains the scheduler.

    The scheduler refuses new requests (503 `shutting_down`), lets running and queued ones finish for
    `grace` seconds, then aborts the rest, whose responses end cleanly (an error event and `[DONE]` on a
    stream, a 503 otherwise). The server keeps listening while it drains, so that `/health` answers 503
    to a load balancer's probe; once the engine thread has stopped, uvicorn closes the listener and
    waits for the open connections to finish their responses.
    """

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, grace: float) -> None:
        super().__init__(config)
        self.scheduler = scheduler
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.scheduler.begin_shutdown(self.grace)
        deadline = time.monotonic() + self.grace + 10  # the scheduler aborts at `grace`: a backstop only
        while not self.scheduler.join(0) and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await super().shutdown(sockets)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free one); bind errors are one-line `LoopcoderError`s."""
    if not 0 <= port <= 65535:
        raise LoopcoderError(f"--port must be 0-65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise LoopcoderError(f"--host {host!r}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, addr = info[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = "it is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise LoopcoderError(f"cannot listen on {host}:{port}: {why}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(
    app: Any,
    scheduler: Scheduler,
    *,
    grace: float = 30.0,
    log_level: str = "info",
    access_log: bool = False,
    header_timeout: float = HEADER_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> GracefulServer:
    # uvicorn's own graceful timeout is the backstop: by then the scheduler has aborted everything
    # our own log lines ("loopcoder.serve") go where uvicorn's go, formatted alike, at the same level
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["loopcoder"] = {"handlers": ["default"], "level": log_level.upper()}
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        log_config=log_config,
        timeout_graceful_shutdown=grace + 10,
        timeout_keep_alive=5,
        http=guarded_protocol(header_timeout, max_connections),
    )
    return GracefulServer(config, scheduler, grace)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def api_key_from_env() -> str | None:
    return os.environ.get("LOOPCODER_API_KEY") or None
