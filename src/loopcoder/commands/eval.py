"""`loopcoder eval`: HumanEval (sandboxed), code reasoning by difficulty and bits per byte on one model."""

from __future__ import annotations

import argparse
import sys

from loopcoder.commands.options import add_threads_argument, add_tokenizer_check_argument, int_list
from loopcoder.data.reasoning import parse_steps
from loopcoder.utils.errors import LoopcoderError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory, or a run directory (its newest checkpoint)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument(
        "--tasks",
        default="humaneval,reasoning,bpb",
        help="comma-separated: humaneval,reasoning,bpb and the file benchmarks humaneval+,mbpp+,"
        "cruxeval-o,cruxeval-i,lcb-codegen,lcb-execution",
    )
    p.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="DIR|TASK=FILE",
        help="data directory from `loopcoder data build` (for bpb), and TASK=FILE for each file benchmark "
        "(repeatable), e.g. --data humaneval+=HumanEvalPlus.jsonl.gz",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="only the first N problems of each benchmark: humaneval and the file benchmarks (reasoning has "
        "--reasoning-n, bpb --bpb-rows)",
    )
    p.add_argument("--n-samples", type=int, default=1, help="completions per HumanEval problem")
    p.add_argument("--k", type=int_list, default=(1,), help="pass@k for these k (each <= n-samples), e.g. 1,10")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sample i of a problem uses seed + i")
    p.add_argument("--batch-size", type=int, default=16, help="sequences decoded together")
    p.add_argument(
        "--prompt-style",
        choices=["auto", "completion", "chat"],
        default="auto",
        help="auto: the chat template for instruction-tuned checkpoints, completion prompts otherwise",
    )
    p.add_argument("--humaneval-limit", type=int, default=None, metavar="N", help="deprecated: the same as --limit N")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=384,
        help="completion length of the code-writing tasks (humaneval, humaneval+, mbpp+, lcb-codegen)",
    )
    p.add_argument("--reasoning-n", type=int, default=50, help="held-out programs per difficulty")
    p.add_argument("--reasoning-steps", default="1-6", help="difficulties, e.g. 1-6 or 1,3,5")
    p.add_argument(
        "--reasoning-family",
        choices=["mixed", "digits", "chains"],
        default="mixed",
        help="mixed programs, one-digit modular arithmetic (digits), or variable tracking (chains)",
    )
    p.add_argument("--reasoning-styles", default="", help="extra prompt formats, e.g. cruxeval")
    p.add_argument("--bpb-rows", type=int, default=None, help="limit bits per byte to the first N rows")
    p.add_argument("--workers", type=int, default=None, help="sandbox worker processes")
    p.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="required for humaneval: model-written code runs in the sandbox",
    )
    p.add_argument("--out", default="results.json", help="results JSON (resumed if it exists)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing --out instead of resuming it")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    add_threads_argument(p)
    add_tokenizer_check_argument(p)


def problem_limit(limit: int | None, humaneval_limit: int | None) -> int | None:
    """`--limit`, the one limit of every problem-list benchmark; `--humaneval-limit` (deprecated) is its old
    name, which limited HumanEval alone while `--limit` limited the file benchmarks alone."""
    if humaneval_limit is not None:
        if limit is not None and limit != humaneval_limit:
            raise LoopcoderError(f"--humaneval-limit {humaneval_limit} and --limit {limit}: give --limit alone")
        print(
            "loopcoder eval: --humaneval-limit is deprecated: use --limit N (it limits every benchmark, "
            "HumanEval included)",
            file=sys.stderr,
        )
        limit = humaneval_limit
    if limit is not None and limit < 1:
        raise LoopcoderError(f"--limit must be >= 1, got {limit}")
    return limit


def run(args: argparse.Namespace) -> int:
    # here, not at the top: they import torch, which `loopcoder eval --help` does not need
    from loopcoder.evaluation.runner import evaluate, parse_data, parse_tasks, summary_table
    from loopcoder.evaluation.tasks import EvalSettings
    from loopcoder.inference.sampling import SamplingParams
    from loopcoder.training.checkpoints import resolve_model_dir
    from loopcoder.utils.runtime import apply_threads

    tasks = parse_tasks(args.tasks)
    data_dir, data_files = parse_data(args.data)
    limit = problem_limit(args.limit, args.humaneval_limit)
    SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed).validate()
    for name in ("batch_size", "reasoning_n", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise LoopcoderError(f"--{name.replace('_', '-')} must be >= 1")
    try:
        steps = tuple(parse_steps(args.reasoning_steps))
    except LoopcoderError as e:
        raise LoopcoderError(f"--reasoning-steps: {e}") from None
    styles = tuple(s for s in args.reasoning_styles.split(",") if s)
    bad = [s for s in styles if s not in ("completion", "chat", "cruxeval")]
    if bad:
        raise LoopcoderError(f"--reasoning-styles: unknown style {bad[0]!r} (completion, chat, cruxeval)")
    settings = EvalSettings(
        n_samples=args.n_samples,
        ks=tuple(args.k),
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        humaneval_limit=limit,
        humaneval_max_new_tokens=args.max_new_tokens,
        file_limit=limit,
        reasoning_n=args.reasoning_n,
        reasoning_steps=steps,
        reasoning_family=args.reasoning_family,
        reasoning_styles=styles,
        bpb_rows=args.bpb_rows,
        workers=args.workers,
    )
    model_dir = str(resolve_model_dir(args.model))
    apply_threads(args.threads)
    results = evaluate(
        model_dir,
        tasks,
        settings,
        args.out,
        data_dir=data_dir,
        data_files=data_files,
        allow_code_execution=args.allow_code_execution,
        fresh=args.fresh,
        device=args.device,
        dtype=args.dtype,
        prompt_style=args.prompt_style,
        tokenizer_dir=args.tokenizer,
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
    )
    print(summary_table(results))
    print(f"results: {args.out}", file=sys.stderr)
    return 0
