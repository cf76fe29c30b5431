"""`loopcoder bfcl`: BFCL's AST categories on a loopcoder model (served in-process) or on a running server, scored by
BFCL's own checker (docs/evaluation.md, "BFCL")."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from loopcoder.commands.options import add_threads_argument
from loopcoder.evaluation import bfcl
from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.errors import LoopcoderError


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="model or run directory: served in this process on a loopback port")
    where.add_argument(
        "--server", metavar="URL", help="a running OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1"
    )
    p.add_argument("--served-model", default=None, help="with --server: the model id to send (default: its first)")
    p.add_argument(
        "--categories",
        default="all",
        help=f"comma-separated: all, non_live, live, simple, or {', '.join(bfcl.CATEGORIES)}",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N entries of each category")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--max-batch", type=int, default=8, help="with --model: sequences decoded together")
    p.add_argument("--max-tokens", type=int, default=512, help="with --model: the server's cap on a reply's tokens")
    p.add_argument("--out", default="bfcl.json", help="results JSON (resumed if it exists)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing --out instead of resuming it")
    p.add_argument(
        "--bfcl-dir",
        default=None,
        help=f"a directory holding bfcl-eval and its checker's few packages (default: installed on first use into "
        f"{bfcl.default_dir()})",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    # here: the runner, the server and the checkpoints import torch (a fast --help)
    from loopcoder.evaluation.runner import RESULTS_VERSION, config_hash, load_results
    from loopcoder.serving.background import BackgroundServer
    from loopcoder.serving.server import api_key_from_env, load_app
    from loopcoder.training.checkpoints import resolve_model_dir
    from loopcoder.utils.runtime import apply_threads

    categories = bfcl.parse_categories(args.categories)
    for name in ("limit", "concurrency", "max_batch", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LoopcoderError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.served_model and not args.server:
        raise LoopcoderError("--served-model goes with --server (with --model the id is the directory's)")
    root = Path(args.bfcl_dir) if args.bfcl_dir else bfcl.default_dir()
    tools = bfcl.load_bfcl(bfcl.ensure_bfcl(root, install=args.bfcl_dir is None, announce=_note))
    model_dir = str(resolve_model_dir(args.model)) if args.model else None
    identity: dict[str, Any] = {
        "bfcl_eval": bfcl.BFCL_VERSION,
        "model_entry": bfcl.MODEL_ENTRY,
        "temperature": bfcl.TEMPERATURE,
        "limit": args.limit,
    }
    if model_dir:
        identity.update(
            model=str(Path(model_dir).resolve()), config_hash=config_hash(model_dir), max_tokens=args.max_tokens
        )
    else:
        identity.update(server=args.server, served_model=args.served_model)
    out = Path(args.out)
    results = None if args.fresh else load_results(out, identity)
    if results is None:
        results = {"version": RESULTS_VERSION, "identity": identity, "bfcl": {}, "seconds": 0.0}

    def save() -> None:
        atomic_write_text(out, json.dumps(results, indent=1))

    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if model_dir:  # `loopcoder serve` in this process, on a free loopback port
            apply_threads(args.threads)
            app, scheduler = load_app(
                model_dir,
                device=args.device,
                dtype=args.dtype,
                max_batch=args.max_batch,
                max_tokens=args.max_tokens,
                max_queue=max(64, args.concurrency),
                queue_timeout=3600.0,
            )
            server = stack.enter_context(BackgroundServer(app, scheduler))
            base, name, key = server.url + "/v1", app.state.service.settings.model_name, None
        else:
            base, key = args.server, api_key_from_env()
            name = args.served_model or _first_model(base, key)
        bfcl.run_categories(
            tools,
            base,
            name,
            categories,
            results["bfcl"],
            save,
            limit=args.limit,
            concurrency=args.concurrency,
            api_key=key,
        )
    results["seconds"] += time.perf_counter() - t0
    results["model_id"] = name
    save()
    print(bfcl.summary(results["bfcl"]))
    print(f"results: {out}", file=sys.stderr)
    return 0


def _first_model(base_url: str, api_key: str | None) -> str:
    try:
        return bfcl.get_json(base_url.rstrip("/") + "/models", api_key)["data"][0]["id"]
    except (LoopcoderError, KeyError, IndexError, TypeError) as e:  # unreachable, not OpenAI-compatible, no model
        raise LoopcoderError(f"--server {base_url}: cannot list its models ({e}); pass --served-model") from None


def _note(text: str) -> None:
    print(text, file=sys.stderr)
