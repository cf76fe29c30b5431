"""The synthetic code-reasoning generator: executed answers, determinism, disjoint splits, prompts."""

from __future__ import annotations

import ast
import builtins
import collections
import json
import os
import subprocess
import sys

import pytest

from loopcoder.data import reasoning as R
from loopcoder.utils.errors import LoopcoderError


@pytest.fixture(scope="module")
def mixed():
    return R.generate_examples(240, "1-8", seed=0, split="train", distractors=1)


def _main_statements(tree: ast.Module) -> list[ast.stmt]:
    """Top-level statements of the program other than helper definitions and the final print."""
    return [s for s in tree.body if not isinstance(s, ast.FunctionDef)][:-1]


class _Rename(ast.NodeTransformer):
    def visit_Name(self, node):
        if node.id not in dir(builtins):
            node.id += "_renamed"
        return node

    def visit_FunctionDef(self, node):
        node.name += "_renamed"
        self.generic_visit(node)
        return node

    def visit_arg(self, node):
        node.arg += "_renamed"
        return node


def test_answers_are_what_the_programs_print(mixed):
    for ex in mixed:
        assert R.run_program(ex["program"]) == ex["answer"]
        env = {"__builtins__": builtins.__dict__}
        exec(ex["function"] + f"\nassert f({ex['input']}) == {ex['answer_repr']}\n", env)
        value = ast.literal_eval(ex["answer_repr"])
        assert str(value) == ex["answer"] and type(value) in (int, str, list)
        assert len(ex["answer"]) <= 40 and len(ex["program"]) < 900


def test_every_step_matters_and_distractors_do_not():
    for ex in R.generate_examples(60, "1-6", seed=2, split="train", distractors=0):
        tree = ast.parse(ex["program"])
        stmts = _main_statements(tree)
        assert ex["steps"] <= len(stmts) - 1 <= 2 * ex["steps"]  # (the first statement sets the input)
        for i in range(1, len(stmts)):  # dropping any step changes the output or breaks the program
            cut = ast.Module(body=[s for s in tree.body if s is not stmts[i]], type_ignores=[])
            try:
                changed = R.run_program(ast.unparse(cut)) != ex["answer"]
            except Exception:
                changed = True
            assert changed, f"step {i} of {ex['id']} does not matter:\n{ex['program']}"
    for ex in R.generate_examples(40, 3, seed=2, split="train", distractors=2):
        tree = ast.parse(ex["program"])
        loads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        unread = [s for s in tree.body if isinstance(s, ast.Assign) and s.targets[0].id not in loads]
        assert len(unread) == 2  # the distractors: assigned, never read
        body = [s for s in tree.body if not any(s is u for u in unread)]
        assert R.run_program(ast.unparse(ast.Module(body=body, type_ignores=[]))) == ex["answer"]


def test_steps_are_respected_and_parsed():
    for k in (1, 4, 8):
        assert {ex["steps"] for ex in R.generate_examples(20, k, seed=1)} == {k}
    assert {ex["steps"] for ex in R.generate_examples(80, "2,5", seed=1)} == {2, 5}
    # Longer chains are rejected more often; the mix must still be even, not skewed to short programs.
    counts = collections.Counter(ex["steps"] for ex in R.generate_examples(200, "1-8", seed=3))
    assert min(counts[k] for k in range(1, 9)) >= 12
    assert R.parse_steps("1-6") == [1, 2, 3, 4, 5, 6] and R.parse_steps("3") == [3] and R.parse_steps(4) == [4]
    for bad in ("0", "abc", "3-1", "1-99"):
        with pytest.raises(LoopcoderError, match="steps"):
            R.parse_steps(bad)


def test_same_seed_same_examples_in_another_process_with_another_hash_seed():
    here = R.generate_examples(25, "1-5", seed=9, split="eval", distractors=1)
    assert here == R.generate_examples(25, "1-5", seed=9, split="eval", distractors=1)
    assert here != R.generate_examples(25, "1-5", seed=10, split="eval", distractors=1)
    # A bare `loopcoder` package object keeps the child from importing torch (the package __init__).
    src = os.path.dirname(os.path.dirname(R.__file__))
    code = (
        "import json, sys, types; pkg = types.ModuleType('loopcoder'); "
        f"pkg.__path__ = [{src!r}]; sys.modules['loopcoder'] = pkg; "
        "from loopcoder.data.reasoning import generate_examples; "
        "print(json.dumps(generate_examples(25, '1-5', seed=9, split='eval', distractors=1)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == here


def test_train_and_eval_cannot_overlap():
    train = R.generate_examples(300, "1-4", seed=0, split="train")
    evals = R.generate_examples(300, "1-4", seed=0, split="eval")
    th = {R.program_hash(e["program"]) for e in train}
    eh = {R.program_hash(e["program"]) for e in evals}
    assert len(th) == 300 and len(eh) == 300 and not th & eh
    assert {R.split_of_program(e["program"]) for e in train} == {"train"}
    assert {R.split_of_program(e["program"]) for e in evals} == {"eval"}
    assert not {e["program"] for e in train} & {e["program"] for e in evals}
    # The partition is by canonical form: renaming every variable keeps a program in its split.
    ex = evals[0]
    renamed = ast.unparse(_Rename().visit(ast.parse(ex["program"])))
    assert "_renamed" in renamed and R.run_program(renamed) == ex["answer"]
    assert R.split_of_program(renamed) == "eval"
    assert R.program_hash(renamed) == R.program_hash(ex["program"])


def test_prompts_targets_and_scoring(mixed):
    for ex in mixed[:60]:
        for style in ("completion", "cruxeval"):
            prompt = R.format_prompt(ex, style)
            assert isinstance(prompt, str) and prompt.endswith(("# Output: ", f"f({ex['input']}) == "))
            assert R.is_correct(ex, R.target(ex, style), style)
            assert R.to_text(ex, style) == prompt + R.target(ex, style)
        assert R.completion_prompt(ex) == ex["program"] + "# Output: "
        assert f"assert f({ex['input']}) == ??\n[/PYTHON]" in R.cruxeval_prompt(ex)
        msgs = R.to_chat_messages(ex)
        assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[1]["content"] == ex["answer"]
        assert ex["program"] in msgs[0]["content"] and R.format_prompt(ex, "chat") == msgs[:1]
        assert R.is_correct(ex, ex["answer"] + "<|im_end|>", "chat")
        assert not R.is_correct(ex, "wrong" + ex["answer"], "chat")
        assert not R.is_correct(ex, ex["answer"] + "1\n", "completion")


def test_answer_extraction():
    ex = {"answer": "[1, 2]", "answer_repr": "[1, 2]"}
    assert R.extract_answer("[1, 2]\nx = 3\n", "completion") == "[1, 2]"
    assert R.is_correct(ex, "[1,2]\n", "completion")  # equal literals
    assert R.extract_answer("The output is: [1, 2]", "chat") == "[1, 2]"
    assert R.is_correct(ex, "```\n[1, 2]\n```", "chat")
    assert R.extract_answer("assert f(3) == [1, 2]\n[/ANSWER]", "cruxeval") == "[1, 2]"
    assert R.is_correct(ex, "[1, 2]\n[/ANSWER]", "cruxeval")
    s = {"answer": "abc", "answer_repr": "'abc'"}
    assert R.is_correct(s, '"abc"\n[/ANSWER]', "cruxeval") and not R.is_correct(s, "abc", "cruxeval")
    n = {"answer": "12", "answer_repr": "12"}
    assert not R.is_correct(n, "12.0", "completion") and not R.is_correct(n, "012", "completion")
    assert R.extract_answer("", "completion") == ""
    with pytest.raises(LoopcoderError, match="prompt style"):
        R.format_prompt(n, "fewshot")


def test_bad_arguments():
    with pytest.raises(LoopcoderError, match="split 'test'"):
        R.generate_examples(1, 2, split="test")
    with pytest.raises(LoopcoderError, match="must not be negative"):
        R.generate_examples(-1, 2)
    assert R.generate_examples(0, 2) == []


def test_digits_family_is_one_digit_chains_verified_by_execution():
    train = R.generate_examples(60, "1-6", seed=5, split="train", family="digits")
    evals = R.generate_examples(30, "1-6", seed=5, split="eval", family="digits")
    for ex in train + evals:
        assert ex["answer"] in list("0123456789")
        assert R.run_program(ex["program"]).strip() == ex["answer"]
        body = [ln for ln in ex["program"].splitlines()[1:-1]]
        assert len(body) == ex["steps"] and all("% 10" in ln for ln in body)
    assert not {R.program_hash(e["program"]) for e in train} & {R.program_hash(e["program"]) for e in evals}
    assert {e["split"] for e in evals} == {"eval"}
    with pytest.raises(LoopcoderError, match="family"):
        R.generate_examples(1, 1, family="strings")


def test_chains_family_needs_every_hop():
    train = R.generate_examples(60, "1-6", seed=5, split="train", family="chains")
    evals = R.generate_examples(30, "1-6", seed=5, split="eval", family="chains")
    for ex in train + evals:
        assert R.run_program(ex["program"]).strip() == ex["answer"]
        lines = ex["program"].splitlines()
        var = lines[-1][len("print(") : -1]
        hops = 0
        while True:  # follow the printed variable back through its copies to a root
            rhs = next(ln.split(" = ")[1] for ln in lines if ln.startswith(f"{var} = "))
            if rhs.isdigit():
                break
            var, hops = rhs, hops + 1
        assert hops == ex["steps"] and rhs == ex["answer"]
        roots = [ln.split(" = ")[1] for ln in lines[:-1] if ln.split(" = ")[1].isdigit()]
        assert len(roots) >= 3 and len(set(roots)) == len(roots)  # distractor chains with other values
    assert not {R.program_hash(e["program"]) for e in train} & {R.program_hash(e["program"]) for e in evals}
