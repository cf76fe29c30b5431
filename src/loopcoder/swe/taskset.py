"""`loopcoder swe build`: the embedded SWE task set, made offline from the standard library and verified.

For each module of `catalog.MODULES`:

1. its files and tests are copied (the pristine sources) and the tests run once in the sandbox: the
   tests that pass are the ones a task may use;
2. mutation sites (`mutations.sites`) are tried in an order fixed by the seed, the kinds taking turns;
   a mutant becomes a task when some of those tests fail (FAIL_TO_PASS) and some still pass
   (PASS_TO_PASS). A few tasks combine two bugs (two lines; two files where the module has two);
3. the task's base commit is the mutant with its FAIL_TO_PASS tests removed from `tests/` (the
   `test_patch` puts them back, as SWE-bench's hidden tests); the gold `patch` undoes the mutation;
   the problem statement is written from the failing tests' output (`statement.py`);
4. every task is validated through the scoring path itself: the empty patch leaves every
   FAIL_TO_PASS test failing, the gold patch resolves it, twice with the same result, and a two-bug
   task is not resolved by either half of its gold patch. A task that fails any check is dropped.

Candidates are tried in batches of `workers` and accepted in order, so the set depends on the seed
and the interpreters, not on timing. The output directory holds `instances.jsonl` (SWE-bench records
plus loopcoder's fields), `sources/` (the pristine trees) and `manifest.json`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopcoder.data.corpus import iter_jsonl
from loopcoder.swe import catalog, repo, scoring, statement, testrun
from loopcoder.swe.catalog import SourceModule
from loopcoder.swe.mutations import KINDS, Mutation, sites
from loopcoder.swe.shell import Shell
from loopcoder.utils.atomic import atomic_directory, atomic_write_text
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.progress import Progress

TASKSET_VERSION = 1
REPO_OWNER = "python-stdlib"
CREATED_AT = "2000-01-01T00:00:00Z"  # fixed: the set is a function of its inputs, not of the day
CANDIDATE_TIMEOUT_S = 120.0
MIN_CANDIDATE_TIMEOUT_S = 15.0


@dataclass
class BuildConfig:
    seed: int = 0
    per_module: int = 8  # tasks per module
    pairs_per_module: int = 2  # of them, tasks with two bugs
    limit: int | None = None  # tasks in all (modules in catalog order until reached)
    max_candidates: int = 60  # mutants tried per module at most
    workers: int = 1
    python: str = "python3"  # the interpreter of the sandbox that runs the tests


@dataclass
class _Candidate:
    mutations: list[tuple[str, Mutation]]  # (file, mutation)
    files: dict[str, str]  # the mutated tree
    status: dict[str, str] = field(default_factory=dict)
    traces: dict[str, str] = field(default_factory=dict)
    load_errors: bool = False


def _slug(name: str) -> str:
    return name.replace(".", "-")


def pristine_tree(module: SourceModule) -> dict[str, str]:
    """The module's files and its tests, as a task repository lays them out."""
    lib, tests = catalog.stdlib_dir(), catalog.test_package_dir()
    tree = {rel: (lib / rel).read_text(encoding="utf-8") for rel in module.files}
    tree["tests/__init__.py"] = ""
    for name in module.tests:
        tree[f"tests/{name}"] = (tests / name).read_text(encoding="utf-8")
    return tree


def run_files(
    shell: Shell, files: dict[str, str], targets: list[str], python: str, timeout: float = CANDIDATE_TIMEOUT_S
) -> tuple[float, dict, dict, bool]:
    """Run test files (or ids) on a tree in the sandbox: (seconds, status map, tracebacks, load errors)."""
    with tempfile.TemporaryDirectory(prefix="loopcoder-swe-build-") as d:
        root = Path(d)
        repo.write_tree(root, files)
        result = shell(testrun.runner_command(str(root), targets, python), root, timeout=timeout)
        statuses = testrun.parse_status_map(result.stdout)
        load_errors = any(t in statuses for t in targets) or result.status not in ("passed", "failed")
        # the repository's path, whole or cut short in a message ("/tmp/loopcoder-swe-build-x1y2[192 chars]"),
        # out of the tracebacks: the statements do not depend on where the build ran
        place = re.compile(re.escape(str(root.parent)) + r"/loopcoder-swe-build-[A-Za-z0-9_]*/?")
        traces = {k: place.sub("", v) for k, v in testrun.parse_tracebacks(result.stdout).items()}
    return result.wall_seconds, statuses, traces, load_errors


def hide_tests(source: str, test_ids: list[str]) -> str | None:
    """`source` (a test file) without the methods of `test_ids`; None if one cannot be found in it."""
    tree = ast.parse(source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    spans: set[tuple[int, int]] = set()
    emptied: dict[str, ast.ClassDef] = {}
    for test in test_ids:
        parts = test.split("::")[1:]
        if len(parts) != 2 or parts[0] not in classes:
            return None
        method = _find_method(classes, parts[0], parts[1], set())
        if method is None:
            return None
        cls, node = method
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        spans.add((first, node.end_lineno))
        emptied[cls.name] = cls
    lines = source.splitlines(keepends=True)
    removed = {i for a, b in spans for i in range(a, b + 1)}
    for cls in emptied.values():  # a class left without statements needs one
        if all(i in removed for stmt in cls.body for i in range(stmt.lineno, stmt.end_lineno + 1)):
            last = max(b for a, b in spans if cls.lineno <= a <= cls.end_lineno)
            indent = lines[cls.body[0].lineno - 1][: cls.body[0].col_offset]
            lines[last - 1] = lines[last - 1] + f"{indent}pass\n"
            removed.discard(last)
            lines[last - 1] = f"{indent}pass\n"
    return "".join(line for i, line in enumerate(lines, 1) if i not in removed)


def _find_method(classes: dict[str, ast.ClassDef], cls: str, name: str, seen: set[str]):
    if cls in seen or cls not in classes:
        return None
    seen.add(cls)
    node = classes[cls]
    for stmt in node.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
            return node, stmt
    for base in node.bases:
        if isinstance(base, ast.Name):
            found = _find_method(classes, base.id, name, seen)
            if found is not None:
                return found
    return None


def _ordered_sites(module: SourceModule, tree: dict[str, str], rng: random.Random) -> list[tuple[str, Mutation]]:
    """Every site of the module's bug files, shuffled by the seed, the kinds and files taking turns."""
    queues = []  # one per (kind, file): every kind and every file comes up early
    for kind in KINDS:
        for rel in module.bug_files:
            found = [(rel, m) for m in sites(tree[rel]) if m.kind == kind]
            rng.shuffle(found)
            queues.append(found)
    out = []
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop())
    return out


def _apply(tree: dict[str, str], mutations: list[tuple[str, Mutation]]) -> dict[str, str]:
    files = dict(tree)
    # bottom-up within a file, so that a dropped line does not move the other mutation's line
    for rel, m in sorted(mutations, key=lambda x: (x[0], -x[1].line)):
        files[rel] = m.apply(files[rel])
    return files


class Builder:
    def __init__(self, shell: Shell, config: BuildConfig) -> None:
        self.shell = shell
        self.config = config
        self.pool = ThreadPoolExecutor(max(1, config.workers), thread_name_prefix="swe-build")
        self.counts: Counter[str] = Counter()
        self.timeout = CANDIDATE_TIMEOUT_S

    def map(self, fn: Callable, items: list) -> list:
        return list(self.pool.map(fn, items))

    def run_candidates(self, targets: list[str], cands: list[_Candidate]) -> None:
        """Run each candidate's tests; a mutant that loops for ever is stopped at `self.timeout`."""

        def run(c: _Candidate) -> None:
            _, c.status, c.traces, c.load_errors = run_files(
                self.shell, c.files, targets, self.config.python, self.timeout
            )

        self.map(run, cands)
        self.counts["test runs"] += len(cands)

    def module_tasks(self, module: SourceModule, quota: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        cfg = self.config
        tree = pristine_tree(module)
        targets = [f"tests/{t}" for t in module.tests]
        seconds, base_status, _, load_errors = run_files(self.shell, tree, targets, cfg.python)
        # a mutant may loop for ever: ten times the pristine run is plenty for one that does not
        self.timeout = min(CANDIDATE_TIMEOUT_S, max(MIN_CANDIDATE_TIMEOUT_S, 10 * seconds))
        eligible = sorted(t for t, s in base_status.items() if s == "PASSED")
        info: dict[str, Any] = {"tests": len(base_status), "eligible_tests": len(eligible), "tried": 0}
        if load_errors or not eligible:
            info["skipped"] = "its tests do not load or none passes in the sandbox"
            return [], info
        rng = random.Random(f"{cfg.seed}:{module.name}")
        order = _ordered_sites(module, tree, rng)
        info["sites"] = len(order)
        n_pairs = min(cfg.pairs_per_module, quota // 2)
        singles: list[_Candidate] = []
        seen: set[str] = set()
        pos = 0
        while pos < len(order) and info["tried"] < cfg.max_candidates and len(singles) < quota + n_pairs:
            batch = []
            while pos < len(order) and len(batch) < max(1, cfg.workers):
                rel, m = order[pos]
                pos += 1
                files = _apply(tree, [(rel, m)])
                key = hashlib.sha256(files[rel].encode()).hexdigest()
                if key not in seen:  # two sites can make the same mutant (`if x is None` negated, or `is not`)
                    seen.add(key)
                    batch.append(_Candidate([(rel, m)], files))
            info["tried"] += len(batch)
            self.run_candidates(targets, batch)
            singles += [c for c in batch if self._breaks_some(c, eligible)]
        pairs = self._pairs(module, singles[quota - n_pairs :], n_pairs)
        paired = {id(c) for pair in pairs for c in pair}
        chosen = [c for c in singles if id(c) not in paired][: quota - len(pairs)]
        combined = [_Candidate(a.mutations + b.mutations, _apply(tree, a.mutations + b.mutations)) for a, b in pairs]
        self.run_candidates(targets, combined)
        tasks = []
        for cand in chosen + [c for c in combined if self._breaks_some(c, eligible)]:
            task = self._task(module, tree, cand, eligible)
            if task is not None:
                tasks.append(task)
        info["built"] = len(tasks)
        return tasks, info

    @staticmethod
    def _breaks_some(c: _Candidate, eligible: list[str]) -> bool:
        if c.load_errors:
            return False
        failing = [t for t in eligible if c.status.get(t) != "PASSED"]
        return 0 < len(failing) < len(eligible)

    @staticmethod
    def _pairs(module: SourceModule, singles: list[_Candidate], n: int) -> list[tuple[_Candidate, _Candidate]]:
        """Pairs of working bugs on different lines (in different files where the module has two)."""
        out: list[tuple[_Candidate, _Candidate]] = []
        used: set[int] = set()
        for i, a in enumerate(singles):
            for b in singles[i + 1 :]:
                if len(out) >= n:
                    return out
                if id(a) in used or id(b) in used:
                    continue
                (fa, ma), (fb, mb) = a.mutations[0], b.mutations[0]
                if fa == fb and (len(module.bug_files) > 1 or abs(ma.line - mb.line) < 2):
                    continue  # one file per bug when there are two; else lines apart
                out.append((a, b))
                used.update((id(a), id(b)))
        return out

    def _task(
        self, module: SourceModule, tree: dict[str, str], cand: _Candidate, eligible: list[str]
    ) -> dict[str, Any] | None:
        """The task of a candidate (numbered once validated, by `build`); None when a failing test cannot be
        hidden."""
        f2p = [t for t in eligible if cand.status.get(t) != "PASSED"]
        p2p = [t for t in eligible if cand.status.get(t) == "PASSED"]
        base = dict(cand.files)
        for rel in sorted({t.split("::")[0] for t in f2p}):
            hidden = hide_tests(base[rel], [t for t in f2p if t.startswith(rel + "::")])
            if hidden is None:
                self.counts["dropped: a failing test could not be hidden"] += 1
                return None
            base[rel] = hidden
        bug_files = sorted({rel for rel, _ in cand.mutations})
        with_tests = {**base, **{rel: tree[rel] for rel in tree if rel.startswith("tests/")}}
        gold = repo.diff_trees(with_tests, {**with_tests, **{rel: tree[rel] for rel in bug_files}})
        test_patch = repo.diff_trees(base, with_tests)
        with tempfile.TemporaryDirectory(prefix="loopcoder-swe-base-") as d:
            repo.write_tree(Path(d), base)
            commit = repo.commit_tree(Path(d))
        lines = repo.changed_lines(gold)
        return {
            "instance_id": "",  # numbered after validation
            "repo": f"{REPO_OWNER}/{_slug(module.name)}",
            "base_commit": commit,
            "patch": gold,
            "test_patch": test_patch,
            "problem_statement": statement.problem_statement(
                module.name, [f"tests/{t}" for t in module.tests], f2p, cand.traces
            ),
            "hints_text": "",
            "created_at": CREATED_AT,
            "version": "",  # the sandbox interpreter's, set by `build`
            "FAIL_TO_PASS": json.dumps(f2p),
            "PASS_TO_PASS": json.dumps(p2p),
            "environment_setup_commit": commit,
            # loopcoder's fields
            "source_dir": f"sources/{_slug(module.name)}",
            "module": module.name,
            "bug_kinds": [m.kind for _, m in cand.mutations],
            "mutations": [{"file": rel, **m.to_dict()} for rel, m in cand.mutations],
            "difficulty": {"lines": lines, "files": len(bug_files)},
        }


def validate(shell: Shell, root: Path, instance: dict[str, Any], python: str = "python3") -> str | None:
    """Why the task fails validation (None: it passes): the empty patch must leave every FAIL_TO_PASS test
    failing and every PASS_TO_PASS test passing; the gold patch must resolve it twice with the same
    statuses; for two bugs, half of the gold patch must not resolve it."""
    sources = root / instance["source_dir"]
    empty_log = scoring.run_tests(shell, sources, instance, "", apply=False, python=python)
    status, found = scoring.logs_eval(empty_log)
    if not found:
        return "the base gives no test results"
    f2p, p2p = scoring.test_ids(instance, "FAIL_TO_PASS"), scoring.test_ids(instance, "PASS_TO_PASS")
    empty = scoring.tests_report(status, f2p, p2p)
    if empty["FAIL_TO_PASS"]["success"] or empty["PASS_TO_PASS"]["failure"]:
        return "the empty patch does not reproduce the bug's test results"
    runs = []
    for _ in range(2):
        log = scoring.run_tests(shell, sources, instance, instance["patch"], python=python)
        runs.append((scoring.instance_report(instance, instance["patch"], log), scoring.logs_eval(log)[0]))
    if not all(r["resolved"] for r, _ in runs):
        return "the gold patch does not resolve it"
    if runs[0][1] != runs[1][1]:
        return "the tests give different results on two runs (flaky)"
    for half in _half_patches(sources, instance):
        log = scoring.run_tests(shell, sources, instance, half, python=python)
        if scoring.instance_report(instance, half, log)["resolved"]:
            return "one of its two bugs alone is enough to fix (half of the gold patch resolves it)"
    return None


def _half_patches(sources: Path, instance: dict[str, Any]) -> list[str]:
    """For a task of two bugs, the two patches that each fix one of them."""
    muts = [(m["file"], Mutation(**{k: v for k, v in m.items() if k != "file"})) for m in instance["mutations"]]
    if len(muts) < 2:
        return []
    pristine = {k: v for k, v in repo.read_tree(sources).items() if not k.startswith("tests/")}
    both = _apply(pristine, muts)
    return [repo.diff_trees(both, _apply(pristine, [m for m in muts if m is not keep])) for keep in muts]


def _python_version(shell: Shell, python: str) -> str:
    with tempfile.TemporaryDirectory(prefix="loopcoder-swe-probe-") as d:
        r = shell(f"{python} -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'", Path(d), timeout=60)
    if r.status != "passed":
        raise LoopcoderError(f"{python} does not run in the sandbox: {(r.stderr or r.reason).strip()[:300]}")
    return r.stdout.strip()


def build(
    out: str | Path, modules: list[SourceModule], config: BuildConfig, shell: Shell, *, quiet: bool = False
) -> dict[str, Any]:
    """Build, validate and write the task set (atomically: `out` is replaced only by a complete set)."""
    t0 = time.perf_counter()
    version = _python_version(shell, config.python)
    progress = Progress("swe build", len(modules), "modules", mode="off" if quiet else "lines")
    builder = Builder(shell, config)
    manifest: dict[str, Any] = {
        "version": TASKSET_VERSION,
        "seed": config.seed,
        "per_module": config.per_module,
        "pairs_per_module": config.pairs_per_module,
        "sandbox_python": version,
        "source_python": sys.version.split()[0],
        "modules": {},
    }
    instances: list[dict[str, Any]] = []
    try:
        with atomic_directory(out) as tmp:
            for i, module in enumerate(modules):
                left = None if config.limit is None else config.limit - len(instances)
                if left is not None and left <= 0:
                    break
                quota = config.per_module if left is None else min(config.per_module, left)
                tasks, info = builder.module_tasks(module, quota)
                sources = tmp / "sources" / _slug(module.name)
                repo.write_tree(sources, pristine_tree(module))
                reasons = builder.map(lambda t, s=sources.parent.parent: validate(shell, s, t, config.python), tasks)
                builder.counts["validation runs"] += sum(3 + 2 * (len(t["mutations"]) > 1) for t in tasks)
                kept = []
                for task, why in zip(tasks, reasons):
                    if why is None:
                        kept.append(task)
                    else:
                        builder.counts[f"dropped: {why}"] += 1
                info["validated"] = len(kept)
                manifest["modules"][module.name] = info
                for n, task in enumerate(kept, 1):  # numbered after validation: no gaps
                    task["instance_id"] = f"{REPO_OWNER}__{_slug(module.name)}-{n}"
                    task["version"] = version
                instances += kept
                if not kept:
                    shutil.rmtree(sources)
                progress.update(i + 1)
            text = "".join(json.dumps(t, sort_keys=True) + "\n" for t in instances)
            atomic_write_text(tmp / "instances.jsonl", text)
            manifest.update(statistics(instances))
            manifest["instances_sha256"] = hashlib.sha256(text.encode()).hexdigest()
            manifest["build"] = {
                **dict(sorted(builder.counts.items())),
                "workers": config.workers,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    finally:
        builder.pool.shutdown()
        progress.finish()
    return manifest


def difficulty_label(difficulty: dict[str, Any] | None) -> str:
    """What a gold patch changes, as reports group tasks: "2 lines, 1 file"."""
    d = difficulty or {}
    lines, files = d.get("lines", 0), d.get("files", 0)
    return f"{lines} line{'s' * (lines != 1)}, {files} file{'s' * (files != 1)}"


def statistics(instances: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts a report or a manifest shows: tasks, modules, bug kinds, difficulty, test counts."""
    f2p = [len(scoring.test_ids(t, "FAIL_TO_PASS")) for t in instances]
    p2p = [len(scoring.test_ids(t, "PASS_TO_PASS")) for t in instances]
    return {
        "tasks": len(instances),
        "modules_used": len({t["module"] for t in instances}),
        "by_module": dict(sorted(Counter(t["module"] for t in instances).items())),
        "by_kind": dict(sorted(Counter(k for t in instances for k in t["bug_kinds"]).items())),
        "by_difficulty": dict(sorted(Counter(difficulty_label(t.get("difficulty")) for t in instances).items())),
        "fail_to_pass": _spread(f2p),
        "pass_to_pass": _spread(p2p),
    }


def _spread(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    return {"min": s[0], "median": s[len(s) // 2], "max": s[-1], "total": sum(s)}


def load(root: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """A built task set: its directory and instances (a clear error when it is not one)."""
    root = Path(root)
    path = root / "instances.jsonl"
    if not path.is_file():
        raise LoopcoderError(f"{root} is not a task set (no instances.jsonl): build one with `loopcoder swe build`")
    return root, list(read_jsonl(path))


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise LoopcoderError(f"{where}: not a JSON object")
        yield row
