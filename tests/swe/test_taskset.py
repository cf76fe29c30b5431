"""The embedded task set: SWE-bench records, hidden failing tests, statements written from the
failure and not from the diff, every task validated, the same set from the same seed."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import pytest

from loopcoder.cli import main
from loopcoder.swe import catalog, repo, taskset
from loopcoder.utils.errors import LoopcoderError
from support.swe import TEST_MODULES

SWEBENCH_FIELDS = (
    "instance_id",
    "repo",
    "base_commit",
    "patch",
    "test_patch",
    "problem_statement",
    "hints_text",
    "created_at",
    "version",
    "FAIL_TO_PASS",
    "PASS_TO_PASS",
    "environment_setup_commit",
)


def test_the_set_covers_every_module_kind_and_difficulty(built):
    _, manifest, instances = built
    assert manifest["tasks"] == len(instances) >= 5
    assert set(manifest["by_module"]) == set(TEST_MODULES.split(","))
    assert len(manifest["by_kind"]) >= 3
    labels = {taskset.difficulty_label(t["difficulty"]) for t in instances.values()}
    assert {"1 line, 1 file", "2 lines, 2 files"} <= labels, labels
    assert manifest["build"]["validation runs"] > 0 and manifest["sandbox_python"]


def test_instances_are_swebench_records(built):
    _, _, instances = built
    for iid, t in instances.items():
        assert all(isinstance(t[k], str) for k in SWEBENCH_FIELDS), iid
        assert re.fullmatch(r"python-stdlib__[a-z-]+-\d+", iid) and t["repo"].startswith("python-stdlib/")
        assert re.fullmatch(r"[0-9a-f]{40}", t["base_commit"]) and t["environment_setup_commit"] == t["base_commit"]
        f2p, p2p = json.loads(t["FAIL_TO_PASS"]), json.loads(t["PASS_TO_PASS"])
        assert f2p and p2p and not set(f2p) & set(p2p)
        assert all(re.fullmatch(r"tests/test_\w+\.py::\w+::\w+", x) for x in f2p + p2p)
        assert repo.patched_files(t["patch"]) == sorted({m["file"] for m in t["mutations"]})
        assert all(f.startswith("tests/") for f in repo.patched_files(t["test_patch"]))
        assert t["difficulty"] == {"lines": len(t["mutations"]), "files": len(repo.patched_files(t["patch"]))}


def test_the_failing_tests_are_hidden_until_the_test_patch(built):
    root, _, instances = built
    for t in instances.values():
        with tempfile.TemporaryDirectory() as d:
            ws = repo.materialize(root / t["source_dir"], t, Path(d) / "repo")
            assert repo.git("rev-parse", "HEAD", cwd=ws).strip() == t["base_commit"]
            assert repo.git("log", "--format=%H", cwd=ws).split() == [t["base_commit"]]  # no history to read
            for test in json.loads(t["FAIL_TO_PASS"]):
                path, _, method = test.split("::")
                assert f"def {method}(" not in (ws / path).read_text(), test
            repo.apply_patch(ws, t["test_patch"])
            for test in json.loads(t["FAIL_TO_PASS"]):
                path, _, method = test.split("::")
                assert f"def {method}(" in (ws / path).read_text(), test


def test_statements_come_from_the_failure_not_the_diff(built):
    _, _, instances = built
    for t in instances.values():
        text = t["problem_statement"]
        assert f"`{t['module']}`" in text
        first = json.loads(t["FAIL_TO_PASS"])[0]
        assert ".".join(first.split("::")[1:]) in text  # names the failing test
        assert "Traceback (most recent call last)" in text
        for line in t["patch"].splitlines():  # neither the buggy line nor its fix
            if line[:1] in "+-" and not line.startswith(("+++", "---")) and len(line[1:].strip()) > 10:
                assert line[1:].strip() not in text, (t["instance_id"], line)
        assert "/tmp/" not in text and "loopcoder-swe" not in text  # no host paths


def test_the_same_seed_builds_the_same_tasks(built, shell, tmp_path):
    _, _, instances = built
    config = taskset.BuildConfig(seed=0, per_module=2, pairs_per_module=1, workers=2)
    again = taskset.build(tmp_path / "again", catalog.select("colorsys"), config, shell, quiet=True)
    _, rebuilt = taskset.load(tmp_path / "again")
    assert rebuilt == [t for t in instances.values() if t["module"] == "colorsys"]
    text = (tmp_path / "again" / "instances.jsonl").read_bytes()
    assert again["instances_sha256"] == hashlib.sha256(text).hexdigest()


def test_validation_catches_a_wrong_gold_patch(built, shell):
    root, _, instances = built
    task = dict(next(iter(instances.values())))
    f2p = json.loads(task["FAIL_TO_PASS"])
    task["FAIL_TO_PASS"] = json.dumps([*f2p, f2p[0].rsplit("::", 1)[0] + "::test_that_is_not_there"])
    assert taskset.validate(shell, root, task) == "the gold patch does not resolve it"
    task["FAIL_TO_PASS"] = json.dumps(f2p + json.loads(task["PASS_TO_PASS"])[:1])  # passes before the fix
    assert taskset.validate(shell, root, task) == "the empty patch does not reproduce the bug's test results"


def test_a_changed_source_tree_is_refused(built, tmp_path):
    root, _, instances = built
    task = next(iter(instances.values()))
    copy = tmp_path / "sources"
    repo.write_tree(copy, {**repo.read_tree(root / task["source_dir"]), "EXTRA.txt": "x\n"})
    with pytest.raises(LoopcoderError, match="rebuild it"):
        repo.materialize(copy, task, tmp_path / "ws")


def test_hide_tests_keeps_a_class_valid():
    source = "import unittest\n\n\nclass T(unittest.TestCase):\n    def test_a(self):\n        pass\n"
    hidden = taskset.hide_tests(source, ["tests/test_x.py::T::test_a"])
    compile(hidden, "x", "exec")
    assert "test_a" not in hidden and "pass" in hidden
    assert taskset.hide_tests(source, ["tests/test_x.py::T::test_missing"]) is None


def test_without_regression_tests_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(catalog.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoopcoderError, match=r"libpython3\.X-testsuite"):
        catalog.test_package_dir()


def test_build_refuses_bad_input(tmp_path, capsys):
    assert main(["swe", "build", "--out", str(tmp_path / "t"), "--modules", "colorsys"]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert main(["swe", "build", "--out", str(tmp_path / "t"), "--modules", "nope", "--allow-code-execution"]) == 2
    assert "unknown module 'nope'" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["swe", "build", "--out", str(tmp_path / "full"), "--allow-code-execution"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["swe", "build", "--out", str(tmp_path / "t"), "--per-module", "0", "--allow-code-execution"]) == 2
    assert "--per-module must be >= 1" in capsys.readouterr().err


def test_scoring_gold_and_empty_from_the_command_line(built, tmp_path, capsys):
    root, _, instances = built
    assert main(["swe", "score", "--tasks", str(root), "--predictions", "gold", "--out", str(tmp_path / "g"),
                 "--allow-code-execution"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    assert report["resolved_ids"] == sorted(instances) and report["error_ids"] == []
    assert main(["swe", "score", "--tasks", str(root), "--predictions", "empty", "--out", str(tmp_path / "e"),
                 "--allow-code-execution"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["resolved_instances"] == 0 and report["empty_patch_ids"] == sorted(instances)
    assert "resolved 0/" in capsys.readouterr().out
