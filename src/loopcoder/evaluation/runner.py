"""`loopcoder eval`: run the tasks on one model, write a resumable results JSON and print a table."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers

import loopcoder
from loopcoder.evaluation.file_tasks import TASKS as FILE_TASK_SPECS
from loopcoder.evaluation.file_tasks import run_file_task
from loopcoder.evaluation.tasks import EvalSettings, bits_per_byte, run_humaneval, run_reasoning
from loopcoder.inference.engine import Engine
from loopcoder.model.loading import check_tokenizer, load_for_inference
from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.errors import LoopcoderError

BUILTIN_TASKS = ("humaneval", "reasoning", "bpb")
FILE_TASKS = tuple(FILE_TASK_SPECS)  # humaneval+, mbpp+, cruxeval-o/-i, lcb-codegen, lcb-execution
TASKS = BUILTIN_TASKS + FILE_TASKS
CODE_RUNNING = ("humaneval", *FILE_TASKS)
RESULTS_VERSION = 1


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise LoopcoderError(
            f"unknown task {unknown[0]!r}: choose from {', '.join(TASKS)}"
            if unknown
            else f"no tasks given: choose from {', '.join(TASKS)}"
        )
    return tasks


def config_hash(model_dir: str) -> str:
    """sha256 of the model's config.json and weight index: what identifies the evaluated checkpoint."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for name in ("config.json", "model.safetensors.index.json"):
        if (root / name).is_file():
            h.update((root / name).read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def data_index_hash(data_dir: str) -> str:
    """sha256 of a data directory's index.json: a rebuilt directory (other shards, another tokenizer) differs."""
    return hashlib.sha256((Path(data_dir) / "index.json").read_bytes()).hexdigest()[:16]


def bpb_is_cached(done: dict[str, Any], data_dir: str, per_row: bool) -> bool:
    """Bits per byte measured by an earlier run of this evaluation on the same data (its rows and model are
    part of the results' identity), with the per-row values when they are asked for."""
    return (
        "bits_per_byte" in done
        and done.get("data") == str(data_dir)
        and done.get("data_index") == data_index_hash(data_dir)
        and (not per_row or "row_nll" in done)
    )


def file_hash(path: str) -> str:
    """sha256 of a benchmark file: a resumed run must score the same problems."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def detect_prompt_style(model_dir: str, tokenizer: Any) -> str:
    """Instruction-tuned checkpoints (a training checkpoint whose `checkpoint.json` says stage "sft") get the
    chat template, everything else completion prompts."""
    marker = Path(model_dir) / "checkpoint.json"
    stage = None
    if marker.is_file():
        try:
            stage = json.loads(marker.read_text()).get("stage")
        except (OSError, ValueError):
            stage = None
    return "chat" if stage == "sft" and getattr(tokenizer, "chat_template", None) else "completion"


def load_results(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Earlier results to resume from, if they were made with the same model and settings."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoopcoderError(
            f"cannot resume from {path}: not a valid results file ({e}); pass --fresh to start over"
        ) from None
    if not isinstance(data, dict) or data.get("version") != RESULTS_VERSION or "identity" not in data:
        raise LoopcoderError(f"cannot resume from {path}: not a loopcoder results file; pass --fresh to start over")
    changed = differences(data["identity"], identity)
    if changed:
        raise LoopcoderError(
            f"cannot resume from {path}: it was made with other settings ({'; '.join(changed)}); "
            "pass --fresh to start over, or another --out"
        )
    return data


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'key old -> new' for every value that differs, nested dicts flattened (the scoring settings by their own
    names: `temperature 0.0 -> 0.8`, not the whole dict)."""
    out = []
    for key in sorted({*old, *new}, key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, "" if key == "settings" else f"{prefix}{key}.")
        elif a != b:
            out.append(
                f"{prefix}{key} {'(none)' if key not in old else repr(a)} -> {'(none)' if key not in new else repr(b)}"
            )
    return out


def parse_data(values: list[str] | None) -> tuple[str | None, dict[str, str]]:
    """`--data` values: a data directory (for bpb) and/or TASK=FILE for the file benchmarks."""
    data_dir, data_files = None, {}
    for value in values or []:
        task, sep, path = value.partition("=")
        if sep and task in TASKS:
            if task not in FILE_TASKS:
                raise LoopcoderError(f"--data {value!r}: {task} reads no file (file tasks: {', '.join(FILE_TASKS)})")
            data_files[task] = path
        elif data_dir is not None:
            raise LoopcoderError(f"--data {value!r}: a second data directory (give TASK=FILE for a benchmark file)")
        else:
            data_dir = value
    return data_dir, data_files


def evaluate(
    model_dir: str,
    tasks: list[str],
    settings: EvalSettings,
    out: str,
    *,
    data_dir: str | None = None,
    allow_code_execution: bool = False,
    fresh: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    prompt_style: str = "auto",
    tokenizer_dir: str | None = None,
    bpb_per_row: bool = False,
    data_files: dict[str, str] | None = None,
    allow_tokenizer_mismatch: bool = False,
) -> dict[str, Any]:
    data_files = dict(data_files or {})
    running = [t for t in tasks if t in CODE_RUNNING]
    if running and not allow_code_execution:
        raise LoopcoderError(
            f"{running[0]} runs model-written code: pass --allow-code-execution to allow it "
            "(it runs in the sandbox, see docs/sandbox.md)"
        )
    for task in tasks:
        if task in FILE_TASKS and task not in data_files:
            raise LoopcoderError(
                f"{task} reads its problems from a file: pass --data {task}=FILE "
                f"({FILE_TASK_SPECS[task].source}; docs/evaluation.md says where to get it)"
            )
        if task in data_files and not Path(data_files[task]).is_file():
            raise LoopcoderError(f"--data {task}={data_files[task]}: no such file")
    if "bpb" in tasks and not data_dir:
        raise LoopcoderError("the bpb task needs --data DIR (a directory from `loopcoder data build`)")
    if "bpb" in tasks and not (Path(data_dir) / "index.json").is_file():
        raise LoopcoderError(f"--data {data_dir!r} is not a data directory (no index.json)")
    if settings.n_samples < 1:
        raise LoopcoderError(f"--n-samples must be >= 1, got {settings.n_samples}")
    too_big = [k for k in settings.ks if k > settings.n_samples or k < 1]
    if too_big:
        raise LoopcoderError(f"pass@{too_big[0]} needs k in [1, n-samples={settings.n_samples}]")
    model, tokenizer = load_for_inference(model_dir, tokenizer_dir, device, dtype, allow_tokenizer_mismatch)
    if "bpb" in tasks:  # bits per byte of the data directory's token ids: they must be the model's
        check_tokenizer(model_dir, data_dir, allow_tokenizer_mismatch, "the data directory")
    settings.prompt_style = detect_prompt_style(model_dir, tokenizer) if prompt_style == "auto" else prompt_style
    if settings.prompt_style not in ("completion", "chat"):
        raise LoopcoderError(f"--prompt-style must be auto, completion or chat, got {prompt_style!r}")
    # what the scores depend on (not batch size, workers or chunking), checked before resuming
    scored = {k: v for k, v in asdict(settings).items() if k not in ("batch_size", "workers", "chunk")}
    identity = {
        "model": str(Path(model_dir).resolve()),
        "config_hash": config_hash(model_dir),
        "settings": json.loads(json.dumps(scored)),
        **(
            {"data_files": {t: file_hash(f) for t, f in sorted(data_files.items()) if t in tasks}}
            if any(t in data_files for t in tasks)
            else {}
        ),
    }
    path = Path(out)
    results = None if fresh else load_results(path, identity)
    if results is None:
        results = {"version": RESULTS_VERSION, "identity": identity, "tasks": {}, "timings": {}}
    results.update(
        {
            "model": str(model_dir),
            "loops": model.config.plt_num_loops,
            "architecture": model.config.loop_architecture,
            "prompt_style": settings.prompt_style,
            "sampling": {
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "n_samples": settings.n_samples,
                "seed": settings.seed,
                "ks": list(settings.ks),
            },
            "versions": _versions(),
            "device": str(next(model.parameters()).device),
        }
    )

    def save() -> None:
        atomic_write_text(path, json.dumps(results, indent=1, default=str))

    engine = Engine(model, tokenizer, max_batch=settings.batch_size)
    for task in tasks:
        t0 = time.perf_counter()
        done = results["tasks"].setdefault(task, {})
        if task == "bpb":  # one pass with nothing to resume inside it: kept when the data is the same
            if bpb_is_cached(done, data_dir, bpb_per_row):
                print(f"  bits per byte: {done['bits_per_byte']:.4f}, from {path} (same data)", file=sys.stderr)
                continue
            batch = max(1, min(settings.batch_size, 8))
            measured = bits_per_byte(model, data_dir, batch_size=batch, max_rows=settings.bpb_rows, per_row=bpb_per_row)
            done.clear()
            done.update(measured, data_index=data_index_hash(data_dir))
            results["timings"][task] = time.perf_counter() - t0  # that pass's time, not a sum over runs
        else:
            if task == "humaneval":
                run_humaneval(engine, tokenizer, settings, done, save, allow_code_execution)
            elif task == "reasoning":
                run_reasoning(engine, tokenizer, settings, done, save)
            else:
                spec = FILE_TASK_SPECS[task]
                run_file_task(engine, tokenizer, settings, done, save, allow_code_execution, spec, data_files[task])
            results["timings"][task] = results["timings"].get(task, 0.0) + time.perf_counter() - t0  # resumed: summed
        save()
    results["complete"] = True
    save()
    return results


def summary_table(results: dict[str, Any]) -> str:
    lines = [
        f"model {results['model']} (R={results['loops']}, {results['architecture']}, {results['prompt_style']} prompts)"
    ]
    tasks = results["tasks"]
    if "humaneval" in tasks:
        he = tasks["humaneval"]
        scores = ", ".join(f"{k} {100 * v:.1f}%" for k, v in he["pass_at_k"].items())
        lines.append(
            f"  humaneval: {scores} over {he['problems_total']} problems "
            f"({he['skipped_prompts']} prompts too long), {results['timings']['humaneval']:.0f}s"
        )
    if "reasoning" in tasks:
        for style, res in tasks["reasoning"]["styles"].items():
            per = "  ".join(f"{k}:{100 * v['accuracy']:.0f}%" for k, v in res["by_steps"].items())
            o = res["overall"]
            lines.append(
                f"  reasoning ({style}): {100 * o['accuracy']:.1f}% "
                f"[{100 * o['ci95'][0]:.1f}, {100 * o['ci95'][1]:.1f}] of {o['n']}; by steps {per}"
            )
    for name in FILE_TASKS:
        if name in tasks:
            res = tasks[name]
            scores = "; ".join(
                f"{v} " + ", ".join(f"{k} {100 * x:.1f}%" for k, x in ks.items()) for v, ks in res["pass_at_k"].items()
            )
            lines.append(
                f"  {name}: {scores} over {res['problems_total']} problems "
                f"({res['skipped_prompts']} prompts too long), {results['timings'][name]:.0f}s"
            )
    if "bpb" in tasks:
        b = tasks["bpb"]
        lines.append(f"  bits per byte: {b['bits_per_byte']:.4f} (loss {b['loss']:.4f} nats/token, {b['rows']} rows)")
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    return {
        "loopcoder": loopcoder.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
