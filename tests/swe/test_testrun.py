"""The test runner of task repositories: one `STATUS id` line per test, as swebench's own pytest log
parser reads them, every kind of outcome, tracebacks kept apart, the repository's modules used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loopcoder.swe import testrun

swebench_parsers = pytest.importorskip("swebench.harness.log_parsers.python", reason="swebench (dev extra)")

TESTS = """\
import unittest

import textwrap


class Plain(unittest.TestCase):
    def test_pass(self):
        self.assertEqual(1, 1)

    def test_fail(self):
        self.assertEqual([1, 2], [1, 3])

    def test_error(self):
        raise KeyError("boom")

    @unittest.skip("not today")
    def test_skip(self):
        pass

    @unittest.expectedFailure
    def test_xfail(self):
        self.assertTrue(False)

    @unittest.expectedFailure
    def test_xpass(self):
        pass

    def test_subtests(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertLess(i, 2)

    def test_prints_a_fake_result_line(self):
        print("PASSED tests/test_fake.py::Fake::test_fake")

    def test_local_module(self):
        self.assertEqual(textwrap.MARK, "the repository's copy")


class Mixin:
    def test_inherited(self):
        self.assertTrue(self.flag)


class WithFlag(Mixin, unittest.TestCase):
    flag = True


class BrokenFixture(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        raise RuntimeError("no fixture")

    def test_never_runs(self):
        pass
"""


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("")
    (tmp_path / "tests" / "test_things.py").write_text(TESTS)
    (tmp_path / "tests" / "test_broken.py").write_text("import no_such_module\n")
    # shadows the standard library's textwrap, which unittest itself has imported already
    (tmp_path / "textwrap.py").write_text('MARK = "the repository\'s copy"\n')
    return tmp_path


def run(repo: Path, *targets: str) -> subprocess.CompletedProcess:
    command = testrun.runner_command(str(repo), list(targets), sys.executable)
    return subprocess.run(["bash", "-c", command], cwd=repo, capture_output=True, text=True, timeout=120)


def test_every_outcome_has_its_status(repo):
    done = run(repo, "tests/test_things.py")
    status = testrun.parse_status_map(done.stdout)
    p = "tests/test_things.py::"
    assert status == {
        p + "Plain::test_pass": "PASSED",
        p + "Plain::test_fail": "FAILED",
        p + "Plain::test_error": "ERROR",
        p + "Plain::test_skip": "SKIPPED",
        p + "Plain::test_xfail": "XFAIL",
        p + "Plain::test_xpass": "FAILED",  # an unexpected success fails, as pytest's strict xfail
        p + "Plain::test_subtests": "FAILED",
        p + "Plain::test_prints_a_fake_result_line": "PASSED",
        p + "Plain::test_local_module": "PASSED",
        p + "WithFlag::test_inherited": "PASSED",
        # BrokenFixture.test_never_runs: absent (a missing test counts as failed when scored)
    }, done.stdout
    assert done.returncode == 1
    assert "PASSED tests/test_fake.py" not in done.stdout  # what tests print goes to stderr
    traces = testrun.parse_tracebacks(done.stdout)
    assert "AssertionError: Lists differ: [1, 2] != [1, 3]" in traces[p + "Plain::test_fail"]
    assert "KeyError: 'boom'" in traces[p + "Plain::test_error"]
    assert any("no fixture" in t for t in traces.values())


def test_swebench_reads_the_same_statuses(repo):
    out = run(repo, "tests/test_things.py").stdout
    assert swebench_parsers.parse_log_pytest(out, None) == testrun.parse_status_map(out)


def test_single_ids_and_load_errors(repo):
    done = run(repo, "tests/test_things.py::Plain::test_pass", "tests/test_things.py::WithFlag::test_inherited")
    assert testrun.parse_status_map(done.stdout) == {
        "tests/test_things.py::Plain::test_pass": "PASSED",
        "tests/test_things.py::WithFlag::test_inherited": "PASSED",
    }
    assert done.returncode == 0
    broken = run(repo, "tests/test_broken.py")
    assert testrun.parse_status_map(broken.stdout) == {"tests/test_broken.py": "ERROR"}
    assert broken.returncode == 2
    assert "no_such_module" in testrun.parse_tracebacks(broken.stdout)["tests/test_broken.py"]
    missing = run(repo, "tests/test_things.py::Plain::test_nothing_here")
    assert testrun.parse_status_map(missing.stdout) == {"tests/test_things.py::Plain::test_nothing_here": "ERROR"}


def test_a_repository_cannot_replace_the_test_framework(repo):
    (repo / "unittest.py").write_text("raise SystemExit('the fake unittest ran')\n")
    done = run(repo, "tests/test_things.py::Plain::test_pass")
    assert testrun.parse_status_map(done.stdout) == {"tests/test_things.py::Plain::test_pass": "PASSED"}


SEEDED = """\
import random
import sys
import unittest


class S(unittest.TestCase):
    def test_draw(self):
        value = random.random()
        random.seed("tests/test_seeded.py::S::test_draw")
        self.assertEqual(value, random.random())

    def test_other(self):
        random.random()

    def test_hashing_is_fixed(self):
        self.assertEqual(sys.flags.hash_randomization, 0)
"""


def test_runs_are_repeatable(repo):
    """`random` is seeded from the test's id before each test, and string hashing is fixed: the same draws
    alone or after other tests, and sets in one order."""
    (repo / "tests" / "test_seeded.py").write_text(SEEDED)
    for targets in (["tests/test_seeded.py"], ["tests/test_seeded.py::S::test_draw"]):
        status = testrun.parse_status_map(run(repo, *targets).stdout)
        assert set(status.values()) == {"PASSED"} and "tests/test_seeded.py::S::test_draw" in status, status
