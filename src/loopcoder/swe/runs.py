"""`loopcoder swe run` and `swe score`: agent episodes over a task set, their predictions and scores.

A run directory holds:

- `results.json`: the run's identity (model, agent settings, task set) and, per instance, the episode's
  summary (exit status, turns, tokens, prefix-cache hits, times), the model's patch and its score;
- `predictions.jsonl`: `instance_id`, `model_name_or_path`, `model_patch` per line, what
  `python -m swebench.harness.run_evaluation --predictions_path` reads;
- `trajectories/<instance>.traj.json`: every message, command, output, timing and token count;
- `logs/<instance>.log`: the scoring run's log, in the official harness's layout.

Everything is written atomically after each instance, so a killed run resumes where it stopped: a
finished instance is not run again (one with a patch but no score yet is only scored), and an episode
that was cut short starts again from the base commit (its sampling is seeded, so it takes the same
turns). The workspace of an episode lives under the run directory and is deleted when it ends.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loopcoder.evaluation.runner import load_results
from loopcoder.evaluation.sandbox import isolation_report
from loopcoder.swe import repo, scoring
from loopcoder.swe.agent import AgentConfig, Episode
from loopcoder.swe.chat import ChatModel
from loopcoder.swe.shell import Shell
from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.progress import Progress

RESULTS_VERSION = 1  # loopcoder.evaluation.runner's results layout: version, identity, ...
PATCH_TIMEOUT_S = 60.0


def workspace_patch(shell: Shell, workspace: Path, base_commit: str) -> tuple[str | None, str | None]:
    """(the workspace's diff against the base commit, why there is none): `git diff` run in the sandbox,
    since the agent could have written anything into the repository's own git configuration."""
    command = (
        "git add -A >/dev/null 2>&1; "
        f"git diff --cached --no-color --no-ext-diff --no-textconv --no-renames {base_commit} --"
    )
    r = shell(command, workspace, timeout=PATCH_TIMEOUT_S)
    if r.status != "passed":
        return None, f"git diff failed ({r.status}: {(r.stderr.strip() or r.reason)[:200]})"
    if r.truncated:
        return None, "the diff is larger than the sandbox's output cap"
    return r.stdout, None


def run_episode(
    instance: dict[str, Any],
    root: Path,
    model: ChatModel,
    config: AgentConfig,
    shell: Shell,
    work: Path,
    trajectory_path: Path,
) -> dict[str, Any]:
    """One agent episode on a fresh checkout of the instance's base commit; its summary and patch."""
    workspace = repo.materialize(root / instance["source_dir"], instance, work / instance["instance_id"])

    def save(trajectory: dict[str, Any]) -> None:
        atomic_write_text(trajectory_path, json.dumps({"instance_id": instance["instance_id"], **trajectory}))

    try:
        episode = Episode(model, shell, workspace, instance["problem_statement"], config, save=save)
        episode.run()
        patch, error = workspace_patch(shell, workspace, instance["base_commit"])
        trajectory = episode.trajectory()
        trajectory["info"].update({"model_patch": patch, "patch_error": error})
        save(trajectory)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    info = trajectory["info"]
    keys = ("exit_status", "turns", "prompt_tokens", "completion_tokens", "cached_tokens", "seconds")
    keys += ("model_seconds", "command_seconds", "commands", "format_errors", "patch_error", "model_patch")
    return {k: info[k] for k in keys}


def write_predictions(path: Path, model_name: str, results: dict[str, Any]) -> None:
    rows = [
        {"instance_id": iid, "model_name_or_path": model_name, "model_patch": r["model_patch"]}
        for iid, r in results["instances"].items()
        if "model_patch" in r
    ]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def run_agent(
    instances: list[dict[str, Any]],
    root: Path,
    model: ChatModel,
    config: AgentConfig,
    shell: Shell,
    out: Path,
    identity: dict[str, Any],
    *,
    fresh: bool = False,
    score: bool = True,
    quiet: bool = False,
    describe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the agent on every instance (resuming `out`), score each patch, write the run directory."""
    path = out / "results.json"
    results = None if fresh else load_results(path, identity)
    if results is None:
        results = {"version": RESULTS_VERSION, "identity": identity, "instances": {}}
    results.update(describe or {})
    results.update({"model": model.name, "agent": asdict(config), "complete": False})
    (out / "trajectories").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    done: dict[str, Any] = results["instances"]

    def save() -> None:
        atomic_write_text(path, json.dumps(results, indent=1))
        write_predictions(out / "predictions.jsonl", model.name, results)

    def needed(t: dict[str, Any]) -> bool:
        entry = done.get(t["instance_id"], {})
        return "model_patch" not in entry or (score and "report" not in entry)

    todo = [t for t in instances if needed(t)]
    meter = Progress("swe run", len(instances), "tasks", start=len(instances) - len(todo), mode=_mode(quiet))
    for n, t in enumerate(todo, 1):
        iid = t["instance_id"]
        entry = done.get(iid, {})
        if "model_patch" not in entry:
            entry = run_episode(t, root, model, config, shell, out / "work", out / "trajectories" / f"{iid}.traj.json")
            entry["difficulty"] = t.get("difficulty")
            done[iid] = entry
            save()
        if score:
            entry["report"] = score_one(shell, root, t, entry["model_patch"], out / "logs" / f"{iid}.log")
            save()
        meter.update(len(instances) - len(todo) + n)
    meter.finish()
    shutil.rmtree(out / "work", ignore_errors=True)
    results["complete"] = True
    results["sandbox"] = isolation_report()
    save()
    return results


def score_one(shell: Shell, root: Path, instance: dict[str, Any], patch: str | None, log_path: Path) -> dict[str, Any]:
    report, log = scoring.score(shell, root / instance["source_dir"], instance, patch)
    atomic_write_text(log_path, log)
    return report


def score_predictions(
    instances: list[dict[str, Any]],
    root: Path,
    predictions: dict[str, str | None],
    shell: Shell,
    out: Path,
    *,
    quiet: bool = False,
) -> dict[str, Any]:
    """Score a predictions file (instance id -> patch) on its instances: per-instance reports and the totals
    of swebench's run report (completed: the tests ran; error: the patch did not apply, the tests timed out;
    empty patches are not run)."""
    by_id = {t["instance_id"]: t for t in instances}
    unknown = [i for i in predictions if i not in by_id]
    if unknown:
        raise LoopcoderError(f"the predictions name instance {unknown[0]!r}, which the task set does not have")
    reports: dict[str, Any] = {}
    meter = Progress("swe score", len(predictions), "predictions", mode=_mode(quiet))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for n, (iid, patch) in enumerate(predictions.items(), 1):
        reports[iid] = score_one(shell, root, by_id[iid], patch, out / "logs" / f"{iid}.log")
        meter.update(n)
    meter.finish()
    empty = {i for i, p in predictions.items() if not p}
    errors = {i for i, r in reports.items() if r["error"] in scoring.HARNESS_ERRORS}
    completed = set(reports) - empty - errors
    resolved = {i for i, r in reports.items() if r["resolved"]}
    submitted = set(predictions)
    summary = {  # swebench's make_run_report, the same fields and meanings
        "total_instances": len(instances),
        "submitted_instances": len(submitted),
        "completed_instances": len(completed),
        "resolved_instances": len(resolved),
        "unresolved_instances": len(completed - resolved),
        "empty_patch_instances": len(empty),
        "error_instances": len(errors),
        "completed_ids": sorted(completed),
        "incomplete_ids": sorted(set(by_id) - submitted),
        "empty_patch_ids": sorted(empty),
        "submitted_ids": sorted(submitted),
        "resolved_ids": sorted(resolved),
        "unresolved_ids": sorted(completed - resolved),
        "error_ids": sorted(errors),
        "schema_version": 2,
        "reports": reports,
    }
    atomic_write_text(out / "report.json", json.dumps(summary, indent=1))
    return summary


def read_predictions(path: str | Path, instances: list[dict[str, Any]]) -> dict[str, str | None]:
    """instance id -> model_patch from a predictions .jsonl (or .json, as swebench accepts); `gold` and
    `empty` are the task set's own patches and empty ones."""
    if str(path) == "gold":
        return {t["instance_id"]: t["patch"] for t in instances}
    if str(path) == "empty":
        return {t["instance_id"]: "" for t in instances}
    p = Path(path)
    if not p.is_file():
        raise LoopcoderError(f"--predictions {path}: no such file (or say gold or empty)")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
            rows = list(data.values()) if isinstance(data, dict) else data
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise LoopcoderError(f"{path}: not JSON lines ({e})") from None
    out: dict[str, str | None] = {}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("instance_id"), str):
            raise LoopcoderError(f"{path}: prediction {n} has no instance_id")
        patch = row.get("model_patch")
        if patch is not None and not isinstance(patch, str):
            raise LoopcoderError(f"{path}: the model_patch of {row['instance_id']} is not text")
        if row["instance_id"] in out:
            raise LoopcoderError(f"{path}: {row['instance_id']} is predicted twice")
        out[row["instance_id"]] = patch
    return out


def _mode(quiet: bool) -> str:
    return "off" if quiet else "lines"
