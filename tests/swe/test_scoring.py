"""Scoring means what SWE-bench's harness means: the same log reading, test-status rules, resolution
and report fields as `swebench.harness.grading` on the same logs; and scoring a built task in the
sandbox: gold resolves, a patch that breaks a test or touches only the tests does not, a patch that
does not apply or loops for ever is an error."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from loopcoder.swe import repo, scoring

grading = pytest.importorskip("swebench.harness.grading", reason="swebench (dev extra)")
swebench_types = pytest.importorskip("swebench.types", reason="swebench (dev extra)")

F2P = ["tests/test_m.py::T::test_bug", "tests/test_m.py::T::test_bug2"]
P2P = ["tests/test_m.py::T::test_ok", "tests/test_m.py::T::test_ok2"]
INSTANCE = {"instance_id": "x__y-1", "FAIL_TO_PASS": json.dumps(F2P), "PASS_TO_PASS": json.dumps(P2P)}


def log(lines: list[str], exit_code: int = 1, head: str = scoring.APPLY_PATCH_PASS) -> str:
    body = "\n".join(lines)
    return (
        f"{head}\n{scoring.START_TEST_OUTPUT}\n{body}\nran {len(lines)} tests\n{scoring.END_TEST_OUTPUT}\n"
        f"{scoring.TEST_EXIT_CODE}: {exit_code}\n"
    )


def statuses(**by_test: str) -> list[str]:
    names = {"bug": F2P[0], "bug2": F2P[1], "ok": P2P[0], "ok2": P2P[1]}
    return [f"{status} {names[k]}" for k, status in by_test.items()]


CASES = {
    "resolved": log(statuses(bug="PASSED", bug2="PASSED", ok="PASSED", ok2="PASSED"), 0),
    "xfail counts as passing": log(statuses(bug="XFAIL", bug2="PASSED", ok="PASSED", ok2="PASSED"), 0),
    "a skipped pass-to-pass test is kept": log(statuses(bug="PASSED", bug2="PASSED", ok="SKIPPED", ok2="PASSED"), 0),
    "a skipped fail-to-pass test is not fixed": log(statuses(bug="SKIPPED", bug2="PASSED", ok="PASSED", ok2="PASSED")),
    "partly fixed": log(statuses(bug="FAILED", bug2="PASSED", ok="PASSED", ok2="PASSED")),
    "a test broken on the way": log(statuses(bug="PASSED", bug2="PASSED", ok="ERROR", ok2="PASSED")),
    "a missing test fails": log(statuses(bug="PASSED", ok="PASSED", ok2="PASSED")),
    "nothing fixed": log(statuses(bug="FAILED", bug2="ERROR", ok="PASSED", ok2="PASSED")),
    "the patch does not apply": f"error: patch failed\n{scoring.APPLY_PATCH_FAIL}\n",
    "timed out": log(statuses(bug="PASSED"), 0) + f"\n{scoring.TESTS_TIMEOUT}\n",
    "no test output": f"{scoring.APPLY_PATCH_PASS}\nTraceback: the runner crashed\n",
    "no test ran": log([], 2),
    "exit status against the lines": log(statuses(bug="PASSED", bug2="PASSED", ok="PASSED", ok2="PASSED"), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_report_is_swebenchs(case, tmp_path):
    text = CASES[case]
    path = tmp_path / "test_output.txt"
    path.write_text(text)
    spec = swebench_types.TestSpec(
        instance_id="x__y-1",
        image="",
        eval_script_list=[],
        repo="x/y",
        version="3.11",
        FAIL_TO_PASS=F2P,
        PASS_TO_PASS=P2P,
        log_parser="parse_log_pytest",
        eval_type="pass_and_fail",
    )
    prediction = {"instance_id": "x__y-1", "model_name_or_path": "m", "model_patch": "diff --git a/m.py b/m.py\n"}
    theirs = grading.get_eval_report(spec, prediction, str(path), include_tests_status=True)["x__y-1"]
    ours = scoring.instance_report(INSTANCE, prediction["model_patch"], text)
    keys = ("patch_is_None", "patch_exists", "patch_successfully_applied", "resolved")
    assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}, case
    assert ours.get("tests_status") == theirs.get("tests_status"), case
    status, found = grading.get_logs_eval(spec, str(path))
    assert scoring.logs_eval(text) == (status, found)
    if found:
        assert ours["status"] == grading.get_resolution_status(theirs["tests_status"])


def test_error_classes():
    assert scoring.instance_report(INSTANCE, "", "")["error"] == "empty_patch"
    assert scoring.instance_report(INSTANCE, None, "")["patch_is_None"] is True
    assert scoring.instance_report(INSTANCE, "p", CASES["the patch does not apply"])["error"] == "patch_apply_failed"
    assert scoring.instance_report(INSTANCE, "p", CASES["timed out"])["error"] == "tests_timeout"
    assert scoring.instance_report(INSTANCE, "p", CASES["no test output"])["error"] == "no_test_output"
    assert scoring.instance_report(INSTANCE, "p", CASES["nothing fixed"])["error"] is None


# ----------------------------------------------------------------------------- in the sandbox
def test_scoring_a_built_task_in_the_sandbox(built, shell):
    root, _, instances = built
    task = next(t for t in instances.values() if t["difficulty"]["files"] == 1 and t["difficulty"]["lines"] == 1)
    sources = root / task["source_dir"]
    gold, gold_log = scoring.score(shell, sources, task, task["patch"])
    assert gold["resolved"] and gold["status"] == scoring.FULL and gold["error"] is None, gold_log[-2000:]
    assert not gold["tests_status"]["FAIL_TO_PASS"]["failure"]

    empty, empty_log = scoring.score(shell, sources, task, "")
    assert not empty["resolved"] and empty["error"] == "empty_patch" and empty_log == ""

    garbage, _ = scoring.score(shell, sources, task, "diff --git a/nothing.py b/nothing.py\n--- a/nothing.py\n")
    assert garbage["error"] == "patch_apply_failed" and not garbage["resolved"]

    # a patch that changes only the tests (deletes them): the tests are reset to the base, then the test
    # patch applied, so the failing tests still run and fail
    test_file = scoring.test_ids(task, "FAIL_TO_PASS")[0].split("::")[0]
    base = base_tree(sources, task)
    deleted = repo.diff_trees(base, {k: v for k, v in base.items() if k != test_file})
    cheat, cheat_log = scoring.score(shell, sources, task, deleted)
    assert cheat["patch_successfully_applied"], cheat_log[-2000:]
    assert not cheat["resolved"] and cheat["tests_status"]["FAIL_TO_PASS"]["failure"]
    # a patch that makes every test hang
    module = task["mutations"][0]["file"]
    loop = repo.diff_trees(base, {**base, module: "while True:\n    pass\n" + base[module]})
    hung, _ = scoring.score(shell, sources, task, loop, timeout=5)
    assert hung["error"] == "tests_timeout" and not hung["resolved"]


def base_tree(sources: Path, task: dict) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as d:
        return repo.read_tree(repo.materialize(sources, task, Path(d) / "r"))
