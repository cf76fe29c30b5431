"""The evaluation tasks: HumanEval (sandboxed), code reasoning by difficulty, bits per byte.

Each task takes what is already done (for resuming) and a `save` callback that is called after
every chunk of finished problems, so an interrupted evaluation loses at most one chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from loopcoder.data import reasoning
from loopcoder.data.shards import ShardDataset
from loopcoder.data.shards import bits_per_byte as to_bpb
from loopcoder.evaluation import humaneval
from loopcoder.evaluation.generation import answer_nll, complete
from loopcoder.evaluation.passk import mean_pass_at_k
from loopcoder.evaluation.sandbox import isolation_report
from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.model.loading import chat_stop_ids
from loopcoder.model.modeling import causal_lm_loss
from loopcoder.utils.progress import Progress
from loopcoder.utils.stats import mean_ci, wilson_interval

Save = Callable[[], None]


@dataclass
class EvalSettings:
    n_samples: int = 1
    ks: tuple[int, ...] = (1,)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    prompt_style: str = "completion"  # resolved: "completion" (base model) or "chat" (instruction-tuned)
    humaneval_limit: int | None = None  # first N problems only
    file_limit: int | None = None  # first N problems of each benchmark file (humaneval+, mbpp+, ...)
    humaneval_max_new_tokens: int = 384
    reasoning_n: int = 50  # examples per difficulty
    reasoning_steps: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    reasoning_styles: tuple[str, ...] = ()  # extra styles beside the primary one, e.g. ("cruxeval",)
    reasoning_seed: int = 1234
    reasoning_family: str = "mixed"  # "mixed" programs, or "digits": one-digit modular arithmetic chains
    reasoning_max_new_tokens: int = 24
    bpb_rows: int | None = None
    workers: int | None = None
    chunk: int = 32  # problems per save
    extra: dict = field(default_factory=dict)

    def sampling(
        self,
        max_new_tokens: int,
        stop: list[str],
        stop_token_ids: list[int],
        sample: int,
        temperature: float | None = None,
    ) -> SamplingParams:
        temp = self.temperature if temperature is None else temperature
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temp,
            top_p=self.top_p,
            seed=self.seed + sample,
            stop=stop,
            stop_token_ids=stop_token_ids,
        )


def task_progress(name: str, completions: int) -> Progress:
    """One progress line for a whole task that runs in chunks (generation and sandbox time): its ETA covers
    every remaining completion, not the current chunk's."""
    return Progress(f"  {name}", completions, "completions", amount_unit="tokens", mode="lines")


# ----------------------------------------------------------------------------- HumanEval
def run_humaneval(
    engine: Engine, tokenizer: Any, s: EvalSettings, done: dict[str, Any], save: Save, allow_code_execution: bool
) -> dict[str, Any]:
    problems = humaneval.load_problems()[: s.humaneval_limit]
    chat = s.prompt_style == "chat"
    stops = [] if chat else list(humaneval.STOP_SEQUENCES)
    ids = chat_stop_ids(engine.eos_ids, tokenizer)
    per_problem: dict[str, Any] = done.setdefault("problems", {})
    todo = [p for p in problems if p["task_id"] not in per_problem]
    exec_seconds = 0.0
    programs = 0
    meter = task_progress("humaneval", len(todo) * s.n_samples)
    for start in range(0, len(todo), s.chunk):
        chunk = todo[start : start + s.chunk]
        prompts, params = [], []
        for p in chunk:
            prompt = humaneval.chat_messages(p) if chat else humaneval.completion_prompt(p)
            for i in range(s.n_samples):
                prompts.append(prompt)
                params.append(s.sampling(s.humaneval_max_new_tokens, stops, ids, i))
        outs = complete(engine, tokenizer, prompts, params, progress=meter)
        completions = {}
        for j, p in enumerate(chunk):
            texts = [o["text"] for o in outs[j * s.n_samples : (j + 1) * s.n_samples]]
            completions[p["task_id"]] = [humaneval.extract_code(t, p) if chat else humaneval.truncate(t) for t in texts]
        ev = humaneval.evaluate(chunk, completions, workers=s.workers, allow_code_execution=allow_code_execution)
        exec_seconds += ev.seconds
        programs += ev.programs
        for j, (p, o) in enumerate(zip(chunk, ev.outcomes)):
            gen = outs[j * s.n_samples : (j + 1) * s.n_samples]
            per_problem[p["task_id"]] = {
                "n": o.n,
                "c": o.c,
                "completions": completions[p["task_id"]],
                "statuses": [r.status for r in o.results],
                "finish_reasons": [g["finish_reason"] for g in gen],
                "skipped": next((g["skipped"] for g in gen if g["skipped"]), None),
            }
        save()
    if todo:
        meter.finish()
    counts = [(per_problem[p["task_id"]]["n"], per_problem[p["task_id"]]["c"]) for p in problems]
    passk = mean_pass_at_k(counts, s.ks)
    solved = sum(1 for n, c in counts if c > 0)
    done.update(
        {
            "problems_total": len(problems),
            "skipped_prompts": sum(1 for p in problems if per_problem[p["task_id"]]["skipped"]),
            "pass_at_k": {f"pass@{k}": v for k, v in passk.items()},
            "solved_any": solved,
            "sandbox": isolation_report(),
            "programs_per_second": programs / exec_seconds if exec_seconds else None,
        }
    )
    return done


# ----------------------------------------------------------------------------- code reasoning
def run_reasoning(engine: Engine, tokenizer: Any, s: EvalSettings, done: dict[str, Any], save: Save) -> dict[str, Any]:
    styles = [s.prompt_style] + [st for st in s.reasoning_styles if st != s.prompt_style]
    ids = chat_stop_ids(engine.eos_ids, tokenizer)
    by_style: dict[str, Any] = done.setdefault("styles", {})
    for style in styles:
        res = by_style.setdefault(style, {"examples": {}})
        for steps in s.reasoning_steps:
            key = str(steps)
            if key in res["examples"]:
                continue
            examples = reasoning.generate_examples(
                s.reasoning_n, steps, seed=s.reasoning_seed, split="eval", family=s.reasoning_family
            )
            prompts = [reasoning.format_prompt(ex, style) for ex in examples]
            stop = [] if style == "chat" else (["[/ANSWER]", "\n"] if style == "cruxeval" else ["\n"])
            params = [s.sampling(s.reasoning_max_new_tokens, stop, ids, 0, temperature=0.0) for _ in examples]
            outs = complete(engine, tokenizer, prompts, params, label=f"reasoning {style} steps={steps}")
            answers = [ex["answer"] if style != "cruxeval" else ex["answer_repr"] for ex in examples]
            nlls = answer_nll(engine.model, tokenizer, prompts, answers)
            res["examples"][key] = [
                {
                    "id": ex["id"],
                    "answer": ans,
                    "completion": o["text"],
                    "correct": bool(reasoning.is_correct(ex, o["text"], style)),
                    "answer_nll": nll,
                    "skipped": o["skipped"],
                }
                for ex, o, ans, nll in zip(examples, outs, answers, nlls)
            ]
            save()
        res["by_steps"] = {
            key: _accuracy(rows) for key, rows in sorted(res["examples"].items(), key=lambda kv: int(kv[0]))
        }
        res["overall"] = _accuracy([r for rows in res["examples"].values() for r in rows])
    done["primary_style"] = s.prompt_style
    done["family"] = s.reasoning_family
    return done


def _accuracy(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact-match accuracy with its Wilson interval, and the mean answer NLL, of some reasoning rows."""
    k = sum(r["correct"] for r in rows)
    return {
        "accuracy": k / len(rows) if rows else float("nan"),
        "correct": k,
        "n": len(rows),
        "ci95": list(wilson_interval(k, len(rows))),
        "answer_nll": _mean_ci_dict([r["answer_nll"] for r in rows]),
    }


# ----------------------------------------------------------------------------- bits per byte
@torch.inference_mode()
def bits_per_byte(
    model: Any,
    data_dir: str,
    batch_size: int = 8,
    max_rows: int | None = None,
    split: str = "validation",
    per_row: bool = False,
) -> dict[str, Any]:
    """Bits per UTF-8 byte of the model on a data directory's held-out split (every row, in order).
    With `per_row`, also each row's summed loss (nats) and byte count, for paired comparisons."""
    ds = ShardDataset(data_dir, split)
    device = next(model.parameters()).device
    row_nll: list[float] = []
    row_bytes: list[int] = []
    total = len(ds) if max_rows is None else min(len(ds), max_rows)
    meter = Progress("  bits per byte", total, "rows", amount_unit="tokens", mode="lines")
    for batch in ds.iter_batches(batch_size):
        ids = batch["input_ids"].to(device)
        if max_rows is not None and len(row_nll) >= max_rows:
            break
        if max_rows is not None:
            ids = ids[: max_rows - len(row_nll)]
        nll = causal_lm_loss(model(ids).logits, ids, reduction="none").view(ids.shape[0], -1).sum(-1)
        row_nll += nll.tolist()
        row_bytes += batch["target_bytes"][: ids.shape[0]].tolist()
        meter.update(len(row_nll), len(row_nll) * ds.seq_len)
    meter.finish()
    tokens = len(row_nll) * (ds.seq_len - 1)
    out = {
        "bits_per_byte": to_bpb(sum(row_nll), sum(row_bytes)),
        "loss": sum(row_nll) / max(tokens, 1),
        "tokens": tokens,
        "bytes": sum(row_bytes),
        "rows": len(row_nll),
        "split": split,
        "data": str(data_dir),
    }
    if per_row:
        out.update(row_nll=row_nll, row_bytes=row_bytes)
    return out


def _mean_ci_dict(values: list[float]) -> dict[str, Any]:
    mean, low, high, n = mean_ci(values)
    return {"mean": mean, "ci95": [low, high], "n": n}
