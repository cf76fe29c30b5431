"""`loopcoder serve`: an OpenAI-compatible HTTP server (completions, chat, tool calls) with continuous batching."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from loopcoder.commands.options import add_threads_argument, add_tokenizer_check_argument
from loopcoder.inference.config import EngineConfig  # no torch: the parser builds without it
from loopcoder.utils.defaults import (
    BODY_TIMEOUT,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_STEP_TOKENS,
    HEADER_TIMEOUT,
    MAX_CONNECTIONS,
)
from loopcoder.utils.errors import LoopcoderError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="model directory (released LoopCoder-V2 layout) or a run directory (its newest checkpoint)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
        "(default: $LOOPCODER_API_KEY; unset: no key)",
    )
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: directory name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (engine slots)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429")
    p.add_argument("--queue-timeout", type=float, default=30.0, help="seconds a request may wait for a slot (503)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context minus one")
    p.add_argument("--max-tokens", type=int, default=2048, help="cap on a request's max_tokens")
    p.add_argument("--max-body-bytes", type=int, default=2 * 2**20, help="larger request bodies get 413")
    p.add_argument(
        "--header-timeout",
        type=float,
        default=HEADER_TIMEOUT,
        help="seconds a client may take to send a request's headers (then 408 and the connection closes)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=BODY_TIMEOUT,
        help="seconds a client may take to send a request's body (then 408)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help="open connections at most; more are answered 503 and closed",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="on SIGINT/SIGTERM, seconds in-flight requests may take to finish before being aborted",
    )
    p.add_argument(
        "--tool-parser",
        default="hermes",
        help="tool-call parser: hermes (<tool_call>{json}</tool_call>) or package.module:Class",
    )
    p.add_argument(
        "--open-tool-schemas",
        action="store_true",
        help="read tools' parameters as plain JSON Schema (default: objects are closed, additionalProperties "
        "false where a schema does not say otherwise, as OpenAI's strict function calling reads them)",
    )
    p.add_argument("--mode", choices=["parallel", "sequential"], default="parallel")
    add_cache_arguments(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    add_threads_argument(p)
    add_tokenizer_check_argument(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--access-log", action="store_true", help="log every request (and its id, user and metadata: one line each)"
    )


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's K/V cache and prefill scheduling (docs/serving.md, "Long prompts and shared prefixes")."""
    p.add_argument(
        "--max-step-tokens",
        type=int,
        default=DEFAULT_STEP_TOKENS,
        metavar="N",
        help="tokens per engine step, decoding sequences included: longer prompts are prefilled in "
        "chunks between decode steps (0: every prompt in one piece)",
    )
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="positions per K/V block")
    p.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        metavar="N",
        help="positions in the shared K/V block pool (default: max batch x the model's context)",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="do not keep finished sequences' blocks for later prompts that share their prefix",
    )
    p.add_argument(
        "--no-paged-kv",
        dest="paged",
        action="store_false",
        help="preallocate the model's context of K/V per slot instead of a block pool (no prefix caching)",
    )


def cache_options(args: argparse.Namespace) -> dict:
    """The `Engine` options of `add_cache_arguments`, checked (one-line errors)."""
    if args.max_step_tokens < 0:
        raise LoopcoderError(f"--max-step-tokens must be >= 0, got {args.max_step_tokens}")
    opts = dict(
        paged=args.paged,
        block_size=args.block_size,
        kv_cache_tokens=args.kv_cache_tokens,
        prefix_caching=args.prefix_caching and args.paged,
        max_step_tokens=args.max_step_tokens or None,
    )
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < 1:
        raise LoopcoderError(f"--kv-cache-tokens must be >= 1, got {args.kv_cache_tokens}")
    try:
        EngineConfig(max_batch=args.max_batch, **opts)  # validates
    except LoopcoderError as e:  # the engine's names, the command line's spelling
        message = str(e)
        for name in ("max_step_tokens", "max_batch", "block_size", "kv_cache_tokens"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise LoopcoderError(message) from None
    return opts


def run(args: argparse.Namespace) -> int:
    # here, not at the top: they import torch and the serving stack, which `serve --help` does not need
    from loopcoder.serving.server import api_key_from_env, bind, is_loopback, load_app, make_server
    from loopcoder.training.checkpoints import resolve_model_dir
    from loopcoder.utils.runtime import apply_threads

    for name in ("max_batch", "max_tokens", "max_body_bytes", "max_connections"):
        if getattr(args, name) < 1:
            raise LoopcoderError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        raise LoopcoderError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise LoopcoderError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
    if not args.queue_timeout > 0 or not args.grace >= 0:
        raise LoopcoderError("--queue-timeout must be > 0 and --grace >= 0")
    for name in ("header_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            raise LoopcoderError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    engine_options = cache_options(args)
    model_dir = resolve_model_dir(args.model)
    apply_threads(args.threads)
    api_key = args.api_key or api_key_from_env()
    sock = bind(args.host, args.port)  # before loading the model: a taken port fails fast
    try:
        # a run directory serves its newest checkpoint under the run's name, not "step-000300"
        app, scheduler = load_app(
            str(model_dir),
            args.tokenizer,
            device=args.device,
            dtype=args.dtype,
            mode=args.mode,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            queue_timeout=args.queue_timeout,
            model_name=args.served_model_name or Path(args.model).resolve().name,
            tool_parser=args.tool_parser,
            api_key=api_key,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens,
            max_body_bytes=args.max_body_bytes,
            body_timeout=args.body_timeout,
            open_tool_schemas=args.open_tool_schemas,
            log_requests=args.access_log,
            engine_options=engine_options,
            allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
        )
        server = make_server(
            app,
            scheduler,
            grace=args.grace,
            log_level=args.log_level,
            access_log=args.access_log,
            header_timeout=args.header_timeout,
            max_connections=args.max_connections,
        )
        host, port = sock.getsockname()[:2]
        model_name = app.state.service.settings.model_name
        print(
            f"loopcoder serve: {model_name} on http://{_url_host(host)}:{port}/v1 (max batch {args.max_batch}, "
            f"queue {args.max_queue}, {'API key required' if api_key else 'no API key'})",
            file=sys.stderr,
            flush=True,
        )
        if not is_loopback(args.host) and not api_key:
            print("loopcoder serve: warning: listening beyond loopback without --api-key", file=sys.stderr)
        received: list[int] = []
        # uvicorn re-raises the signal that stopped it once it has shut down; record it instead of dying
        previous = {
            s: signal.signal(s, lambda sig, _frame: received.append(sig)) for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            server.run(sockets=[sock])
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        sock.close()
    if not server.started:
        raise LoopcoderError("the server did not start (see the log above)")
    print(
        f"loopcoder serve: stopped{' on ' + signal.Signals(received[0]).name if received else ''} "
        f"({scheduler.counters['completed']} requests completed, "
        f"{scheduler.counters['aborted_at_shutdown']} aborted at shutdown)",
        file=sys.stderr,
    )
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
