"""`loopcoder swe`: agentic software engineering, offline: the task set, the agent, scoring, reports.

loopcoder swe build --out tasks/stdlib --allow-code-execution
loopcoder swe run --tasks tasks/stdlib --model DIR --out runs/swe-r2 --allow-code-execution
loopcoder swe score --tasks tasks/stdlib --predictions preds.jsonl --out scored/ --allow-code-execution
loopcoder swe checkout --tasks tasks/stdlib --instance ID --out ws/ID > ws/ID.md   (for another agent)
loopcoder swe report runs/swe-r1 runs/swe-r2 --out report.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from loopcoder.commands.options import add_threads_argument
from loopcoder.evaluation.sandbox import ALLOW_FLAG, CodeExecutionNotAllowedError
from loopcoder.swe import catalog, repo, taskset
from loopcoder.swe.settings import PROTOCOLS, AgentConfig
from loopcoder.swe.shell import SandboxShell
from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.errors import LoopcoderError

if TYPE_CHECKING:
    from loopcoder.swe.chat import EngineChat


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    allow = dict(action="store_true", dest="allow", help="required: commands and tests run in the sandbox")

    b = sub.add_parser("build", help="inject bugs into standard-library modules, validate, write the task set")
    b.add_argument("--out", required=True, help="the task set directory to write")
    b.add_argument("--seed", type=int, default=0, help="which mutations, in which order")
    b.add_argument("--per-module", type=int, default=8, help="tasks per module")
    b.add_argument("--pairs-per-module", type=int, default=2, help="of them, tasks that combine two bugs")
    b.add_argument("--modules", default=None, help=f"comma list (default all: {', '.join(catalog.BY_NAME)})")
    b.add_argument("--limit", type=int, default=None, help="at most this many tasks in all")
    b.add_argument("--max-candidates", type=int, default=60, help="mutants tried per module at most")
    b.add_argument("--workers", type=int, default=1, help="sandboxed test runs at once")
    b.add_argument("--force", action="store_true", help="replace a non-empty --out")
    b.add_argument(ALLOW_FLAG, **allow)

    r = sub.add_parser("run", help="run the agent on a task set; predictions, trajectories, scores")
    r.add_argument("--tasks", required=True, help="a task set directory (`swe build`)")
    r.add_argument("--model", default=None, help="model or run directory: the engine in this process")
    r.add_argument("--endpoint", default=None, help="an OpenAI-compatible base URL instead, e.g. http://host:8000/v1")
    r.add_argument("--served-model", default=None, help="the endpoint's model id (with --endpoint)")
    r.add_argument("--api-key", default="none", help="the endpoint's key (with --endpoint)")
    r.add_argument("--name", default=None, help="the run's name in predictions and reports")
    r.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    r.add_argument("--protocol", choices=PROTOCOLS, default="tool", help="bash tool calls, or a bash block in text")
    r.add_argument("--instances", default=None, help="comma list of instance ids (default: all)")
    r.add_argument("--limit", type=int, default=None, help="only the first N instances")
    r.add_argument("--max-turns", type=int, default=AgentConfig.max_turns, help="model calls per episode")
    r.add_argument("--max-tokens", type=int, default=AgentConfig.max_tokens, help="tokens generated per episode")
    r.add_argument("--max-seconds", type=float, default=AgentConfig.max_seconds, help="wall time per episode")
    r.add_argument("--max-new-tokens", type=int, default=AgentConfig.max_new_tokens, help="tokens per reply")
    r.add_argument("--command-timeout", type=float, default=AgentConfig.command_timeout, help="seconds per command")
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=0, help="reply t of an episode samples with seed + t")
    r.add_argument("--no-score", action="store_true", help="only run the agent (score later with `swe score`)")
    r.add_argument("--fresh", action="store_true", help="ignore an existing --out instead of resuming it")
    r.add_argument("--device", default="auto")
    r.add_argument("--dtype", default="auto")
    r.add_argument(ALLOW_FLAG, **allow)
    add_threads_argument(r)

    s = sub.add_parser("score", help="score a predictions file (or gold / empty, or a workspace) in the sandbox")
    s.add_argument("--tasks", required=True, help="a task set directory (`swe build`)")
    s.add_argument("--predictions", default=None, help="predictions .jsonl/.json, or gold, or empty")
    s.add_argument("--workspace", default=None, help="instead: the repository another agent worked on (`swe checkout`)")
    s.add_argument("--out", required=True, help="directory for report.json, the logs (and predictions.jsonl)")
    s.add_argument("--instances", default=None, help="comma list of instance ids (with --workspace: the one)")
    s.add_argument("--name", default="agent", help="model_name_or_path of a workspace's prediction")
    s.add_argument(ALLOW_FLAG, **allow)

    c = sub.add_parser("checkout", help="one task's repository at its base commit, for another agent")
    c.add_argument("--tasks", required=True, help="a task set directory (`swe build`)")
    c.add_argument("--instance", required=True, help="the instance id")
    c.add_argument("--out", required=True, help="the directory to write the repository to (must not exist)")

    p_ = sub.add_parser("report", help="several runs on the same tasks: resolved rates, paired differences")
    p_.add_argument("runs", nargs="+", help="run directories (`swe run --out`); the first is the reference")
    p_.add_argument("--out", default=None, help="write the report (Markdown) here too")
    p_.add_argument("--json", default=None, help="write the figures as JSON here")


def run(args: argparse.Namespace) -> int:
    actions = {"build": _build, "run": _run, "score": _score, "report": _report, "checkout": _checkout}
    return actions[args.action](args)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LoopcoderError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _shell(args: argparse.Namespace) -> SandboxShell:
    if not args.allow:
        raise CodeExecutionNotAllowedError()
    return SandboxShell(allow_code_execution=True)


def _build(args: argparse.Namespace) -> int:
    _positive(args, "per_module", "limit", "max_candidates", "workers")
    if args.pairs_per_module < 0:
        raise LoopcoderError(f"--pairs-per-module must be >= 0, got {args.pairs_per_module}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise LoopcoderError(f"--out {args.out!r} is not empty: choose a new directory, or pass --force to replace it")
    modules = catalog.select(args.modules)
    catalog.test_package_dir()  # a clear error before anything runs
    shell = _shell(args)
    config = taskset.BuildConfig(
        seed=args.seed,
        per_module=args.per_module,
        pairs_per_module=args.pairs_per_module,
        limit=args.limit,
        max_candidates=args.max_candidates,
        workers=args.workers,
    )
    manifest = taskset.build(out, modules, config, shell)
    print(
        f"wrote {manifest['tasks']} tasks over {manifest['modules_used']} modules to {args.out} "
        f"in {manifest['build']['seconds']:.0f}s (seed {args.seed}, Python {manifest['sandbox_python']})"
    )
    print("  bug kinds: " + ", ".join(f"{k} {v}" for k, v in manifest["by_kind"].items()))
    print("  difficulty: " + ", ".join(f"{k}: {v}" for k, v in manifest["by_difficulty"].items()))
    dropped = {k: v for k, v in manifest["build"].items() if k.startswith("dropped")}
    if dropped:
        print("  " + "; ".join(f"{k} {v}" for k, v in dropped.items()))
    return 0


def _select(instances: list[dict], ids: str | None, limit: int | None) -> list[dict]:
    if ids:
        wanted = [i.strip() for i in ids.split(",") if i.strip()]
        by_id = {t["instance_id"]: t for t in instances}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise LoopcoderError(f"--instances: the task set has no {missing[0]!r}")
        instances = [by_id[i] for i in dict.fromkeys(wanted)]
    return instances[:limit] if limit is not None else instances


def _tasks_identity(root: Path) -> str:
    # the file's own hash: the manifest's instances_sha256 when the set is as built, and still right if not
    return hashlib.sha256((root / "instances.jsonl").read_bytes()).hexdigest()


def _run(args: argparse.Namespace) -> int:
    # here: the agent's models and the runs import torch (a fast --help)
    from loopcoder.swe import report, runs
    from loopcoder.swe.chat import OpenAIChat

    _positive(args, "limit")
    if (args.model is None) == (args.endpoint is None):
        raise LoopcoderError("give --model DIR (the engine in this process) or --endpoint URL, not both")
    if args.endpoint and not args.served_model:
        raise LoopcoderError("--endpoint needs --served-model, the endpoint's model id")
    config = AgentConfig(
        protocol=args.protocol,
        max_turns=args.max_turns,
        max_tokens=args.max_tokens,
        max_seconds=args.max_seconds,
        max_new_tokens=args.max_new_tokens,
        command_timeout=args.command_timeout,
        seed=args.seed,
    ).check()
    root, instances = taskset.load(args.tasks)
    instances = _select(instances, args.instances, args.limit)
    shell = _shell(args)
    identity = {"tasks": _tasks_identity(root), "agent": asdict(config), "temperature": args.temperature}
    describe = {"tasks": str(root)}
    if args.model is not None:
        model = _engine_model(args, identity, describe)
    else:
        model = OpenAIChat(args.endpoint, args.served_model, args.api_key, args.temperature)
        identity.update({"endpoint": args.endpoint, "served_model": args.served_model})
    if args.name:
        model.name = args.name
    describe["name"] = model.name
    results = runs.run_agent(
        instances,
        root,
        model,
        config,
        shell,
        Path(args.out),
        identity,
        fresh=args.fresh,
        score=not args.no_score,
        describe=describe,
    )
    s = report.summarize(results)
    o = s["overall"]
    if o["n"]:
        low, high = o["ci95"]
        print(
            f"{model.name}: resolved {o['resolved']}/{o['n']} = {100 * o['rate']:.1f}% [{100 * low:.1f}, "
            f"{100 * high:.1f}]; exits " + ", ".join(f"{k} {v}" for k, v in s["exit_status"].items())
        )
    print(f"predictions: {Path(args.out) / 'predictions.jsonl'}")
    return 0


def _engine_model(args: argparse.Namespace, identity: dict, describe: dict) -> EngineChat:
    from loopcoder.evaluation.runner import config_hash
    from loopcoder.inference.engine import Engine
    from loopcoder.model.loading import load_for_inference
    from loopcoder.swe.chat import EngineChat
    from loopcoder.training.checkpoints import resolve_model_dir
    from loopcoder.utils.runtime import apply_threads

    model_dir = str(resolve_model_dir(args.model))
    apply_threads(args.threads)
    model, tokenizer = load_for_inference(model_dir, None, args.device, args.dtype)
    loops = model.config.plt_num_loops
    identity.update({"model": str(Path(model_dir).resolve()), "config_hash": config_hash(model_dir)})
    describe.update({"loops": loops, "architecture": model.config.loop_architecture, "model_dir": model_dir})
    engine = Engine(model, tokenizer, max_batch=1)
    return EngineChat(f"{Path(model_dir).name} (R={loops})", engine, tokenizer, args.temperature)


def _score(args: argparse.Namespace) -> int:
    from loopcoder.swe import runs

    root, instances = taskset.load(args.tasks)
    if (args.predictions is None) == (args.workspace is None):
        raise LoopcoderError("give --predictions FILE (or gold, or empty) or --workspace DIR, not both")
    shell = _shell(args)
    out = Path(args.out)
    if args.workspace is not None:
        chosen = _select(instances, args.instances, None) if args.instances else []
        if len(chosen) != 1:
            raise LoopcoderError("--workspace needs --instances ID, the one task the workspace holds")
        task = chosen[0]
        if not Path(args.workspace).is_dir():
            raise LoopcoderError(f"--workspace {args.workspace}: no such directory")
        patch, error = runs.workspace_patch(shell, Path(args.workspace).resolve(), task["base_commit"])
        if error:
            raise LoopcoderError(f"--workspace {args.workspace}: {error}")
        predictions = {task["instance_id"]: patch}
        row = {"instance_id": task["instance_id"], "model_name_or_path": args.name, "model_patch": patch}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "predictions.jsonl", json.dumps(row) + "\n")
    else:
        predictions = runs.read_predictions(args.predictions, instances)
        if args.instances:
            keep = {t["instance_id"] for t in _select(instances, args.instances, None)}
            predictions = {i: p for i, p in predictions.items() if i in keep}
    summary = runs.score_predictions(instances, root, predictions, shell, out)
    n = summary["submitted_instances"]
    print(
        f"resolved {summary['resolved_instances']}/{n}; completed {summary['completed_instances']}, empty patches "
        f"{summary['empty_patch_instances']}, errors {summary['error_instances']}; report: "
        f"{Path(args.out) / 'report.json'}"
    )
    return 0


def _checkout(args: argparse.Namespace) -> int:
    root, instances = taskset.load(args.tasks)
    task = _select(instances, args.instance, None)[0]
    out = Path(args.out)
    if out.exists():
        raise LoopcoderError(f"--out {args.out!r} exists: choose a new directory")
    repo.materialize(root / task["source_dir"], task, out)
    print(task["problem_statement"])
    return 0


def _report(args: argparse.Namespace) -> int:
    from loopcoder.swe import report  # numpy, for the intervals

    loaded = [report.load_run(r) for r in args.runs]
    text = report.markdown(loaded)
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
    if args.json:
        figures = {"runs": [report.summarize(r) for r in loaded], "paired": report.compare(loaded)}
        atomic_write_text(args.json, json.dumps(figures, indent=1))
    return 0
