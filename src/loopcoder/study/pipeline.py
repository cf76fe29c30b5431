"""The loop-count study, stage by stage, each stage cached.

    data -> [depth-MODEL-sSEED.., pretrain-R..] -> [sft-R..] -> depth-eval -> depth-cost -> depth-diagnostics
         -> eval-R.. -> cost-R.. -> diagnostics -> report

The training runs in brackets go through a pool of fresh processes, one per CPU with one thread each,
the costliest first: the models are small, and two one-thread runs side by side use two cores better
than one run with two threads (docs/study.md).

Every stage writes `OUT/stages/NAME.json` when it finishes, with a key made of its settings and the
keys of the stages it reads. A stage whose marker has the right key is skipped, so re-running a study
only does what is missing. A stage that was interrupted continues: training resumes from its newest
checkpoint and evaluation from its results file. A stage whose settings changed starts over.
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loopcoder.data import reasoning
from loopcoder.data.build import BuildConfig, build
from loopcoder.data.corpus import CorpusSpec
from loopcoder.data.instructions import write_instruction_set
from loopcoder.diagnostics import diagnose, load_sequences, recommend, write_report
from loopcoder.evaluation.runner import evaluate
from loopcoder.evaluation.tasks import EvalSettings
from loopcoder.model.checkpoint import load_model
from loopcoder.model.loading import load_for_inference
from loopcoder.study import depth as D
from loopcoder.study.cost import decode_latency
from loopcoder.study.presets import StudyPreset
from loopcoder.study.report import write_study_report
from loopcoder.training import pretrain, sft
from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.runtime import pick_device


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Study:
    def __init__(self, preset: StudyPreset, out: str | Path, log: Any = sys.stderr) -> None:
        self.p = preset
        self.out = Path(out)
        self.log = log
        self.keys: dict[str, str] = {}
        self.results: dict[str, Any] = {}
        self.started = time.perf_counter()

    # ------------------------------------------------------------------ stage machinery
    def say(self, text: str) -> None:
        el = time.perf_counter() - self.started
        print(f"[study {el / 60:5.1f} min] {text}", file=self.log, flush=True)

    def stage(self, name: str, key_parts: Any, fn: Callable[[], Any], workdir: Path | None = None) -> Any:
        """Run `fn` unless a finished marker with the same key exists; returns its (JSON) result."""
        if self.cached(name, key_parts, workdir):
            return self.results[name]
        self.say(f"{name}: running")
        t0 = time.perf_counter()
        return self.record(name, fn(), time.perf_counter() - t0)

    def cached(self, name: str, key_parts: Any, workdir: Path | None = None) -> bool:
        """Whether stage `name` finished earlier with these settings (its result is then loaded). A
        marker with other settings is removed, and with it the stage's `workdir`."""
        key = _key(key_parts)
        self.keys[name] = key
        marker = self.out / "stages" / f"{name}.json"
        if marker.is_file():
            try:
                saved = json.loads(marker.read_text())
            except (OSError, ValueError):
                saved = {}
            if saved.get("key") == key:
                self.say(f"{name}: done earlier, skipped")
                self.results[name] = saved["result"]
                return True
            self.say(f"{name}: settings changed, starting it over")
            marker.unlink()
            if workdir is not None and workdir.exists():
                shutil.rmtree(workdir)
        return False

    def record(self, name: str, result: Any, seconds: float) -> Any:
        marker = self.out / "stages" / f"{name}.json"
        atomic_write_text(
            marker,
            json.dumps({"key": self.keys[name], "seconds": seconds, "result": result}, indent=1, default=str) + "\n",
        )
        self.say(f"{name}: finished in {seconds / 60:.1f} min")
        self.results[name] = result
        return result

    # ------------------------------------------------------------------ the stages
    def run(self) -> Path:
        p = self.p
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "preset.json", json.dumps(p.to_dict(), indent=1, default=str) + "\n")
        data = None
        if p.loops:
            data = self.stage(
                "data",
                [
                    p.source,
                    p.vocab_size,
                    p.build_seq_len,
                    p.family,
                    p.reasoning_steps,
                    p.pretrain_reasoning,
                    p.sft_reasoning,
                    p.instruction_max_tokens,
                ],
                self._data,
                self.out / "data",
            )
        self.parallel(self._depth_jobs() + (self._pretrain_jobs(data) if data else []))
        if data:
            self.parallel(self._sft_jobs(data))
        if p.depth is not None:
            self._depth_stages()
        if data:
            self._code_stages(data)
        report = write_study_report(self)
        self.say(f"report: {report}")
        return report

    def parallel(self, jobs: list[Job]) -> None:
        """Run the jobs that have not finished yet, the costliest first, in a pool of fresh processes
        (one at a time, in this process, with a pool of one)."""
        todo = sorted((j for j in jobs if not self.cached(j.name, j.key_parts, j.workdir)), key=lambda j: -j.cost)
        if not todo:
            return
        workers = min(self.p.pool_size(), len(todo))
        self.say(f"training {len(todo)} runs, {workers} at a time: {', '.join(j.name for j in todo)}")
        if workers == 1:
            for j in todo:
                result = j.fn(*j.args)
                self.record(j.name, {**result, "pool_size": 1}, result["wall_s"])
            return
        ctx = multiprocessing.get_context("spawn")  # no forked torch state; the same on every OS
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            names = {pool.submit(j.fn, *j.args): j.name for j in todo}
            pending = set(names)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()  # a failed run raises here, finished ones are kept
                    # seconds: the run's own time, not its wait in the queue
                    self.record(names[future], {**result, "pool_size": workers}, result["wall_s"])

    # ------------------------------------------------------------------ the depth probe
    def _depth_jobs(self) -> list[Job]:
        s = self.p.depth
        if s is None:
            return []
        jobs = []
        for m in s.models:
            for seed in s.seeds:
                out = self.out / "runs" / "depth" / f"{m.key}-s{seed}"
                cfg = s.train_config(m, seed, str(out), self.p.device)
                parts = [D.task_of(s).to_dict(), cfg.to_dict(), s.seq_len, s.train_lengths, s.validation_rows]
                args = (s, m, seed, str(out), self.p.device)
                jobs.append(Job(f"depth-{m.key}-s{seed}", parts, out, D.train_run, args, _flops(cfg, s.seq_len)))
        return jobs

    def _depth_stages(self) -> None:
        s = self.p.depth
        train_keys = [self.keys[f"depth-{m.key}-s{seed}"] for m in s.models for seed in s.seeds]
        task = D.task_of(s)
        self.stage("depth-eval", [train_keys, task.to_dict(), s.eval_lengths, s.eval_items], self._depth_eval)
        self.stage(
            "depth-cost",
            [
                [self.keys[f"depth-{m.key}-s{s.seeds[0]}"] for m in s.models],
                s.decode_context,
                s.decode_steps,
                s.decode_rounds,
            ],
            self._depth_cost,
        )
        self.stage(
            "depth-diagnostics",
            [train_keys, s.diag_samples, s.seq_len],
            self._depth_diagnostics,
            self.out / "depth" / "diagnostics",
        )

    def _depth_eval(self) -> dict[str, Any]:
        s = self.p.depth
        task = D.task_of(s)
        out = self.out / "depth" / "eval"
        results = {}
        for m in s.models:
            for seed in s.seeds:
                model = load_model(D.model_path(self.results, m, seed), device=_device(self.p.device))
                path = out / f"{m.key}-s{seed}.json"
                atomic_write_text(path, json.dumps(D.evaluate(model, task, s.eval_lengths, s.eval_items)) + "\n")
                results[f"{m.key}-s{seed}"] = str(path)
        return {"files": results, "task": task.to_dict()}

    def _depth_cost(self) -> dict[str, Any]:
        s = self.p.depth
        models = {
            m.key: load_model(D.model_path(self.results, m, s.seeds[0]), device=_device(self.p.device))
            for m in s.models
        }
        out = decode_latency(models, s.decode_context, 1, s.decode_steps, s.decode_rounds)
        for key, model in models.items():
            out[key]["kv_bytes_per_sequence"] = model.config.kv_cache_bytes(s.decode_context, 1, 4)
            out[key]["params"] = sum(t.numel() for t in model.parameters())
        return out

    def _depth_diagnostics(self) -> dict[str, Any]:
        s = self.p.depth
        rows = D.diagnostic_rows(s)
        per_seed: dict[str, Any] = {}
        for seed in s.seeds:
            results = {}
            for m in s.models:
                path = D.model_path(self.results, m, seed)
                model = load_model(path, device=_device(self.p.device))
                results[m.key] = diagnose(model, rows, len(rows), name=m.name, source=str(path), progress=False)
            plt_family = [results[m.key] for m in s.models if m.architecture == "plt" and m.loop_offset]
            rec = recommend(plt_family) if plt_family else None
            entry: dict[str, Any] = {"recommendation": rec.to_dict() if rec else None, "verdicts": {}}
            for m in s.models:  # each model's own verdict (loops worth it), controls included
                if m.loops > 1:
                    entry["verdicts"][m.key] = recommend([results[m.key]]).per_model[m.name]
            if seed == s.seeds[0]:
                report = write_report(
                    list(results.values()), self.out / "depth" / "diagnostics", rec, plots=True, per_sample=False
                )
                entry["dir"] = str(report)
            per_seed[str(seed)] = entry
        return {"per_seed": per_seed}

    # ------------------------------------------------------------------ the code language model
    def _pretrain_jobs(self, data: dict[str, Any]) -> list[Job]:
        p = self.p
        jobs = []
        for R in p.loops:
            out = self.out / "runs" / f"pretrain-R{R}"
            cfg = copy.deepcopy(p.pretrain)
            cfg.data = replace(cfg.data, dir=data["dir"])
            cfg.model = replace(cfg.model, loops=R)
            cfg.out = str(out)
            jobs.append(
                Job(
                    f"pretrain-R{R}",
                    [self.keys["data"], p.pretrain.to_dict(), R],
                    out,
                    train_code_model,
                    (self._on_device(cfg), None),
                    _flops(cfg, cfg.data.seq_len or p.build_seq_len),
                )
            )
        return jobs

    def _sft_jobs(self, data: dict[str, Any]) -> list[Job]:
        p = self.p
        instructions = Path(data["dir"]) / "instructions"
        train = [str(instructions / "train.jsonl")] + ([data["sft_reasoning"]] if "sft_reasoning" in data else [])
        validation = [data["sft_validation"]] if "sft_validation" in data else []
        jobs = []
        for R in p.loops:
            out = self.out / "runs" / f"sft-R{R}"
            cfg = copy.deepcopy(p.sft)
            cfg.data = replace(cfg.data, dir=data["dir"], sft_train=train, sft_validation=validation)
            cfg.out = str(out)
            init = self.results[f"pretrain-R{R}"]["final_checkpoint"]
            cost = _flops(replace(cfg, model=replace(cfg.model, loops=R)), cfg.data.seq_len or p.build_seq_len)
            jobs.append(
                Job(
                    f"sft-R{R}",
                    [self.keys[f"pretrain-R{R}"], p.sft.to_dict()],
                    out,
                    train_code_model,
                    (self._on_device(cfg), init),
                    cost,
                )
            )
        return jobs

    def _code_stages(self, data: dict[str, Any]) -> None:
        p = self.p
        for R in p.loops:
            self.stage(
                f"eval-R{R}",
                [
                    self.keys[f"sft-R{R}"],
                    p.family,
                    p.eval_reasoning_n,
                    p.eval_steps,
                    p.humaneval_limit,
                    p.humaneval_max_new_tokens,
                    p.bpb_rows,
                ],
                lambda R=R: self._eval(R, data),
                self.out / "eval" / f"R{R}",
            )
        for R in p.loops:
            self.stage(
                f"cost-R{R}", [self.keys[f"sft-R{R}"], p.decode_context, p.decode_batches], lambda R=R: self._cost(R)
            )
        self.stage(
            "diagnostics",
            [[self.keys[f"sft-R{R}"] for R in p.loops], p.diag_samples, p.diag_seq_len],
            lambda: self._diagnostics(data),
        )

    def model_dir(self, R: int) -> str:
        return self.results[f"sft-R{R}"]["final_checkpoint"]

    def _data(self) -> dict[str, Any]:
        p = self.p
        work = self.out / "data"
        work.mkdir(parents=True, exist_ok=True)

        def write(name: str, n: int, seed: int, record: Any, progress: bool = False) -> str:
            examples = reasoning.generate_examples(
                n, p.reasoning_steps, seed=seed, split="train", family=p.family, progress=progress
            )
            atomic_write_text(work / name, "".join(json.dumps(record(e)) + "\n" for e in examples))
            return str(work / name)

        sources, sft_files = [p.source], {}
        if p.pretrain_reasoning:
            self.say(f"data: {p.pretrain_reasoning} {p.family} programs for pretraining")
            sources.append(
                write(
                    "reasoning-pretrain.jsonl",
                    p.pretrain_reasoning,
                    1,
                    lambda e: {"text": reasoning.to_text(e)},
                    progress=True,
                )
            )
        if p.sft_reasoning:
            self.say(f"data: {p.sft_reasoning} {p.family} programs for instruction tuning")
            sft_files["sft_reasoning"] = write(
                "reasoning-sft.jsonl", p.sft_reasoning, 2, lambda e: {"messages": reasoning.to_chat_messages(e)}
            )
            # SFT validation: more train-split programs (the eval split stays unseen until evaluation)
            sft_files["sft_validation"] = write(
                "reasoning-sft-validation.jsonl",
                max(20, p.sft_reasoning // 10),
                3,
                lambda e: {"messages": reasoning.to_chat_messages(e)},
            )
        built = work / "build"
        manifest = build(
            BuildConfig(corpus=CorpusSpec(sources=tuple(sources)), vocab_size=p.vocab_size, seq_len=p.build_seq_len),
            built,
            log=self.log,
            overwrite=True,
        )  # the study's own directory: a rerun of this stage replaces it
        stats = write_instruction_set(built, max_tokens=p.instruction_max_tokens, log=self.log)
        return {"dir": str(built), **sft_files, "manifest": _small_manifest(manifest), "instructions": stats}

    def _on_device(self, cfg: Any) -> Any:
        if self.p.device != "auto":
            cfg.train = replace(cfg.train, device=self.p.device)
        return cfg

    def _eval(self, R: int, data: dict[str, Any]) -> dict[str, Any]:
        p = self.p
        settings = EvalSettings(
            batch_size=p.batch_size,
            humaneval_limit=p.humaneval_limit,
            humaneval_max_new_tokens=p.humaneval_max_new_tokens,
            reasoning_n=p.eval_reasoning_n,
            reasoning_steps=tuple(p.eval_steps),
            reasoning_family=p.family,
            bpb_rows=p.bpb_rows,
        )
        out = self.out / "eval" / f"R{R}" / "results.json"
        tasks = ["reasoning", "bpb", "humaneval"] if p.reasoning else ["bpb", "humaneval"]
        evaluate(
            self.model_dir(R),
            tasks,
            settings,
            str(out),
            data_dir=data["dir"],
            allow_code_execution=True,
            device=p.device,
            bpb_per_row=True,
        )
        return {"results": str(out)}

    def _cost(self, R: int) -> dict[str, Any]:
        p = self.p
        out: dict[str, Any] = {"context": p.decode_context, "latency_ms": {}, "kv_bytes": {}}
        for batch in p.decode_batches:
            model = load_model(self.model_dir(R), device=_device(p.device))  # the engine fuses its weights
            res = decode_latency({"model": model}, p.decode_context, batch, steps=8, rounds=2, threads=None)["model"]
            out["latency_ms"][str(batch)] = res["latency_s"] * 1e3
            out["kv_bytes"][str(batch)] = model.config.kv_cache_bytes(p.decode_context, batch, 4)
        out["params"] = sum(t.numel() for t in model.parameters())
        out["kv_bytes_per_token_at_context"] = model.config.kv_cache_bytes(p.decode_context, 1, 2) / p.decode_context
        return out

    def _diagnostics(self, data: dict[str, Any]) -> dict[str, Any]:
        p = self.p
        # a data directory holds token ids: the same samples for every model, read once
        seqs = load_sequences(data["dir"], None, seq_len=p.diag_seq_len, samples=p.diag_samples)
        results = []
        for R in p.loops:
            model, _ = load_for_inference(self.model_dir(R), device=p.device)
            results.append(diagnose(model, seqs, p.diag_samples, name=f"R={R}", source=self.model_dir(R)))
        rec = recommend(results)
        out = write_report(results, self.out / "diagnostics", rec, plots=True, per_sample=False)
        return {"dir": str(out), "recommendation": rec.to_dict()}


@dataclass
class Job:
    """A training run for `Study.parallel`: a stage whose work is `fn(*args)` (module-level, so that a
    pool process can run it), returning a JSON-able dict with its own "wall_s"."""

    name: str
    key_parts: Any
    workdir: Path
    fn: Callable[..., dict[str, Any]]
    args: tuple
    cost: float  # relative, to start the longest runs first


def _flops(cfg: Any, seq_len: int) -> float:
    """A run's training cost, up to a constant: tokens x loops x layers x width^2."""
    m = cfg.model
    return float(cfg.train.steps * cfg.train.global_batch_size * seq_len * m.loops * m.layers * m.hidden_size**2)


def train_code_model(cfg: Any, init: str | None) -> dict[str, Any]:
    """Pretrain (init None) or instruction-tune a code model, resuming an interrupted run; a pool job."""
    t0 = time.perf_counter()
    r = pretrain(cfg, resume=True) if init is None else sft(cfg, init=init, resume=True)
    return {**_train_result(r, Path(cfg.out)), "wall_s": time.perf_counter() - t0}


def _device(device: str) -> str:
    return str(pick_device(device))


def _small_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    stats = manifest.get("statistics", {})
    return {
        "content_hash": manifest.get("content_hash"),
        "splits": stats.get("splits", {}),
        "total": stats.get("total", {}),
    }


def _train_result(r: Any, out: Path) -> dict[str, Any]:
    if r.final_checkpoint is None:
        raise LoopcoderError(f"training in {out} produced no checkpoint")
    return {
        "final_checkpoint": str(r.final_checkpoint),
        "run_dir": str(out),
        "step": r.step,
        "train_loss": r.train_loss,
        "val_loss": r.val_loss,
        "val_bpb": r.val_bpb,
        "tokens": r.tokens,
        "train_s": r.train_s,
    }
