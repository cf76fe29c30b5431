"""`loopcoder generate`: complete a prompt with the parallel-loop engine."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loopcoder.commands.options import (
    add_model_arguments,
    add_runtime_arguments,
    add_sampling_arguments,
    add_tokenizer_check_argument,
    sampling_params,
)
from loopcoder.utils.errors import LoopcoderError

if TYPE_CHECKING:
    from loopcoder.inference.constraints import Constraint


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", default=None, help="prompt text (default: read from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    add_sampling_arguments(p, max_new_tokens=128)
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="FILE", help="the output is JSON that validates against this schema")
    c.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    c.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression")
    c.add_argument("--grammar", metavar="FILE", help="the output matches this Lark grammar (llguidance's dialect)")
    add_runtime_arguments(p)
    add_tokenizer_check_argument(p)


def read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LoopcoderError(f"{what} {path}: cannot read it ({e})") from None


def constraint(args: argparse.Namespace) -> Constraint | None:
    from loopcoder.inference.constraints import Constraint  # here: it imports torch (fast --help)

    if args.json_schema:
        return Constraint.json_schema(read_text(args.json_schema, "--json-schema"))
    if args.json_object:
        return Constraint.json_object()
    if args.regex is not None:
        return Constraint.regex(args.regex)
    if args.grammar:
        return Constraint.grammar(read_text(args.grammar, "--grammar"))
    return None


def run(args: argparse.Namespace) -> int:
    # here, not at the top: they import torch, which `loopcoder generate --help` does not need
    from loopcoder.inference.engine import Engine
    from loopcoder.model.loading import chat_prompt_ids, chat_stop_ids, load_for_inference
    from loopcoder.training.checkpoints import resolve_model_dir
    from loopcoder.utils.runtime import apply_threads

    params = sampling_params(args, constraint=constraint(args))
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise LoopcoderError("the prompt is empty (give --prompt TEXT or text on stdin)")
    threads = apply_threads(args.threads)
    model, tok = load_for_inference(
        str(resolve_model_dir(args.model)), args.tokenizer, args.device, args.dtype, args.allow_tokenizer_mismatch
    )
    if args.chat:
        ids = chat_prompt_ids(tok, [{"role": "user", "content": prompt}], "--chat")
        params.stop_token_ids = chat_stop_ids(model.config.eos_token_id, tok)  # a reply ends with its turn
    else:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
    # One sequence: nothing to share or page, and the preallocated cache decodes faster on CPU (no paged
    # attention kernel: a paged step gathers its blocks, 1.16-1.26x the step in docs/benchmarks.md).
    engine = Engine(model, tok, max_batch=1, mode=args.mode, paged=False)
    if params.constraint is not None:
        engine.grammars.compile(params.constraint)  # a bad schema or grammar: one line, before generating

    def show(event) -> None:
        if event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()

    start = time.perf_counter()
    out = engine.generate([ids], params, on_event=show if args.stream else None)[0]
    elapsed = time.perf_counter() - start
    if out.error is not None:
        raise LoopcoderError(f"generation failed: {out.error}")
    print("" if args.stream else out.text)
    n = len(out.token_ids)
    print(
        f"[{n} tokens in {elapsed:.2f}s, {n / max(elapsed, 1e-9):.1f} tokens/s, R={model.config.plt_num_loops}, "
        f"mode={args.mode}, threads={threads}, finish={out.finish_reason}]",
        file=sys.stderr,
    )
    return 0
