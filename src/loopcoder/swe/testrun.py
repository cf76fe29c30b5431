"""Running a task's tests and reading the log: the eval script, the runner program, the status map.

A task repository's tests are unittest modules under `tests/`. Their ids are written as pytest
writes them (`tests/test_bisect.py::TestBisectPython::test_insort`), which is what SWE-bench's
Python instances use, and the runner prints one `STATUS id` line per test, as `pytest -rA` does in
its summary. So swebench's own `parse_log_pytest` reads our logs, and the log of a scoring run has
the layout its `get_logs_eval` expects (the start and end markers, the test command's exit code).

The runner takes the working directory off `sys.path` before anything else and puts the repository
on it only after `unittest` is imported, so a file in the repository cannot replace the test
framework. Like the official harness, scoring otherwise trusts the test process: a patch that prints
fake result lines from inside the tests' process is not detected (the exit-code check of
`scoring.logs_eval` catches the crude cases).

Runs are made repeatable: string hashing is fixed (`PYTHONHASHSEED=0`, so sets iterate in one order)
and the `random` module is seeded from each test's id before the test, so a test that draws random
data draws the same data whichever tests run with it.
"""

from __future__ import annotations

import re
import shlex

# swebench.harness.constants, spelled the same so that its log reader works on our logs
START_TEST_OUTPUT = ">>>>> Start Test Output"
END_TEST_OUTPUT = ">>>>> End Test Output"
APPLY_PATCH_FAIL = ">>>>> Patch Apply Failed"
APPLY_PATCH_PASS = ">>>>> Applied Patch"
TESTS_TIMEOUT = ">>>>> Tests Timed Out"
TEST_EXIT_CODE = ">>>>> Test Exit Code"
STATUSES = ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL")  # swebench's TestStatus values

# Where a failing test's traceback is printed (for problem statements), between these lines.
TRACE_BEGIN = "----- traceback of "
TRACE_END = "----- end of traceback"

# The runner: trusted code, stdlib only, any Python >= 3.8. argv: the repository, then test ids or
# test files (a file means every test in it). Prints `STATUS id` per test, then the tracebacks of the
# failures and errors. Exit status 0 when every test ran and passed (skips and expected failures
# included), 1 otherwise, 2 when the tests could not be loaded.
RUNNER = r"""
import sys
sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # nothing from the working directory yet
import io, os, random, traceback, unittest

KEEP = {"tests", "unittest", "os", "sys", "io", "random", "traceback"}  # the runner's own, never the repository's

def main(argv):
    root, targets = argv[0], argv[1:]
    sys.path.insert(0, root)
    os.chdir(root)
    for name in os.listdir(root):  # the repository's modules, not the copies unittest already imported
        top = name[:-3] if name.endswith(".py") else name
        if top in KEEP:
            continue
        if name.endswith(".py") or os.path.isfile(os.path.join(root, name, "__init__.py")):
            for loaded in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
                del sys.modules[loaded]
    out = sys.stdout
    sys.stdout = sys.stderr  # what the tests print must not look like a result line
    tests, problems = [], []
    for target in targets:
        try:
            tests += load(target)
        except Exception as e:
            problems.append((target, "".join(traceback.format_exception_only(type(e), e)).strip()))
    result = Result()
    unittest.TestSuite(tests).run(result)
    sys.stdout = out
    for target, why in problems:
        print("ERROR %s" % target)
        result.traces.append((target, why))
    for status, test_id in result.lines:
        print("%s %s" % (status, test_id))
    for test_id, text in result.traces:  # indented: no line of it reads as a result line
        print("----- traceback of " + test_id)
        print("\n".join("    " + line for line in text.rstrip().split("\n")))
        print("----- end of traceback")
    print("ran %d tests" % len(result.lines))
    bad = problems or any(s in ("FAILED", "ERROR") for s, _ in result.lines)
    return 2 if problems and not result.lines else (1 if bad else 0)

def test_id(test):
    cls = type(test)
    module = cls.__module__
    return "%s.py::%s::%s" % (module.replace(".", "/"), cls.__qualname__.replace(".", "::"), test._testMethodName)

def flatten(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from flatten(item)
        elif type(item).__name__ == "_FailedTest":  # the loader could not import or discover something
            raise getattr(item, "_exception", ImportError(str(item)))
        elif isinstance(item, unittest.TestCase) and type(item).__module__.startswith("tests."):
            yield item

def load(target):
    if "::" not in target:  # a test file: everything in it, as its load_tests protocol says
        module = (target[:-3] if target.endswith(".py") else target).replace("/", ".")
        return list(flatten(unittest.defaultTestLoader.loadTestsFromName(module)))
    path, rest = target.split("::", 1)
    module = __import__(path[:-3].replace("/", "."), fromlist=["_"])
    *classes, method = rest.split("::")
    obj = module
    for name in classes:
        obj = getattr(obj, name)
    return [obj(method)]

class Result(unittest.TestResult):
    def __init__(self):
        super().__init__()
        self.lines, self.traces, self._failed = [], [], set()
    def _add(self, test, status):
        if isinstance(test, unittest.TestCase) and hasattr(test, "_testMethodName"):
            self.lines.append((status, test_id(test)))
    def startTest(self, test):
        random.seed(test_id(test) if hasattr(test, "_testMethodName") else 0)
        super().startTest(test)
    def addSuccess(self, test):
        super().addSuccess(test)
        if id(test) not in self._failed:
            self._add(test, "PASSED")
    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._fail(test, "FAILED", err)
    def addError(self, test, err):
        super().addError(test, err)
        self._fail(test, "ERROR", err)
    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            status = "FAILED" if issubclass(err[0], test.failureException) else "ERROR"
            self._fail(test, status, err)
    def _fail(self, test, status, err):
        if not hasattr(test, "_testMethodName"):  # a class or module fixture: its tests never ran
            self.traces.append((str(test), self._exc_info_to_string(err, test)))
            return
        if id(test) in self._failed:
            return
        self._failed.add(id(test))
        self._add(test, status)
        self.traces.append((test_id(test), self._exc_info_to_string(err, test)))
    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._add(test, "SKIPPED")
    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._add(test, "XFAIL")
    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._add(test, "FAILED")

sys.exit(main(sys.argv[1:]))
"""

_LINE = re.compile(rf"^({'|'.join(STATUSES)}) (\S+)$")


def runner_command(root: str, targets: list[str], python: str = "python3") -> str:
    """The shell command that runs `targets` (test ids or test files) of the repository at `root`."""
    args = " ".join(shlex.quote(t) for t in [root, *targets])
    return f"PYTHONHASHSEED=0 {python} -s -B - {args} <<'LOOPCODER_RUNNER'\n{RUNNER}\nLOOPCODER_RUNNER"


def parse_status_map(log: str) -> dict[str, str]:
    """test id -> status from a runner's output (the lines swebench's `parse_log_pytest` reads)."""
    statuses: dict[str, str] = {}
    for line in log.split("\n"):
        m = _LINE.match(line)
        if m:
            statuses[m.group(2)] = m.group(1)
    return statuses


def parse_tracebacks(log: str) -> dict[str, str]:
    """test id -> the traceback the runner printed for it (failures and errors only)."""
    traces: dict[str, str] = {}
    current, lines = None, []
    for line in log.split("\n"):
        if current is None and line.startswith(TRACE_BEGIN):
            current, lines = line[len(TRACE_BEGIN) :], []
        elif current is not None and line == TRACE_END:
            traces[current] = "\n".join(lines)
            current = None
        elif current is not None:
            lines.append(line[4:])
    return traces
