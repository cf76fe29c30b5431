"""Scoring a prediction as SWE-bench's harness does, offline and in the sandbox.

A fresh copy of the task's base commit gets the model's patch (`git apply`, then `patch --fuzz=5` as
the official harness falls back to), the test files of `test_patch` are reset to the base and
`test_patch` is applied, and the FAIL_TO_PASS and PASS_TO_PASS tests run. The log has the official
layout (the start and end markers, the apply and timeout markers, the test command's exit code), and
its reading and the report follow `swebench.harness.grading` (5.0): a FAIL_TO_PASS test counts as
fixed when it PASSED (or XFAIL), a PASS_TO_PASS test as kept when it passed or was SKIPPED, a test
missing from the log as failed; resolved means every FAIL_TO_PASS fixed and every PASS_TO_PASS kept
(RESOLVED_FULL). The tests check this against swebench's own functions on the same logs.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from loopcoder.swe import repo, testrun
from loopcoder.swe.shell import Shell
from loopcoder.swe.testrun import (
    APPLY_PATCH_FAIL,
    APPLY_PATCH_PASS,
    END_TEST_OUTPUT,
    START_TEST_OUTPUT,
    TEST_EXIT_CODE,
    TESTS_TIMEOUT,
)

RESET_FAILED = ">>>>> Reset Failed"
TESTS_ERROR = ">>>>> Tests Errored"
FULL, PARTIAL, NO = "RESOLVED_FULL", "RESOLVED_PARTIAL", "RESOLVED_NO"
SCORING_TIMEOUT_S = 120.0
_TEST_PATCH_FILE = ".git/loopcoder-test.patch"
_MODEL_PATCH_FILE = ".git/loopcoder-model.patch"  # in the workspace: the run's own, whatever the sandbox's /tmp
_EXIT_CODE = re.compile(rf"{re.escape(TEST_EXIT_CODE)}:\s*(-?\d+)")


def test_ids(instance: dict[str, Any], key: str) -> list[str]:
    """FAIL_TO_PASS / PASS_TO_PASS as a list (SWE-bench's datasets store them as JSON text)."""
    value = instance.get(key, [])
    return json.loads(value) if isinstance(value, str) else list(value)


def eval_script(instance: dict[str, Any], apply_model_patch: bool, python: str = "python3") -> str:
    """The bash script that scores one prediction in a fresh base checkout (the model patch on stdin)."""
    test_files = repo.patched_files(instance["test_patch"])
    targets = test_ids(instance, "FAIL_TO_PASS") + test_ids(instance, "PASS_TO_PASS")
    lines = ["set -u", f"cat > {_MODEL_PATCH_FILE}"]
    if apply_model_patch:
        lines += [
            f"if git apply --verbose --whitespace=nowarn {_MODEL_PATCH_FILE} 2>&1 "
            f"|| patch --batch --fuzz=5 -p1 -i {_MODEL_PATCH_FILE} 2>&1; then",
            f"  echo '{APPLY_PATCH_PASS}'",
            "else",
            f"  echo '{APPLY_PATCH_FAIL}'; exit 0",
            "fi",
        ]
    if test_files:
        quoted = " ".join(_quote(f) for f in test_files)
        lines += [
            f"git checkout -q {instance['base_commit']} -- {quoted} 2>&1 "
            f"&& git apply --whitespace=nowarn {_TEST_PATCH_FILE} 2>&1 || {{ echo '{RESET_FAILED}'; exit 0; }}"
        ]
    lines += [
        f"echo '{START_TEST_OUTPUT}'",
        testrun.runner_command(".", targets, python),
        "rc=$?",
        f"echo '{END_TEST_OUTPUT}'",
        f'echo "{TEST_EXIT_CODE}: $rc"',
    ]
    return "\n".join(lines) + "\n"


def _quote(path: str) -> str:
    return "'" + path.replace("'", "'\\''") + "'"


def run_tests(
    shell: Shell,
    sources: Path,
    instance: dict[str, Any],
    model_patch: str,
    *,
    apply: bool = True,
    timeout: float = SCORING_TIMEOUT_S,
    python: str = "python3",
) -> str:
    """The evaluation log of `model_patch` on a fresh copy of the base. `apply=False` runs the tests on the
    base as it is (what validation runs for the empty patch; the official harness would refuse to apply
    an empty patch)."""
    with tempfile.TemporaryDirectory(prefix="loopcoder-swe-score-") as d:
        workspace = repo.materialize(sources, instance, Path(d) / "repo")
        (workspace / _TEST_PATCH_FILE).write_text(instance["test_patch"], encoding="utf-8")
        script = eval_script(instance, apply, python)
        result = shell(script, workspace, timeout=timeout, stdin=model_patch)
        log = result.output
        if result.status == "timeout":
            log += f"\n{TESTS_TIMEOUT}\n"
        elif result.status not in ("passed", "failed"):  # killed, output_limit, a sandbox error
            log += f"\n{TESTS_ERROR}: {result.reason}\n"
        shutil.rmtree(workspace, ignore_errors=True)
    return log


def logs_eval(log: str) -> tuple[dict[str, str], bool]:
    """(test id -> status, whether the log holds a valid test run): `get_logs_eval`'s reading."""
    if any(code in log for code in (APPLY_PATCH_FAIL, RESET_FAILED, TESTS_ERROR, TESTS_TIMEOUT)):
        return {}, False
    if START_TEST_OUTPUT not in log or END_TEST_OUTPUT not in log:
        return {}, False
    inside = log.split(START_TEST_OUTPUT)[1].split(END_TEST_OUTPUT)[0]
    status = testrun.parse_status_map(inside) or testrun.parse_status_map(log)
    if not status:  # no test ran (swebench also accepts other runners' summaries, which ours never prints)
        return {}, False
    m = _EXIT_CODE.search(log)
    code = int(m.group(1)) if m else None
    if code not in (None, 0) and status and not any(s in ("FAILED", "ERROR") for s in status.values()):
        return {}, False  # the process failed although no test did: the log is not the run's
    return status, True


def _passed(test: str, status: dict[str, str]) -> bool:
    return status.get(test) in ("PASSED", "XFAIL")


def _failed(test: str, status: dict[str, str]) -> bool:
    return status.get(test) in (None, "FAILED", "ERROR", "SKIPPED")


def tests_report(status: dict[str, str], fail_to_pass: list[str], pass_to_pass: list[str]) -> dict[str, Any]:
    """`get_eval_tests_report` (PASS_AND_FAIL): which FAIL_TO_PASS tests now pass, which PASS_TO_PASS still do."""
    out: dict[str, Any] = {}
    for key, tests in (("FAIL_TO_PASS", fail_to_pass), ("PASS_TO_PASS", pass_to_pass)):
        success, failure = [], []
        for t in tests:  # a skipped PASS_TO_PASS test is kept; a skipped FAIL_TO_PASS test is not fixed
            ok = _passed(t, status) or (key == "PASS_TO_PASS" and status.get(t) == "SKIPPED")
            if ok:
                success.append(t)
            elif _failed(t, status):
                failure.append(t)
        out[key] = {"success": success, "failure": failure}
    out["FAIL_TO_FAIL"] = {"success": [], "failure": []}
    out["PASS_TO_FAIL"] = {"success": [], "failure": []}
    return out


def resolution(report: dict[str, Any]) -> str:
    """`get_resolution_status`: FULL, PARTIAL (some FAIL_TO_PASS fixed, nothing broken) or NO."""

    def rate(key: str) -> float:
        s, f = len(report[key]["success"]), len(report[key]["failure"])
        return 1.0 if s + f == 0 else s / (s + f)

    f2p, p2p = rate("FAIL_TO_PASS"), rate("PASS_TO_PASS")
    if f2p == 1 and p2p == 1:
        return FULL
    if 0 < f2p < 1 and p2p == 1:
        return PARTIAL
    return NO


# Where the official harness writes no report (an EvaluationError), and so counts the instance in error_ids.
HARNESS_ERRORS = ("patch_apply_failed", "test_patch_failed", "tests_timeout", "tests_error")


def error_class(log: str, found: bool) -> str | None:
    """Why a run of a non-empty patch has no valid test result, in one word (None: the tests ran);
    `found` is `logs_eval(log)[1]`."""
    for marker, name in (
        (APPLY_PATCH_FAIL, "patch_apply_failed"),
        (RESET_FAILED, "test_patch_failed"),
        (TESTS_TIMEOUT, "tests_timeout"),
        (TESTS_ERROR, "tests_error"),
    ):
        if marker in log:
            return name
    return None if found else "no_test_output"


def instance_report(instance: dict[str, Any], model_patch: str | None, log: str) -> dict[str, Any]:
    """The per-instance report, `get_eval_report`'s fields (patch_is_None, patch_exists,
    patch_successfully_applied, resolved, tests_status) plus the resolution status and an error class."""
    report: dict[str, Any] = {
        "patch_is_None": model_patch is None,
        "patch_exists": model_patch is not None,
        "patch_successfully_applied": False,
        "resolved": False,
        "status": NO,
        "error": None,
    }
    if not model_patch:  # the official harness does not run an empty (or None) patch
        report["error"] = "empty_patch"
        return report
    status, found = logs_eval(log)
    report["error"] = error_class(log, found)
    if not found:
        return report
    report["patch_successfully_applied"] = True
    tests = tests_report(status, test_ids(instance, "FAIL_TO_PASS"), test_ids(instance, "PASS_TO_PASS"))
    report["status"] = resolution(tests)
    report["resolved"] = report["status"] == FULL
    report["tests_status"] = tests
    return report


def score(
    shell: Shell,
    sources: Path,
    instance: dict[str, Any],
    model_patch: str | None,
    *,
    timeout: float = SCORING_TIMEOUT_S,
    python: str = "python3",
) -> tuple[dict[str, Any], str]:
    """Score one prediction: (report, evaluation log). An empty or None patch is not run, as the official
    harness leaves it out (`empty_patch_ids`)."""
    if not model_patch:
        return instance_report(instance, model_patch, ""), ""
    log = run_tests(shell, sources, instance, model_patch, timeout=timeout, python=python)
    return instance_report(instance, model_patch, log), log
