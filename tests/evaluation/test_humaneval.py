"""HumanEval task logic: problems, prompts, stop sequences, answer extraction, and checking in the sandbox."""

from __future__ import annotations

import re

import pytest

from loopcoder.evaluation import humaneval as he
from loopcoder.evaluation.sandbox import Limits, run_program
from loopcoder.utils.errors import LoopcoderError

LIMITS = Limits(cpu_seconds=10, wall_seconds=20)


@pytest.fixture(scope="module")
def problems() -> list[dict[str, str]]:
    return he.load_problems()


@pytest.fixture(scope="module")
def by_id(problems) -> dict[str, dict[str, str]]:
    return {p["task_id"]: p for p in problems}


def check(problem, completion: str):
    return run_program(he.check_program(problem, completion), LIMITS, allow_code_execution=True)


def broken(solution: str) -> str:
    """The canonical solution with one line broken: its last `return ...` returns None instead."""
    lines = solution.splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if re.match(r"\s*return\b", line))
    indent = lines[last][: len(lines[last]) - len(lines[last].lstrip())]
    lines[last] = indent + "return None\n"
    return "".join(lines)


# ------------------------------------------------------------------------------------- problems, prompts


def test_load_problems_gives_the_164_problems_in_order(problems):
    assert len(problems) == he.HUMANEVAL_SIZE == 164
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    for p in problems:
        assert set(p) >= {"task_id", "prompt", "entry_point", "canonical_solution", "test"}
        assert f"def {p['entry_point']}(" in p["prompt"]


def test_completion_prompt_is_the_problem_prompt(by_id):
    p = by_id["HumanEval/0"]
    assert he.completion_prompt(p) == p["prompt"]


def test_chat_messages_ask_for_the_function(by_id):
    p = by_id["HumanEval/0"]
    messages = he.chat_messages(p)
    assert [m["role"] for m in messages] == ["user"]
    content = messages[0]["content"]
    assert "has_close_elements" in content and "```python" in content
    assert p["prompt"].strip() in content


# --------------------------------------------------------------------------------------------- truncate


@pytest.mark.parametrize(
    "tail",
    [
        "\ndef helper():\n",
        "\nclass A:\n",
        "\nif __name__ == '__main__':\n",
        "\nprint(f(1))\n",
        "\n# tests\n",
        "\nassert f(1) == 2\n",
        "\n```\nprose",
        "\n@decorator\n",
    ],
)
def test_truncate_cuts_at_code_after_the_function(tail):
    body = "    x = 1\n    if x:\n        # inner comment\n        print(x)\n    return x\n"
    assert he.truncate(body.rstrip("\n") + tail) == body.rstrip("\n")


def test_truncate_keeps_the_earliest_cut_and_leaves_clean_text_alone():
    assert he.truncate("    return 1\n#a\ndef g(): pass\n") == "    return 1"
    assert he.truncate("    return 1\n") == "    return 1\n"
    assert he.truncate("    return 1\nprint(2)", ["\nzzz"]) == "    return 1\nprint(2)"
    assert set(he.STOP_SEQUENCES) >= {"\ndef", "\nclass", "\nif", "\nprint", "\n#"}


# ----------------------------------------------------------------------------------------- extract_code

REPLY_FENCED = '''Sure! Here is the implementation:

```python
from typing import List
import itertools


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """Check pairs."""
    return any(abs(a - b) < threshold for a, b in itertools.combinations(numbers, 2))


print(has_close_elements([1.0, 2.0], 0.5))
assert has_close_elements([1.0, 1.1], 0.5)

if __name__ == "__main__":
    input("press enter")
```

It compares every pair once.'''

REPLY_UNFENCED = """Here you go:

from typing import List

def has_close_elements(numbers: List[float], threshold: float) -> bool:
    for i, a in enumerate(numbers):
        for b in numbers[i + 1:]:
            if abs(a - b) < threshold:
                return True
    return False

This runs in quadratic time."""

REPLY_BODY_ONLY = """```python
for i, a in enumerate(numbers):
    for b in numbers[i + 1:]:
        if abs(a - b) < threshold:
            return True
return False
```"""

REPLY_CUT_OFF = """```python
def has_close_elements(numbers, threshold):
    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])

def unfinished_helper(x):
    return (x +"""


def test_extract_code_from_a_fenced_reply_keeps_definitions_only(by_id):
    p = by_id["HumanEval/0"]
    code = he.extract_code(REPLY_FENCED, p)
    assert "def has_close_elements" in code and "import itertools" in code
    assert "print(" not in code and "input(" not in code and "assert" not in code and "Sure" not in code
    assert check(p, code).passed


@pytest.mark.parametrize(
    "reply", [REPLY_UNFENCED, REPLY_BODY_ONLY, REPLY_CUT_OFF], ids=["unfenced", "body-only", "cut-off"]
)
def test_extract_code_handles_unfenced_body_only_and_cut_off_replies(by_id, reply):
    p = by_id["HumanEval/0"]
    code = he.extract_code(reply, p)
    assert "quadratic" not in code and "Here you go" not in code
    result = check(p, code)
    assert result.passed, (code, result)


def test_extract_code_without_the_function_fails_when_checked(by_id):
    p = by_id["HumanEval/0"]
    code = he.extract_code("```python\ndef something_else():\n    return True\n```", p)
    assert not check(p, code).passed  # the prompt's function, a docstring only, returns None


def test_extract_code_prefers_the_block_that_defines_the_entry_point(by_id):
    p = by_id["HumanEval/2"]
    reply = (
        "Usage:\n```\ntruncate_number(3.5)\n```\n"
        "Code:\n```python\ndef truncate_number(number):\n    return number % 1.0\n```"
    )
    code = he.extract_code(reply, p)
    assert "return number % 1.0" in code
    assert check(p, code).passed


# -------------------------------------------------------------------------------- the checking program


@pytest.mark.slow
def test_every_canonical_solution_passes(problems):
    evaluation = he.evaluate(
        problems,
        {p["task_id"]: [p["canonical_solution"]] for p in problems},
        LIMITS,
        workers=2,
        allow_code_execution=True,
    )
    failures = {o.task_id: o.results[0].reason for o in evaluation.outcomes if o.c != 1}
    assert failures == {}
    assert sum(o.c for o in evaluation.outcomes) == 164
    assert evaluation.pass_at_k([1]) == {1: 1.0}
    print(
        f"\n164 canonical solutions, 2 workers: {evaluation.programs_per_second:.1f} programs/s "
        f"({evaluation.seconds:.1f} s)"
    )


@pytest.mark.slow
def test_every_canonical_solution_with_a_broken_line_fails(problems):
    completions = {}
    for p in problems:
        changed = broken(p["canonical_solution"])
        diff = [(a, b) for a, b in zip(p["canonical_solution"].splitlines(), changed.splitlines()) if a != b]
        assert len(diff) == 1 and diff[0][1].strip() == "return None"
        completions[p["task_id"]] = [changed]
    evaluation = he.evaluate(problems, completions, LIMITS, workers=2, allow_code_execution=True)
    still_passing = [o.task_id for o in evaluation.outcomes if o.c]
    assert still_passing == []
    # They fail on the checks themselves, not on a time limit or a sandbox problem.
    assert {o.results[0].status for o in evaluation.outcomes} == {"failed"}
    assert evaluation.pass_at_k([1]) == {1: 0.0}


def test_check_program_runs_the_test_against_the_entry_point(by_id):
    p = by_id["HumanEval/38"]  # the test uses encode_cyclic, a helper defined in the prompt
    program = he.check_program(p, p["canonical_solution"])  # a checked run: the program and the checker
    for side in (program.program, program.checker):
        assert "decode_cyclic" in side and "HumanEval/38" in side
    assert check(p, p["canonical_solution"]).passed
    failing = check(p, "    return s\n")
    assert failing.status == "failed" and "AssertionError" in failing.stderr
    assert "<test>" in failing.stderr  # tracebacks name the test (and the solution) with their lines


WRONG = "    return True\n"  # has_close_elements: wrong for half the checks

CHEATS = {
    "redefines check": WRONG + "\n\ndef check(candidate):\n    pass\n",
    "patches AssertionError": WRONG + "\n\nimport builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n",
    "swallows the test in a string": WRONG + "\n\ndef check(candidate):\n    pass\n\n\n_ = '''\n",
    "exits 0 at import": WRONG + "\n\nimport sys\nsys.exit(0)\n",
    "exits 0 inside the function": "    import os\n    os._exit(0)\n",
    "raises SystemExit(0) inside the function": "    raise SystemExit(0)\n",
    "exits 0 at interpreter exit": WRONG + "\n\nimport atexit, os\natexit.register(os._exit, 0)\n",
    "prints a success marker": "    print('passed'); print('All tests passed!')\n" + WRONG,
    "writes a marker on every descriptor": (
        "    import os\n    for fd in range(3, 64):\n        try:\n            os.write(fd, b'passed\\n')\n"
        "        except OSError:\n            pass\n" + WRONG
    ),
    "hides the exception": WRONG
    + "\n\nimport sys\nsys.excepthook = lambda *a: None\nsys.stderr = open('/dev/null', 'w')\n",
}


@pytest.mark.parametrize("cheat", list(CHEATS))
def test_cheating_completions_are_scored_failed(by_id, cheat):
    p = by_id["HumanEval/0"]
    result = check(p, CHEATS[cheat])
    assert not result.passed, result
    assert result.status == "failed"


def test_patching_builtins_does_not_change_what_the_test_sees(by_id):
    p = by_id["HumanEval/2"]  # its test: candidate(3.5) == 0.5, then abs(candidate(x) - y) < 1e-6
    cheat = (
        "    return 0.5 if number == 3.5 else 0.0\n\n"
        "import builtins\nbuiltins.abs = lambda x: 0\n__builtins__.abs = lambda x: 0\n"
    )
    assert not check(p, cheat).passed
    assert check(p, "    return number % 1.0\n\nimport builtins\nbuiltins.abs = lambda x: 0\n").passed


# Issue 24: completions that forged a pass on the old sandbox (one process ran the completion and the
# test, and the verdict was evidence that process could write). Each is wrong on HumanEval/0's checks.
FORGE_THE_NONCE = """
import fcntl, os
nonce = None
for fd in range(3, 100):  # the launcher's pipes: read the nonce, then echo it as the evidence
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        data = os.read(fd, 256)
        if len(data) == 32:
            nonce = data
    except OSError:
        pass
if nonce is not None:
    for fd in range(3, 100):
        try:
            os.write(fd, nonce + b"\\n")
        except OSError:
            pass
"""
FORGERIES = {
    "patches the sys functions that report the failure": WRONG
    + "\n\nimport sys, os, traceback\nsys.exit = lambda *a, **k: None\nsys.excepthook = lambda *a: None\n"
    "traceback.print_exception = lambda *a, **k: None\n",
    "reads the nonce and exits 0 with the evidence written": WRONG + FORGE_THE_NONCE + "os._exit(0)\n",
    "forges the evidence from an atexit handler after the failure": WRONG
    + "\n\nimport atexit, os\n\ndef _forge():\n"
    + "".join("    " + line + "\n" for line in FORGE_THE_NONCE.strip().splitlines())
    + "    os._exit(0)\n\natexit.register(_forge)\n",
    "returns an object whose __eq__ is always true": "    class AlwaysEqual:\n"
    "        def __eq__(self, other):\n            return True\n\n"
    "        def __ne__(self, other):\n            return False\n\n    return AlwaysEqual()\n",
    "returns an int whose __eq__ is always true": "    class Equal(int):\n"
    "        def __eq__(self, other):\n            return True\n\n"
    "        __hash__ = int.__hash__\n\n    return Equal(0)\n",
    "rewrites the test in __main__": WRONG
    + "\n\nimport sys\nfor _k, _v in list(vars(sys.modules['__main__']).items()):\n"
    "    if isinstance(_v, str) and 'def check' in _v:\n"
    "        setattr(sys.modules['__main__'], _k, 'def check(candidate):\\n    pass\\n')\n",
    "patches the serialisers": WRONG
    + "\n\nimport builtins, json, pickle, sys\njson.dumps = lambda *a, **k: '{\"value\": true}'\n"
    "json.loads = lambda *a, **k: {'value': True}\npickle.dumps = pickle.loads = lambda *a, **k: True\n"
    "builtins.isinstance = lambda *a: True\n"
    "setattr(sys.modules['__main__'], '_encode', lambda x: True)\n",
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_forged_verdicts_are_scored_failed(by_id, forgery):
    p = by_id["HumanEval/0"]
    result = check(p, FORGERIES[forgery])
    assert not result.passed, result
    assert result.status == "failed", result


def test_an_exception_from_the_completion_fails_and_a_right_answer_with_side_effects_passes(by_id):
    p = by_id["HumanEval/0"]
    raising = check(p, "    raise ValueError('no idea')\n")
    assert raising.status == "failed" and "ValueError: no idea" in raising.stderr
    # Patching its own process is allowed: it cannot reach the checker, so a right answer still passes.
    noisy = check(p, p["canonical_solution"] + "\n\nimport sys, json\nsys.exit = None\njson.dumps = None\n")
    assert noisy.passed, noisy


# ------------------------------------------------------------------------------------------- evaluate


def test_evaluate_counts_samples_per_problem_and_scores_pass_at_k(by_id):
    picked = [by_id["HumanEval/0"], by_id["HumanEval/2"]]
    completions = {
        "HumanEval/0": [
            picked[0]["canonical_solution"],
            broken(picked[0]["canonical_solution"]),
            picked[0]["canonical_solution"],
        ],
        "HumanEval/2": ["    return 0\n", "    while True:\n        pass\n", "    return number % 1.0\n"],
    }
    evaluation = he.evaluate(
        picked, completions, Limits(cpu_seconds=1, wall_seconds=3), workers=2, allow_code_execution=True
    )
    assert [o.task_id for o in evaluation.outcomes] == ["HumanEval/0", "HumanEval/2"]
    assert [o.passed for o in evaluation.outcomes] == [[True, False, True], [False, False, True]]
    assert evaluation.outcomes[1].results[1].status in ("killed", "timeout")
    assert [(o.n, o.c) for o in evaluation.outcomes] == [(3, 2), (3, 1)]
    assert evaluation.programs == 6 and evaluation.programs_per_second > 0
    assert evaluation.statuses["passed"] == 3 and evaluation.statuses["failed"] == 2
    scores = evaluation.pass_at_k([1, 2, 3])
    assert scores[1] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert scores[2] == pytest.approx((1.0 + (1 - 1 / 3)) / 2)  # C(2,2)/C(3,2) = 1/3 for c=1
    assert scores[3] == pytest.approx(1.0)
    with pytest.raises(LoopcoderError, match=r"pass@5 .*n=3"):
        evaluation.pass_at_k([1, 5])
    # Also accepted: completions listed in the order of the problems.
    again = he.evaluate(picked[:1], [[picked[0]["canonical_solution"]]], LIMITS, allow_code_execution=True)
    assert again.outcomes[0].passed == [True]


def test_evaluate_bad_input_is_one_clear_error(by_id):
    p0, p2 = by_id["HumanEval/0"], by_id["HumanEval/2"]
    with pytest.raises(LoopcoderError, match="HumanEval/2"):
        he.evaluate([p0, p2], {"HumanEval/0": ["    return True\n"]}, allow_code_execution=True)
    with pytest.raises(LoopcoderError, match="unknown task ids: HumanEval/999"):
        he.evaluate([p0], {"HumanEval/0": ["x"], "HumanEval/999": ["x"]}, allow_code_execution=True)
    with pytest.raises(LoopcoderError, match="no completions for HumanEval/0"):
        he.evaluate([p0], {"HumanEval/0": []}, allow_code_execution=True)
    with pytest.raises(LoopcoderError, match="1 problems, but 2"):
        he.evaluate([p0, p2], [["x"]], allow_code_execution=True)
    with pytest.raises(LoopcoderError, match="must be strings"):
        he.evaluate([p0], {"HumanEval/0": [None]}, allow_code_execution=True)
    with pytest.raises(LoopcoderError, match="--allow-code-execution"):
        he.evaluate([p0], {"HumanEval/0": ["    return True\n"]}, allow_code_execution=False)
