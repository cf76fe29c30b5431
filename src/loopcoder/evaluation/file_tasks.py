"""The paper's other benchmarks, from files the user supplies: prompts, answer extraction, checks, pass@k.

- `humaneval+` (EvalPlus `HumanEvalPlus.jsonl.gz`): HumanEval's prompts; scored on the base tests
  (HumanEval's) and plus (base and EvalPlus's extra inputs).
- `mbpp+` (EvalPlus `MbppPlus.jsonl.gz`): the docstring prompt (chat: EvalPlus's instruction); base
  (MBPP's tests) and plus.
- `cruxeval-o` / `cruxeval-i` (CRUXEval `cruxeval.jsonl`): CRUXEval's direct prompts, answered in
  [ANSWER] tags; `assert output == answer`.
- `lcb-codegen` (LiveCodeBench code generation `.jsonl`): LiveCodeBench's generic prompt; its stdin or
  functional tests.
- `lcb-execution` (LiveCodeBench `execution-v2` `.jsonl`): its direct output prompt; `assert output == answer`.

Every check is a checked run in the sandbox (`checks.py` builds them): the model's code or answer in
one process, the trusted check and its expected outputs in another, plain data between them. Answers
that the reference harnesses discard as cheating (the call itself as the predicted output, an input
prediction that does not call `f`) and replies without code count as failures here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loopcoder.evaluation import benchmark_files as files
from loopcoder.evaluation import checks, humaneval
from loopcoder.evaluation.generation import complete
from loopcoder.evaluation.passk import mean_pass_at_k
from loopcoder.evaluation.sandbox import Checked, Limits, isolation_report, run_many
from loopcoder.evaluation.tasks import EvalSettings, Save, task_progress
from loopcoder.inference.engine import Engine
from loopcoder.model.loading import chat_stop_ids
from loopcoder.utils.errors import LoopcoderError

Prompt = str | list[dict[str, str]]

# EvalPlus's end-of-completion strings for MBPP+ base models (docstring prompt, then a whole function)
MBPP_STOP_SEQUENCES = ('\n"""', "\nassert", "\nif __name__", "\ndef main(", "\nprint(")
EVALPLUS_INSTRUCTION = (
    "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
)
# LiveCodeBench's code-execution prelude (utils_execute.BASE_IMPORTS), without numpy and pandas, which the
# sandbox's interpreter need not have
LCB_EXECUTION_PRELUDE = """\
from itertools import accumulate, chain, combinations, count, permutations, product, groupby, islice, repeat
from copy import deepcopy
from string import ascii_lowercase
from math import floor, log2, log10, sqrt, comb, gcd, ceil, inf, isqrt
from collections import defaultdict, deque, Counter
from bisect import bisect, bisect_left, bisect_right, insort
from heapq import heappush, heappop, heapify, merge
from functools import reduce, cache, lru_cache
from random import randrange, shuffle
from operator import itemgetter, sub
from re import search as re_search
from os.path import commonprefix
from typing import List, Tuple, Dict, Set, Optional, Union, Any, Callable, Iterable, Iterator, Generator
import copy, string, math, collections, bisect, heapq, functools, random, itertools, operator, re
from math import log, prod
from collections import deque, defaultdict, Counter, OrderedDict
from itertools import (accumulate, permutations, combinations, product, groupby, islice, chain, repeat,
                       zip_longest, cycle)
from functools import lru_cache, reduce, partial
from operator import iand
"""
LCB_SYSTEM = (
    "You are an expert Python programmer. You will be given a question (problem specification) and will "
    "generate a correct Python program that matches the specification and passes all tests."
)
LCB_WITH_STARTER = (
    "You will use the following starter code to write the solution to the problem and enclose your "
    "code within delimiters."
)
LCB_WITHOUT_STARTER = (
    "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly "
    "test on the sample inputs). Enclose your code within delimiters as follows. Ensure that when "
    "the python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT."
)

# CRUXEval's direct prompts (prompts.py): two worked examples, then the problem, answered in [ANSWER] tags
CRUX_OUTPUT = """\
You are given a Python function and an assertion containing an input to the function. Complete the assertion \
with a literal (no unsimplified expressions, no function calls) containing the output when executing the provided \
code on the given input, even if the function is incorrect or incomplete. Do NOT output any extra information. \
Provide the full assertion with the correct output in [ANSWER] and [/ANSWER] tags, following the examples.

[PYTHON]
{example1}
assert {call1} == ??
[/PYTHON]
[ANSWER]
assert {call1} == {answer1}
[/ANSWER]

[PYTHON]
{example2}
assert {call2} == ??
[/PYTHON]
[ANSWER]
assert {call2} == {answer2}
[/ANSWER]

[PYTHON]
{code}
assert {call} == ??
[/PYTHON]
[ANSWER]
"""
CRUX_INPUT = """\
You will be given a function f and an output in the form f(??) == output. Find any input such that executing f on \
the input leads to the given output. There may be multiple answers, but you should only output one. In [ANSWER] \
and [/ANSWER] tags, complete the assertion with one such input that will produce the output when executing the \
function.

[PYTHON]
def f(my_list):
    count = 0
    for i in my_list:
        if len(i) % 2 == 0:
            count += 1
    return count
assert f(??) == 3
[/PYTHON]
[ANSWER]
assert f(["mq", "px", "zy"]) == 3
[/ANSWER]

[PYTHON]
def f(s1, s2):
    return s1 + s2
assert f(??) == "banana"
[/PYTHON]
[ANSWER]
assert f("ba", "nana") == "banana"
[/ANSWER]

[PYTHON]
{code}
assert f(??) == {output}
[/PYTHON]
[ANSWER]
"""
_CRUX_EXAMPLES = dict(
    example1="def f(n):\n    return n",
    call1="f(17)",
    answer1="17",
    example2='def f(s):\n    return s + "a"',
    call2='f("x9j")',
    answer2='"x9ja"',
)
_LCB_EXAMPLES = dict(
    example1="def repeatNumber(number : int) -> int:\n    return number",
    call1="repeatNumber(number = 17)",
    answer1="17",
    example2='def addCharacterA(string : str) -> str:\n    return string + "a"',
    call2='addCharacterA(string = "x9j")',
    answer2='"x9ja"',
)


@dataclass(frozen=True)
class FileTask:
    """One benchmark read from a file: how to prompt, what to take from a reply, which programs decide."""

    name: str
    source: str  # the file it reads, in words (for errors)
    load: Callable[[str], list[dict[str, Any]]]
    prompt: Callable[[dict[str, Any], bool], Prompt]  # (problem, chat)
    stops: tuple[str, ...]  # stop strings of completion-style prompts
    extract: Callable[[str, dict[str, Any], bool], str | None]  # reply -> answer (None: fails unchecked)
    programs: Callable[[dict[str, Any], str], dict[str, Checked]]  # answer -> named checked runs
    verdicts: tuple[str, ...]  # what is scored, from the programs' results (see `_verdicts`)
    limits: Limits
    writes_code: bool  # long completions (--max-new-tokens) rather than a short answer


# ----------------------------------------------------------------------------- EvalPlus
def _evalplus_programs(problem: dict[str, Any], solution: str) -> dict[str, str]:
    reference = problem["prompt"] + problem["canonical_solution"]
    return {
        split: checks.differential_program(
            f"{problem['task_id']} ({split})",
            reference,
            solution,
            problem["entry_point"],
            problem[f"{split}_input"],
            problem["atol"],
            problem["oracle"],
        )
        for split in ("base", "plus")
    }


def _humaneval_plus_extract(reply: str, problem: dict[str, Any], chat: bool) -> str:
    completion = humaneval.extract_code(reply, problem) if chat else humaneval.truncate(reply)
    return problem["prompt"] + completion


def _mbpp_prompt(problem: dict[str, Any], chat: bool) -> Prompt:
    if chat:
        return [{"role": "user", "content": f"{EVALPLUS_INSTRUCTION}\n```\n{problem['prompt'].strip()}\n```\n"}]
    return problem["prompt"].strip() + "\n"


def _mbpp_extract(reply: str, problem: dict[str, Any], chat: bool) -> str:
    if chat:
        return problem["prompt"] + humaneval.extract_code(reply, problem)
    return problem["prompt"].strip() + "\n" + humaneval.truncate(reply, MBPP_STOP_SEQUENCES)


# ----------------------------------------------------------------------------- output / input prediction
def _answer_block(reply: str) -> str:
    """The text inside [ANSWER] ... [/ANSWER] (a completion prompt already opened the tag)."""
    if "[ANSWER]" in reply:
        reply = reply.split("[ANSWER]", 1)[1]
    return reply.split("[/ANSWER]", 1)[0].strip()


def _predicted_output(reply: str, call: str) -> str | None:
    answer = _answer_block(reply)
    answer = answer.split("==", 1)[1] if "==" in answer else answer
    answer = answer.strip().split("\n", 1)[0].strip()
    return None if not answer or call in answer else answer  # the call itself is not a prediction


def _crux_input_answer(reply: str, problem: dict[str, Any], chat: bool) -> str | None:
    answer = _answer_block(reply).split("\n", 1)[0].split("==", 1)[0].strip()
    if "assert f" in answer:
        answer = "f" + answer.split("assert f", 1)[1].strip()
    return answer if "f(" in answer else None


def _prediction_programs(predicts: str, prelude: str = "") -> Callable[[dict[str, Any], str], dict[str, Checked]]:
    """CRUXEval's and LiveCodeBench execution's one checked run: the predicted output (an expression)
    or input (a call of `f`) against the dataset's output, after the problem's code (and `prelude`)."""
    build = checks.output_program if predicts == "output" else checks.input_program
    return lambda pr, answer: {"pass": build(pr["task_id"], pr["code"], pr["output"], answer, prelude)}


_PREDICTION_LIMITS = Limits(cpu_seconds=3, wall_seconds=6)


def _as_chat(text: str, chat: bool) -> Prompt:
    return [{"role": "user", "content": text}] if chat else text


# ----------------------------------------------------------------------------- LiveCodeBench code generation
def _lcb_question(problem: dict[str, Any]) -> str:
    text = f"### Question:\n{problem['question_content']}\n\n"
    if problem["starter_code"]:
        text += f"### Format: {LCB_WITH_STARTER}\n```python\n{problem['starter_code']}\n```\n\n"
    else:
        text += f"### Format: {LCB_WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```\n\n"
    return text + "### Answer: (use the provided format with backticks)\n\n"


def _lcb_prompt(problem: dict[str, Any], chat: bool) -> Prompt:
    if chat:
        return [{"role": "system", "content": LCB_SYSTEM}, {"role": "user", "content": _lcb_question(problem)}]
    return f"{LCB_SYSTEM}\n\n{_lcb_question(problem)}"


def _lcb_code(reply: str, problem: dict[str, Any], chat: bool) -> str | None:
    """The last fenced code block, as LiveCodeBench takes it; a base model's unfenced (or unclosed) code as is."""
    lines = reply.split("\n")
    fences = [i for i, line in enumerate(lines) if "```" in line]
    if len(fences) >= 2:
        return "\n".join(lines[fences[-2] + 1 : fences[-1]])
    if chat:
        return None
    code = "\n".join(line for line in lines if "```" not in line)
    return code if code.strip() else None


TASKS: dict[str, FileTask] = {
    "humaneval+": FileTask(
        "humaneval+",
        "EvalPlus HumanEvalPlus.jsonl.gz",
        lambda p: files.load_evalplus(p, "humaneval"),
        lambda pr, chat: humaneval.chat_messages(pr) if chat else humaneval.completion_prompt(pr),
        humaneval.STOP_SEQUENCES,
        _humaneval_plus_extract,
        _evalplus_programs,
        ("base", "plus"),
        Limits(cpu_seconds=20, wall_seconds=40, address_space_bytes=1 << 30, memory_bytes=2 << 30),
        True,
    ),
    "mbpp+": FileTask(
        "mbpp+",
        "EvalPlus MbppPlus.jsonl.gz",
        lambda p: files.load_evalplus(p, "mbpp"),
        _mbpp_prompt,
        MBPP_STOP_SEQUENCES,
        _mbpp_extract,
        _evalplus_programs,
        ("base", "plus"),
        Limits(cpu_seconds=20, wall_seconds=40, address_space_bytes=1 << 30, memory_bytes=2 << 30),
        True,
    ),
    "cruxeval-o": FileTask(
        "cruxeval-o",
        "CRUXEval cruxeval.jsonl",
        files.load_cruxeval,
        lambda pr, chat: _as_chat(
            CRUX_OUTPUT.format(code=pr["code"], call=f"f({pr['input']})", **_CRUX_EXAMPLES), chat
        ),
        ("[/ANSWER]",),
        lambda r, pr, chat: _predicted_output(r, f"f({pr['input']})"),
        _prediction_programs("output"),
        ("pass",),
        _PREDICTION_LIMITS,
        False,
    ),
    "cruxeval-i": FileTask(
        "cruxeval-i",
        "CRUXEval cruxeval.jsonl",
        files.load_cruxeval,
        lambda pr, chat: _as_chat(CRUX_INPUT.format(code=pr["code"], output=pr["output"]), chat),
        ("[/ANSWER]",),
        _crux_input_answer,
        _prediction_programs("input"),
        ("pass",),
        _PREDICTION_LIMITS,
        False,
    ),
    "lcb-codegen": FileTask(
        "lcb-codegen",
        "a LiveCodeBench code-generation .jsonl",
        files.load_lcb_codegen,
        _lcb_prompt,
        (),
        _lcb_code,
        lambda pr, code: {"pass": checks.tests_program(pr["task_id"], code, pr["tests"], pr["func_name"])},
        ("pass",),
        Limits(cpu_seconds=60, wall_seconds=90, address_space_bytes=2 << 30, memory_bytes=4 << 30),
        True,
    ),
    "lcb-execution": FileTask(
        "lcb-execution",
        "a LiveCodeBench execution .jsonl",
        files.load_lcb_execution,
        lambda pr, chat: _as_chat(CRUX_OUTPUT.format(code=pr["code"], call=pr["input"], **_LCB_EXAMPLES), chat),
        ("[/ANSWER]",),
        lambda r, pr, chat: _predicted_output(r, pr["input"]),
        _prediction_programs("output", LCB_EXECUTION_PRELUDE),
        ("pass",),
        _PREDICTION_LIMITS,
        False,
    ),
}
PREDICTION_MAX_NEW_TOKENS = 128  # an [ANSWER] line


def _verdicts(task: FileTask, passed: dict[str, bool]) -> dict[str, bool]:
    """EvalPlus's plus counts only with the base tests passed too; every other task has one program."""
    if task.verdicts == ("base", "plus"):
        return {"base": passed["base"], "plus": passed["base"] and passed["plus"]}
    return {"pass": passed["pass"]}


def run_file_task(
    engine: Engine,
    tokenizer: Any,
    s: EvalSettings,
    done: dict[str, Any],
    save: Save,
    allow_code_execution: bool,
    task: FileTask,
    path: str,
) -> dict[str, Any]:
    """Generate, extract and check every problem of `path`; pass@k per verdict. Resumes from `done`."""
    problems = task.load(path)[: s.file_limit]
    ids = [p["task_id"] for p in problems]
    if len(set(ids)) != len(ids):
        raise LoopcoderError(f"{path}: task ids repeat (e.g. {next(i for i in ids if ids.count(i) > 1)!r})")
    chat = s.prompt_style == "chat"
    stops = [] if chat else list(task.stops)
    stop_ids = chat_stop_ids(engine.eos_ids, tokenizer)
    max_new = s.humaneval_max_new_tokens if task.writes_code else PREDICTION_MAX_NEW_TOKENS
    per_problem: dict[str, Any] = done.setdefault("problems", {})
    todo = [p for p in problems if p["task_id"] not in per_problem]
    meter = task_progress(task.name, len(todo) * s.n_samples)
    for start in range(0, len(todo), s.chunk):
        chunk = todo[start : start + s.chunk]
        prompts = [task.prompt(p, chat) for p in chunk for _ in range(s.n_samples)]
        params = [s.sampling(max_new, stops, stop_ids, i) for _ in chunk for i in range(s.n_samples)]
        outs = complete(engine, tokenizer, prompts, params, progress=meter)
        jobs, answers = [], []
        for j, p in enumerate(chunk):
            for o in outs[j * s.n_samples : (j + 1) * s.n_samples]:
                answer = None if o["skipped"] else task.extract(o["text"], p, chat)
                answers.append(answer)
                if answer is not None:
                    jobs += [(len(answers) - 1, name, prog) for name, prog in task.programs(p, answer).items()]
        batch = (
            run_many(
                [prog for *_, prog in jobs], task.limits, workers=s.workers, allow_code_execution=allow_code_execution
            )
            if jobs
            else None
        )
        status: list[dict[str, str]] = [{} for _ in answers]
        for (k, name, _), result in zip(jobs, batch.results if batch else []):
            status[k][name] = result.status
        for j, p in enumerate(chunk):
            rows = range(j * s.n_samples, (j + 1) * s.n_samples)
            verdicts = [_verdicts(task, {n: status[k].get(n) == "passed" for n in task.verdicts}) for k in rows]
            per_problem[p["task_id"]] = {
                "n": s.n_samples,
                "answers": [answers[k] for k in rows],
                "statuses": [status[k] for k in rows],
                "correct": {v: [x[v] for x in verdicts] for v in verdicts[0]},
                "finish_reasons": [outs[k]["finish_reason"] for k in rows],
                "skipped": next((outs[k]["skipped"] for k in rows if outs[k]["skipped"]), None),
            }
        save()
    if todo:
        meter.finish()
    done.update(
        {
            "file": str(path),
            "problems_total": len(problems),
            "skipped_prompts": sum(1 for i in ids if per_problem[i]["skipped"]),
            "pass_at_k": {
                v: {
                    f"pass@{k}": x
                    for k, x in mean_pass_at_k(
                        [(per_problem[i]["n"], sum(per_problem[i]["correct"][v])) for i in ids], s.ks
                    ).items()
                }
                for v in task.verdicts
            },
            "sandbox": isolation_report(),
        }
    )
    return done
