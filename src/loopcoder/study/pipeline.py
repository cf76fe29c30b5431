"""The loop-count study, stage by stage, each stage cached.

    data -> pretrain R=1..  -> sft R=1..  -> eval R=1..  -> cost R=1..  -> diagnostics -> report

Every stage writes `OUT/stages/NAME.json` when it finishes, with a key made of its settings and the
keys of the stages it reads. A stage whose marker has the right key is skipped, so re-running a study
only does what is missing. A stage that was interrupted continues: training resumes from its newest
checkpoint and evaluation from its results file. A stage whose settings changed starts over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loopcoder.atomic import atomic_write_text
from loopcoder.errors import LoopcoderError
from loopcoder.study.presets import StudyPreset


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
                return saved["result"]
            self.say(f"{name}: settings changed, starting it over")
            marker.unlink()
            if workdir is not None and workdir.exists():
                shutil.rmtree(workdir)
        self.say(f"{name}: running")
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        atomic_write_text(marker, json.dumps({"key": key, "seconds": seconds, "result": result}, indent=1,
                                             default=str) + "\n")
        self.say(f"{name}: finished in {seconds / 60:.1f} min")
        self.results[name] = result
        return result

    # ------------------------------------------------------------------ the stages
    def run(self) -> Path:
        p = self.p
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "preset.json", json.dumps(p.to_dict(), indent=1) + "\n")
        data = self.stage("data", [p.source, p.vocab_size, p.build_seq_len, p.family, p.reasoning_steps,
                                   p.pretrain_reasoning, p.sft_reasoning, p.instruction_max_tokens], self._data,
                          self.out / "data")
        for R in p.loops:
            self.stage(f"pretrain-R{R}", [self.keys["data"], p.train_preset, p.pretrain, R],
                       lambda R=R: self._pretrain(R, data), self.out / "runs" / f"pretrain-R{R}")
        for R in p.loops:
            self.stage(f"sft-R{R}", [self.keys[f"pretrain-R{R}"], p.train_preset, p.sft],
                       lambda R=R: self._sft(R, data), self.out / "runs" / f"sft-R{R}")
        for R in p.loops:
            self.stage(f"eval-R{R}", [self.keys[f"sft-R{R}"], p.family, p.eval_reasoning_n, p.eval_steps,
                                      p.humaneval_limit, p.humaneval_max_new_tokens, p.bpb_rows],
                       lambda R=R: self._eval(R, data), self.out / "eval" / f"R{R}")
        for R in p.loops:
            self.stage(f"cost-R{R}", [self.keys[f"sft-R{R}"], p.decode_context, p.decode_batches],
                       lambda R=R: self._cost(R))
        self.stage("diagnostics", [[self.keys[f"sft-R{R}"] for R in p.loops], p.diag_samples, p.diag_seq_len],
                   lambda: self._diagnostics(data))
        from loopcoder.study.report import write_study_report

        report = write_study_report(self)
        self.say(f"report: {report}")
        return report

    def model_dir(self, R: int) -> str:
        return self.results[f"sft-R{R}"]["final_checkpoint"]

    def _data(self) -> dict[str, Any]:
        from loopcoder.data import reasoning
        from loopcoder.data.build import BuildConfig, build
        from loopcoder.data.corpus import CorpusSpec
        from loopcoder.data.instructions import write_instruction_set

        p = self.p
        work = self.out / "data"
        work.mkdir(parents=True, exist_ok=True)
        self.say(f"data: {p.pretrain_reasoning} {p.family} programs for pretraining, {p.sft_reasoning} for SFT")
        def write(name: str, n: int, seed: int, record: Any, progress: bool = False) -> Path:
            examples = reasoning.generate_examples(n, p.reasoning_steps, seed=seed, split="train", family=p.family,
                                                   progress=progress)
            atomic_write_text(work / name, "".join(json.dumps(record(e)) + "\n" for e in examples))
            return work / name

        pre_file = write("reasoning-pretrain.jsonl", p.pretrain_reasoning, 1,
                         lambda e: {"text": reasoning.to_text(e)}, progress=True)
        chat_file = write("reasoning-sft.jsonl", p.sft_reasoning, 2,
                          lambda e: {"messages": reasoning.to_chat_messages(e)})
        # SFT validation: more train-split programs (the eval split stays unseen until evaluation)
        val_file = write("reasoning-sft-validation.jsonl", max(20, p.sft_reasoning // 10), 3,
                         lambda e: {"messages": reasoning.to_chat_messages(e)})
        built = work / "build"
        manifest = build(BuildConfig(corpus=CorpusSpec(sources=(p.source, str(pre_file))),
                                     vocab_size=p.vocab_size, seq_len=p.build_seq_len), built, log=self.log,
                         overwrite=True)  # the study's own directory: a rerun of this stage replaces it
        stats = write_instruction_set(built, max_tokens=p.instruction_max_tokens, log=self.log)
        return {"dir": str(built), "sft_reasoning": str(chat_file), "sft_validation": str(val_file),
                "manifest": _small_manifest(manifest),
                "instructions": stats}

    def _pretrain(self, R: int, data: dict[str, Any]) -> dict[str, Any]:
        from loopcoder.training import pretrain

        out = self.out / "runs" / f"pretrain-R{R}"
        overrides = {**self.p.pretrain, "data.dir": data["dir"], "model.loops": R, "out": str(out)}
        if self.p.device != "auto":
            overrides["train.device"] = self.p.device
        r = pretrain(self.p.train_preset, overrides, resume=True)
        return _train_result(r, out)

    def _sft(self, R: int, data: dict[str, Any]) -> dict[str, Any]:
        from loopcoder.training import sft

        out = self.out / "runs" / f"sft-R{R}"
        instructions = Path(data["dir"]) / "instructions"
        overrides = {**self.p.sft, "data.dir": data["dir"], "out": str(out),
                     "data.sft_train": [str(instructions / "train.jsonl"), data["sft_reasoning"]],
                     "data.sft_validation": [data["sft_validation"]]}
        if self.p.device != "auto":
            overrides["train.device"] = self.p.device
        r = sft(self.p.train_preset, init=self.results[f"pretrain-R{R}"]["final_checkpoint"], overrides=overrides,
                resume=True)
        return _train_result(r, out)

    def _eval(self, R: int, data: dict[str, Any]) -> dict[str, Any]:
        from loopcoder.evaluation.runner import evaluate
        from loopcoder.evaluation.tasks import EvalSettings

        p = self.p
        settings = EvalSettings(batch_size=p.batch_size, humaneval_limit=p.humaneval_limit,
                                humaneval_max_new_tokens=p.humaneval_max_new_tokens, reasoning_n=p.eval_reasoning_n,
                                reasoning_steps=tuple(p.eval_steps), reasoning_family=p.family, bpb_rows=p.bpb_rows)
        out = self.out / "eval" / f"R{R}" / "results.json"
        evaluate(self.model_dir(R), ["reasoning", "bpb", "humaneval"], settings, str(out),
                 data_dir=data["dir"], allow_code_execution=True, device=p.device, bpb_per_row=True)
        return {"results": str(out)}

    def _cost(self, R: int) -> dict[str, Any]:
        from loopcoder.bench.decode import DecodeBenchSettings, EngineTimer
        from loopcoder.runtime import load_for_inference

        p = self.p
        model, _ = load_for_inference(self.model_dir(R), device=p.device)
        s = DecodeBenchSettings(steps=8, rounds=2, warmup=2)
        out: dict[str, Any] = {"context": p.decode_context, "latency_ms": {}, "kv_bytes": {}}
        for batch in p.decode_batches:
            timer = EngineTimer(model, "parallel", batch, p.decode_context, s)
            for _ in range(s.rounds):
                timer.run(s.steps)
            res = timer.result()
            out["latency_ms"][str(batch)] = res["latency_s"] * 1e3
            out["kv_bytes"][str(batch)] = res["kv_bytes"]
        out["params"] = sum(t.numel() for t in model.parameters())
        out["kv_bytes_per_token_at_context"] = model.config.kv_cache_bytes(p.decode_context, 1, 2) / p.decode_context
        return out

    def _diagnostics(self, data: dict[str, Any]) -> dict[str, Any]:
        from loopcoder.diagnostics import diagnose, load_sequences, recommend, write_report
        from loopcoder.runtime import load_for_inference

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


def _small_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    stats = manifest.get("statistics", {})
    return {"content_hash": manifest.get("content_hash"), "splits": stats.get("splits", {}),
            "total": stats.get("total", {})}


def _train_result(r: Any, out: Path) -> dict[str, Any]:
    if r.final_checkpoint is None:
        raise LoopcoderError(f"training in {out} produced no checkpoint")
    return {"final_checkpoint": str(r.final_checkpoint), "run_dir": str(out), "step": r.step,
            "train_loss": r.train_loss, "val_loss": r.val_loss, "val_bpb": r.val_bpb, "tokens": r.tokens,
            "train_s": r.train_s}
