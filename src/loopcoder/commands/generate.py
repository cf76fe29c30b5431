"""`loopcoder generate`: complete a prompt with the parallel-loop engine."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from loopcoder.constraints import Constraint
from loopcoder.engine import Engine
from loopcoder.errors import LoopcoderError
from loopcoder.runtime import (
    add_threads_argument,
    add_tokenizer_check_argument,
    apply_threads,
    chat_stop_ids,
    load_for_inference,
)
from loopcoder.sampling import SamplingParams
from loopcoder.training.checkpoints import resolve_model_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="model directory (released LoopCoder-V2 layout) or a run directory (its newest checkpoint)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--prompt", default=None, help="prompt text (default: read from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="FILE", help="the output is JSON that validates against this schema")
    c.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    c.add_argument("--regex", metavar="PATTERN", help="the output matches this regular expression")
    c.add_argument("--grammar", metavar="FILE", help="the output matches this Lark grammar (llguidance's dialect)")
    p.add_argument(
        "--mode",
        choices=["parallel", "sequential"],
        default="parallel",
        help="parallel: all loops in one pass per token (PLT); sequential: one pass per loop",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    add_threads_argument(p)
    add_tokenizer_check_argument(p)


def read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LoopcoderError(f"{what} {path}: cannot read it ({e})") from None


def constraint(args: argparse.Namespace) -> Constraint | None:
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
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        constraint=constraint(args),
    ).validate()
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise LoopcoderError("the prompt is empty (give --prompt TEXT or text on stdin)")
    threads = apply_threads(args.threads)
    model, tok = load_for_inference(
        str(resolve_model_dir(args.model)), args.tokenizer, args.device, args.dtype, args.allow_tokenizer_mismatch
    )
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise LoopcoderError("--chat: this tokenizer has no chat template")
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
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
