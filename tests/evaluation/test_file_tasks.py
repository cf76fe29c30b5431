"""The file benchmarks (EvalPlus, CRUXEval, LiveCodeBench) on small files written here in each format.

Canonical answers must pass and broken ones fail, through the runner and the sandbox; the readers
reject files in the wrong format, and LiveCodeBench's pickled private tests are read without unpickling.
"""

from __future__ import annotations

import base64
import gzip
import json
import pickle
import zlib

import pytest

from loopcoder.cli import main
from loopcoder.evaluation import benchmark_files, file_tasks, runner
from loopcoder.evaluation.benchmark_files import BenchmarkFileError, decode_lcb_tests, pickled_string
from loopcoder.evaluation.tasks import EvalSettings
from support.data import tiny_model_dir

HUMANEVAL_PLUS = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "entry_point": "add",
        "canonical_solution": "    return a + b\n",
        "base_input": [[1, 2], [3, 4]],
        "plus_input": [[250, 1], [1.5, 2.25], [-7, 7]],
        "atol": 0,
    },
    {
        "task_id": "HumanEval/1",
        "prompt": 'def third(x):\n    """x / 3."""\n',
        "entry_point": "third",
        "canonical_solution": "    return x / 3\n",
        "base_input": [[1]],
        "plus_input": [[2], [10.0]],
        "atol": 0,
    },
    {
        "task_id": "HumanEval/32",
        "prompt": 'import math\n\n\ndef find_zero(xs):\n    """A zero."""\n',
        "entry_point": "find_zero",
        "atol": 1e-6,
        "canonical_solution": (
            "    lo, hi = -100.0, 100.0\n    f = lambda x: sum(c * x ** i for i, c in enumerate(xs))\n"
            "    for _ in range(200):\n        mid = (lo + hi) / 2\n"
            "        if (f(lo) > 0) == (f(mid) > 0):\n            lo = mid\n        else:\n"
            "            hi = mid\n    return lo\n"
        ),
        "base_input": [[[1, 2]]],
        "plus_input": [[[-6, 11, -6, 1]]],
    },
]
# right on the base tests (small numbers), wrong on the plus ones
HUMANEVAL_PLUS_BASE_ONLY = {
    "HumanEval/0": "    return a + b if a < 100 else 0\n",
    "HumanEval/1": "    return x / 3 if x < 2 else round(x / 3, 2)\n",
    "HumanEval/32": "    return -xs[0] / xs[1] if len(xs) == 2 else 0.0\n",
}
# a float a little off: inside EvalPlus's default atol of 1e-6 for float outputs
HUMANEVAL_PLUS_CLOSE = {
    **{p["task_id"]: p["canonical_solution"] for p in HUMANEVAL_PLUS},
    "HumanEval/1": "    return x / 3 + 1e-9\n",
}

MBPP_PROMPT = (
    '"""\nWrite a function to find the shared elements from the given two lists.\n'
    'assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"""\n'
)
MBPP_PLUS = [
    # Mbpp/2: EvalPlus delivers the arguments as tuples and compares the outputs as sets
    {
        "task_id": "Mbpp/2",
        "prompt": MBPP_PROMPT,
        "entry_point": "similar_elements",
        "canonical_solution": (
            "def similar_elements(test_tup1, test_tup2):\n"
            "    assert type(test_tup1) is tuple and type(test_tup2) is tuple\n"
            "    return tuple(set(test_tup1) & set(test_tup2))\n"
        ),
        "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]],
        "plus_input": [[[1, 2, 3, 9], [9, 3, 2]], [[], [1]]],
        "atol": 0,
    },
]
MBPP_SORTED_DIFFERENTLY = "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b), reverse=True))\n"

CRUXEVAL = [
    {"id": "sample_0", "code": "def f(nums):\n    return sorted(nums)", "input": "[3, 1, 2]", "output": "[1, 2, 3]"},
    {"id": "sample_1", "code": "def f(s, n):\n    return s * n", "input": "'ab', 2", "output": "'abab'"},
]
CRUX_OUTPUT_RIGHT = {"sample_0": "assert f([3, 1, 2]) == [1, 2, 3]\n", "sample_1": "assert f('ab', 2) == 'abab'"}
CRUX_OUTPUT_WRONG = {
    "sample_0": "assert f([3, 1, 2]) == [3, 1, 2]\n",
    "sample_1": "assert f('ab', 2) == f('ab', 2)",
}  # the call itself: not a prediction
CRUX_INPUT_RIGHT = {"sample_0": "assert f([2, 3, 1]) == [1, 2, 3]", "sample_1": "assert f('abab', 1) == 'abab'"}
CRUX_INPUT_WRONG = {"sample_0": "assert f([1]) == [1, 2, 3]", "sample_1": "'ab', 2"}

STDIN_TESTS = [
    {"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
    {"input": "10 -4\n", "output": "6\n", "testtype": "stdin"},
]
HALF_TESTS = [{"input": "1\n", "output": "0.5000\n", "testtype": "stdin"}]
FUNC_TESTS = [
    {"input": "1\n2", "output": "3", "testtype": "functional"},
    {"input": "[1, 2]\n[3]", "output": "[1, 2, 3]", "testtype": "functional"},
]


def lcb_private(tests) -> str:
    """How LiveCodeBench stores its private tests: base64 of zlib of a pickled JSON string."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


LCB_CODEGEN = [
    {
        "question_id": "abc001_a",
        "question_title": "Sum",
        "question_content": "Print A + B.",
        "platform": "atcoder",
        "contest_id": "abc001",
        "contest_date": "2024-01-01T00:00:00",
        "starter_code": "",
        "difficulty": "easy",
        "public_test_cases": json.dumps(STDIN_TESTS[:1]),
        "private_test_cases": lcb_private(STDIN_TESTS[1:]),
        "metadata": "{}",
    },
    {
        "question_id": "abc002_a",
        "question_title": "Half",
        "question_content": "Print N / 2.",
        "platform": "atcoder",
        "contest_id": "abc002",
        "contest_date": "2024-01-02T00:00:00",
        "starter_code": "",
        "difficulty": "easy",
        "public_test_cases": json.dumps(HALF_TESTS),
        "private_test_cases": lcb_private([]),
        "metadata": "{}",
    },
    {
        "question_id": "3000",
        "question_title": "Add",
        "question_content": "Add a and b.",
        "platform": "leetcode",
        "contest_id": "weekly-1",
        "contest_date": "2024-01-03T00:00:00",
        "difficulty": "easy",
        "starter_code": "class Solution:\n    def addTwo(self, a, b):\n        ",
        "public_test_cases": json.dumps(FUNC_TESTS[:1]),
        "private_test_cases": json.dumps(FUNC_TESTS[1:]),
        "metadata": json.dumps({"func_name": "addTwo"}),
    },
]
LCB_CODEGEN_RIGHT = {
    "abc001_a": "Here:\n```python\nimport sys\nx, y = map(int, sys.stdin.buffer.read().split())\nprint(x + y)\n"
    "sys.exit(0)\n```\n",
    "abc002_a": "```python\nn = int(open(0).read())\nif __name__ == '__main__':\n    print(n / 2)\n```",
    "3000": "```python\nclass Solution:\n    def addTwo(self, a, b):\n        return a + b\n```",
}
LCB_CODEGEN_WRONG = {
    "abc001_a": "```python\nx, y = map(int, input().split())\nprint(x - y)\n```",
    "abc002_a": "```python\nprint(int(input()) // 2)\n```",
    "3000": "no code at all",
}
LCB_EXECUTION = [
    {
        "id": "sample_0",
        "question_id": "1",
        "contest_id": "c",
        "contest_date": "2023-05-01T00:00:00",
        "difficulty": "easy",
        "function_name": "countA",
        "numsteps": 3,
        "problem_id": "1_0",
        "code": "def countA(s: str) -> int:\n    return Counter(s)['a']",  # Counter from the prelude
        "input": "countA(s = 'banana')",
        "output": "3",
    }
]
LCB_EXECUTION_RIGHT = {"sample_0": "assert countA(s = 'banana') == 3"}
LCB_EXECUTION_WRONG = {"sample_0": "assert countA(s = 'banana') == countA(s = 'banana')"}


def write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("files"), max_positions=1024)[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("benchmarks")
    return {
        "humaneval+": write_jsonl(d / "HumanEvalPlus.jsonl.gz", HUMANEVAL_PLUS, gz=True),
        "mbpp+": write_jsonl(d / "MbppPlus.jsonl.gz", MBPP_PLUS, gz=True),
        "cruxeval-o": write_jsonl(d / "cruxeval.jsonl", CRUXEVAL),
        "cruxeval-i": d / "cruxeval.jsonl",
        "lcb-codegen": write_jsonl(d / "test.jsonl", LCB_CODEGEN),
        "lcb-execution": write_jsonl(d / "execution.jsonl", LCB_EXECUTION),
    }


def score(model_dir, data, tmp_path, monkeypatch, task, replies, ks=(1,), n=1):
    """Run the task through the runner with `replies[task_id]` as every sample's completion."""
    spec = file_tasks.TASKS[task]
    by_prompt = {json.dumps(spec.prompt(p, False)): p["task_id"] for p in spec.load(str(data[task]))}

    def complete(engine, tokenizer, prompts, params, label="", quiet=False, progress=None):
        return [
            {"text": replies[by_prompt[json.dumps(p)]], "tokens": 1, "finish_reason": "stop", "skipped": None}
            for p in prompts
        ]

    monkeypatch.setattr(file_tasks, "complete", complete)
    out = tmp_path / f"{task}-{len(list(tmp_path.iterdir()))}.json"
    res = runner.evaluate(
        str(model_dir),
        [task],
        EvalSettings(n_samples=n, ks=ks),
        str(out),
        data_files={task: str(data[task])},
        allow_code_execution=True,
    )
    return res["tasks"][task]


def full_solutions(task, data):
    return {p["task_id"]: p["canonical_solution"] for p in file_tasks.TASKS[task].load(str(data[task]))}


@pytest.mark.slow
def test_humaneval_plus_base_and_plus_scores(model_dir, data, tmp_path, monkeypatch):
    res = score(model_dir, data, tmp_path, monkeypatch, "humaneval+", full_solutions("humaneval+", data))
    assert res["pass_at_k"] == {"base": {"pass@1": 1.0}, "plus": {"pass@1": 1.0}}
    res = score(model_dir, data, tmp_path, monkeypatch, "humaneval+", HUMANEVAL_PLUS_BASE_ONLY)
    assert res["pass_at_k"] == {"base": {"pass@1": 1.0}, "plus": {"pass@1": 0.0}}
    assert res["problems"]["HumanEval/0"]["statuses"] == [{"base": "passed", "plus": "failed"}]
    res = score(model_dir, data, tmp_path, monkeypatch, "humaneval+", HUMANEVAL_PLUS_CLOSE)
    assert res["pass_at_k"]["plus"]["pass@1"] == 1.0
    res = score(
        model_dir, data, tmp_path, monkeypatch, "humaneval+", dict.fromkeys(HUMANEVAL_PLUS_CLOSE, "    return None\n")
    )
    assert res["pass_at_k"] == {"base": {"pass@1": 0.0}, "plus": {"pass@1": 0.0}}


@pytest.mark.slow
def test_mbpp_plus_gets_tuples_and_compares_sets_like_evalplus(model_dir, data, tmp_path, monkeypatch):
    # the reply continues the docstring prompt with the whole function (a base model's completion)
    res = score(model_dir, data, tmp_path, monkeypatch, "mbpp+", {"Mbpp/2": MBPP_SORTED_DIFFERENTLY + "\nassert x\n"})
    assert res["pass_at_k"] == {"base": {"pass@1": 1.0}, "plus": {"pass@1": 1.0}}
    res = score(
        model_dir,
        data,
        tmp_path,
        monkeypatch,
        "mbpp+",
        {"Mbpp/2": "def similar_elements(a, b):\n    return tuple(set(a) | set(b))\n"},
    )
    assert res["pass_at_k"]["base"]["pass@1"] == 0.0
    (problem,) = benchmark_files.load_evalplus(data["mbpp+"], "mbpp")
    assert problem["base_input"] == [[(3, 4, 5, 6), (5, 7, 4, 10)]] and problem["oracle"] == "set_equal"


@pytest.mark.slow
def test_cruxeval_output_and_input_prediction(model_dir, data, tmp_path, monkeypatch):
    assert score(model_dir, data, tmp_path, monkeypatch, "cruxeval-o", CRUX_OUTPUT_RIGHT)["pass_at_k"] == {
        "pass": {"pass@1": 1.0}
    }
    res = score(model_dir, data, tmp_path, monkeypatch, "cruxeval-o", CRUX_OUTPUT_WRONG)
    assert res["pass_at_k"] == {"pass": {"pass@1": 0.0}}
    assert res["problems"]["sample_1"]["answers"] == [None]  # the call itself is not run
    assert score(model_dir, data, tmp_path, monkeypatch, "cruxeval-i", CRUX_INPUT_RIGHT)["pass_at_k"] == {
        "pass": {"pass@1": 1.0}
    }
    assert score(model_dir, data, tmp_path, monkeypatch, "cruxeval-i", CRUX_INPUT_WRONG)["pass_at_k"] == {
        "pass": {"pass@1": 0.0}
    }


@pytest.mark.slow
def test_livecodebench_codegen_stdin_and_functional_tests(model_dir, data, tmp_path, monkeypatch):
    res = score(model_dir, data, tmp_path, monkeypatch, "lcb-codegen", LCB_CODEGEN_RIGHT)
    assert res["pass_at_k"] == {"pass": {"pass@1": 1.0}}, res["problems"]
    res = score(model_dir, data, tmp_path, monkeypatch, "lcb-codegen", LCB_CODEGEN_WRONG)
    assert res["pass_at_k"] == {"pass": {"pass@1": 0.0}}
    assert res["problems"]["3000"]["statuses"] == [{"pass": "failed"}]  # a base model's prose runs as code, and fails
    problems = {p["task_id"]: p for p in benchmark_files.load_lcb_codegen(data["lcb-codegen"])}
    assert problems["abc001_a"]["tests"] == STDIN_TESTS and problems["3000"]["func_name"] == "addTwo"


@pytest.mark.slow
def test_livecodebench_execution(model_dir, data, tmp_path, monkeypatch):
    assert score(model_dir, data, tmp_path, monkeypatch, "lcb-execution", LCB_EXECUTION_RIGHT)["pass_at_k"] == {
        "pass": {"pass@1": 1.0}
    }
    assert score(model_dir, data, tmp_path, monkeypatch, "lcb-execution", LCB_EXECUTION_WRONG)["pass_at_k"] == {
        "pass": {"pass@1": 0.0}
    }


ALWAYS_EQUAL = "type('E', (), {'__eq__': lambda s, o: True, '__ne__': lambda s, o: False})()"
# Issue 24: answers that passed on the old sandbox, where the check ran in the model code's process. Each
# is wrong; every task must now score it 0.
FORGED = {
    # patches a builtin the old check looped with: no input was ever compared
    "humaneval+": dict.fromkeys(
        ("HumanEval/0", "HumanEval/1", "HumanEval/32"),
        "    return None\n\nimport builtins\nbuiltins.enumerate = lambda x: iter(())\n",
    ),
    # patches json, with which the old check decoded the functional tests (None == None), and the
    # comparison of the stdin tests in __main__
    "lcb-codegen": dict.fromkeys(
        ("abc001_a", "abc002_a", "3000"),
        "```python\nimport json, sys\njson.loads = lambda *a, **k: None\n"
        "sys.modules['__main__']._same_output = lambda *a: True\n"
        "class Solution:\n    def addTwo(self, a, b):\n        return None\n```",
    ),
    # an answer equal to everything
    "cruxeval-o": {
        "sample_0": f"assert f([3, 1, 2]) == {ALWAYS_EQUAL}",
        "sample_1": f"assert f('ab', 2) == {ALWAYS_EQUAL}",
    },
    "lcb-execution": {"sample_0": f"assert countA(s = 'banana') == {ALWAYS_EQUAL}"},
    # a "call" of f that is really the expected output
    "cruxeval-i": {
        "sample_0": "assert f([1]) if False else [1, 2, 3] == [1, 2, 3]",
        "sample_1": "assert f('x', 1) if False else 'abab' == 'abab'",
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(FORGED))
def test_forged_answers_score_nothing(model_dir, data, tmp_path, monkeypatch, task):
    res = score(model_dir, data, tmp_path, monkeypatch, task, FORGED[task])
    assert all(v == {"pass@1": 0.0} for v in res["pass_at_k"].values()), res["problems"]


def test_private_tests_are_read_without_unpickling():
    tests = [{"input": "1", "output": "2", "testtype": "stdin"}]
    assert decode_lcb_tests(lcb_private(tests), "x") == tests
    assert decode_lcb_tests(json.dumps(tests), "x") == tests

    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    assert pickled_string(pickle.dumps("x", protocol=0)) == "x"
    for payload in (pickle.dumps(Exploit()), pickle.dumps(["a", "b"])):
        with pytest.raises(BenchmarkFileError, match="refusing to read it"):
            pickled_string(payload)
    bad = base64.b64encode(zlib.compress(pickle.dumps(Exploit()))).decode()
    with pytest.raises(BenchmarkFileError, match=r"x:.*refusing to read it"):
        decode_lcb_tests(bad, "x")


def test_wrong_files_are_one_line_errors(model_dir, data, tmp_path, capsys):
    def run(*args):
        code = main(
            ["eval", "--model", str(model_dir), "--allow-code-execution", "--out", str(tmp_path / "r.json"), *args]
        )
        err = capsys.readouterr().err
        return code, err

    code, err = run("--tasks", "humaneval+")
    assert code == 2 and "--data humaneval+=FILE" in err
    code, err = run("--tasks", "cruxeval-o", "--data", f"cruxeval-o={data['humaneval+']}")
    assert code == 2 and "no 'id' field: not a CRUXEval file" in err
    code, err = run("--tasks", "mbpp+", "--data", f"mbpp+={tmp_path / 'missing.jsonl.gz'}")
    assert code == 2 and "no such file" in err
    code, err = run("--tasks", "cruxeval-o", "--data", f"cruxeval-o={data['cruxeval-o']}", "--data", "x", "--data", "y")
    assert code == 2 and "second data directory" in err
    assert (
        main(
            [
                "eval",
                "--model",
                str(model_dir),
                "--tasks",
                "cruxeval-o",
                "--data",
                f"cruxeval-o={data['cruxeval-o']}",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 2
    )
    assert "--allow-code-execution" in capsys.readouterr().err


@pytest.mark.slow
def test_real_generation_end_to_end_and_resume(model_dir, data, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = [
        "eval",
        "--model",
        str(model_dir),
        "--tasks",
        "cruxeval-o,lcb-execution",
        "--allow-code-execution",
        "--data",
        f"cruxeval-o={data['cruxeval-o']}",
        "--data",
        f"lcb-execution={data['lcb-execution']}",
        "--limit",
        "2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "cruxeval-o: pass pass@1" in captured.out and "completions" in captured.err
    first = json.loads(out.read_text())
    for task, total in (("cruxeval-o", 2), ("lcb-execution", 1)):
        res = first["tasks"][task]
        assert 0.0 <= res["pass_at_k"]["pass"]["pass@1"] <= 1.0 and res["problems_total"] == total
        assert all(len(p["answers"]) == 1 for p in res["problems"].values())
    assert main(args) == 0  # resumes: nothing left to generate, the same answers
    assert "completions" not in capsys.readouterr().err
    assert json.loads(out.read_text())["tasks"]["cruxeval-o"]["problems"] == first["tasks"]["cruxeval-o"]["problems"]
