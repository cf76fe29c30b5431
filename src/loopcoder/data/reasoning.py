"""Synthetic code reasoning: short Python programs whose printed output is the answer.

A program is a chain of `steps` dependent steps: each step reads the value the previous step produced
(an int, a short string or a short list of ints) and computes a new one with arithmetic, string or list
operations, a conditional, a `for` or `while` loop, or a call to a helper function defined above.
Every step changes the value, and no step is undone later: a program is kept only if replacing any
one step by the identity changes the printed output. So the answer needs `steps` sequential
computations: the knob for "more steps need more depth" in loop-count studies. Optional distractors
are assignments the answer does not depend on.

Answers come from running the program (in-process `exec`, stdout captured; these are our own
programs, with no I/O, randomness or hashing, so the output is deterministic). Values are kept small
(|int| <= 999, strings <= 10 letters/digits, lists <= 6 ints) so programs and answers stay short.

Train/eval disjointness is structural: a program belongs to "eval" when the hash of its canonical
form (variables and helpers renamed in order of appearance, `ast.unparse`d) falls in a fixed 20 %
of the hash space, and to "train" otherwise. The generator for a split only emits programs of that
split, whatever the seed, so no program (up to renaming) can be in both.

Three prompt styles: "completion" (base models: the program, then `# Output: `), "chat" (instruction
models: a user turn asking for the output) and "cruxeval" (CRUXEval's output prediction:
`assert f(x) == ??` inside [PYTHON] tags, answered inside [ANSWER] tags). `extract_answer` and
`is_correct` score a model's completion by exact match.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import hashlib
import io
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.progress import Progress

EVAL_SHARE = 0.2
MAX_STEPS = 12
STYLES = ("completion", "chat", "cruxeval")
SPLITS = ("train", "eval")
# Chain variables avoid the names used inside templates (i: loop index, x: comprehension variable,
# n/s/items/total/result: helper parameters and locals) and the helper names.
_VARS = ("a", "b", "c", "d", "e", "j", "r", "t", "u", "v", "w", "y", "z")
_HELPERS = ("g", "h", "k", "m", "p", "q", "gg", "hh", "kk", "mm", "pp", "qq")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_MAX_INT = 999
_MAX_STR = 10
_MAX_LIST = 6

Template = Callable[[random.Random, str, str, Any], tuple[list[str], list[str] | None]]


def _rk(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randint(lo, hi)


# --- step templates: (rng, u = input variable, v = output variable, value of u) -> (lines, helper) ----------
# A helper is returned with the name "HELPER", replaced by a fresh name when the step is accepted.


def _int_templates() -> list[Template]:
    def arith(rng, u, v, _):
        op, k = rng.choice(
            [
                ("+", _rk(rng, 1, 9)),
                ("-", _rk(rng, 1, 9)),
                ("*", _rk(rng, 2, 4)),
                ("//", _rk(rng, 2, 4)),
                ("%", _rk(rng, 3, 9)),
            ]
        )
        return [f"{v} = {u} {op} {k}"], None

    def rsub(rng, u, v, _):
        return [f"{v} = {_rk(rng, 10, 50)} - {u}"], None

    def builtin(rng, u, v, _):
        k = _rk(rng, 1, 20)
        return [rng.choice([f"{v} = max({u}, {k})", f"{v} = min({u}, {k})", f"{v} = abs({u} - {k})"])], None

    def if_block(rng, u, v, _):
        cond = rng.choice(
            [f"{u} > {_rk(rng, 0, 20)}", f"{u} % 2 == 0", f"{u} < {_rk(rng, 0, 20)}", f"{u} % 3 == {_rk(rng, 0, 2)}"]
        )
        a, b = rng.sample(
            [f"{u} + {_rk(rng, 1, 9)}", f"{u} - {_rk(rng, 1, 9)}", f"{u} * {_rk(rng, 2, 3)}", f"{u} // 2"], 2
        )
        return [f"if {cond}:", f"    {v} = {a}", "else:", f"    {v} = {b}"], None

    def if_expr(rng, u, v, _):
        k = _rk(rng, 0, 20)
        return [f"{v} = {u} + {_rk(rng, 1, 9)} if {u} < {k} else {u} - {_rk(rng, 1, 9)}"], None

    def for_loop(rng, u, v, _):
        body = rng.choice(
            [f"{v} = {v} + i", f"{v} = {v} * 2", f"{v} = {v} - {_rk(rng, 1, 5)}", f"{v} += i * {_rk(rng, 2, 3)}"]
        )
        head = [] if v == u else [f"{v} = {u}"]
        return [*head, f"for i in range({_rk(rng, 2, 4)}):", f"    {body}"], None

    def while_loop(rng, u, v, val):
        k = _rk(rng, 1, 15)
        body = rng.choice([f"{v} = {v} - {_rk(rng, 2, 9)}", f"{v} = {v} // 2"])
        head = [] if v == u else [f"{v} = {u}"]
        return [*head, f"while {v} > {k}:", f"    {body}"], None

    def call(rng, u, v, _):
        helper = rng.choice(
            [
                ["def HELPER(n):", f"    return n * {_rk(rng, 2, 3)} + {_rk(rng, 1, 9)}"],
                ["def HELPER(n):", "    if n % 2 == 0:", "        return n // 2", f"    return n + {_rk(rng, 1, 9)}"],
                [
                    "def HELPER(n):",
                    "    total = 0",
                    f"    for i in range({_rk(rng, 2, 4)}):",
                    "        total += n - i",
                    "    return total",
                ],
            ]
        )
        return [f"{v} = HELPER({u})"], helper

    def to_str(rng, u, v, _):
        c = rng.choice(_LETTERS)
        return [
            rng.choice(
                [f"{v} = str({u})", f"{v} = str({u}) + '{c}'", f"{v} = '{c}' * ({u} % 4 + 1)", f"{v} = str({u})[::-1]"]
            )
        ], None

    def to_list(rng, u, v, _):
        k = _rk(rng, 1, 5)
        return [
            rng.choice(
                [
                    f"{v} = [{u}, {u} + {k}, {u} * 2]",
                    f"{v} = list(range({u} % 5 + 1))",
                    f"{v} = [x * {u} for x in range(3)]",
                    f"{v} = [{u} % {k + 2}, {u} // {k + 2}]",
                ]
            )
        ], None

    return [
        arith,
        arith,
        arith,
        rsub,
        builtin,
        if_block,
        if_block,
        if_expr,
        for_loop,
        for_loop,
        while_loop,
        call,
        call,
        to_str,
        to_list,
    ]


def _str_templates() -> list[Template]:
    def transform(rng, u, v, val):
        c = rng.choice(val) if val else "a"
        d = rng.choice(_LETTERS)
        return [
            rng.choice(
                [
                    f"{v} = {u}.upper()",
                    f"{v} = {u}[::-1]",
                    f"{v} = {u} + '{d}'",
                    f"{v} = {u}[1:]",
                    f"{v} = {u}[:3]",
                    f"{v} = {u}.replace('{c}', '{d}')",
                    f"{v} = {u} * 2",
                    f"{v} = {u}[0] + {u}[-1]",
                    f"{v} = ''.join(sorted({u}))",
                ]
            )
        ], None

    def to_int(rng, u, v, val):
        c = rng.choice(val) if val else "a"
        return [
            rng.choice(
                [
                    f"{v} = len({u})",
                    f"{v} = {u}.count('{c}')",
                    f"{v} = {u}.find('{c}')",
                    f"{v} = len({u}) * {_rk(rng, 2, 5)}",
                ]
            )
        ], None

    def if_block(rng, u, v, val):
        c = rng.choice(val) if val else "a"
        d = rng.choice(_LETTERS)
        cond = rng.choice([f"'{c}' in {u}", f"len({u}) > {_rk(rng, 2, 6)}", f"{u}.startswith('{c}')"])
        a, b = rng.sample([f"{u} + '{d}'", f"{u}[::-1]", f"{u}.upper()", f"{u}[1:]"], 2)
        return [f"if {cond}:", f"    {v} = {a}", "else:", f"    {v} = {b}"], None

    def loop(rng, u, v, val):
        d = rng.choice(_LETTERS)
        head = [] if v == u else [f"{v} = {u}"]
        body = rng.choice([f"{v} = {v}[1:] + {v}[0]", f"{v} = {v} + '{d}'"])
        return [*head, f"for i in range({_rk(rng, 2, 3)}):", f"    {body}"], None

    def call(rng, u, v, _):
        helper = rng.choice(
            [
                ["def HELPER(s):", f"    return s[::-1] + '{rng.choice(_LETTERS)}'"],
                [
                    "def HELPER(s):",
                    "    result = ''",
                    "    for x in s:",
                    "        if x not in result:",
                    "            result += x",
                    "    return result",
                ],
            ]
        )
        return [f"{v} = HELPER({u})"], helper

    return [transform, transform, transform, to_int, to_int, if_block, loop, call]


def _list_templates() -> list[Template]:
    def transform(rng, u, v, _):
        k = _rk(rng, 1, 9)
        return [
            rng.choice(
                [
                    f"{v} = {u} + [{k}]",
                    f"{v} = sorted({u})",
                    f"{v} = {u}[::-1]",
                    f"{v} = [x * {_rk(rng, 2, 3)} for x in {u}]",
                    f"{v} = [x + {k} for x in {u}]",
                    f"{v} = [x for x in {u} if x % 2 == 0]",
                    f"{v} = {u}[1:]",
                    f"{v} = {u}[:2]",
                ]
            )
        ], None

    def mutate(rng, u, v, _):
        return [
            rng.choice(
                [
                    f"{u}.append({_rk(rng, 1, 9)})",
                    f"{u}.reverse()",
                    f"{u}.sort()",
                    f"{u}.insert(0, {_rk(rng, 1, 9)})",
                    f"{u}.pop()",
                ]
            )
        ], None

    mutate.mutates = True  # in place: the chain continues in the same variable

    def to_int(rng, u, v, _):
        return [
            rng.choice(
                [
                    f"{v} = sum({u})",
                    f"{v} = len({u})",
                    f"{v} = max({u})",
                    f"{v} = min({u})",
                    f"{v} = {u}[0]",
                    f"{v} = {u}[-1]",
                    f"{v} = {u}[0] + {u}[-1]",
                ]
            )
        ], None

    def loop(rng, u, v, _):
        return [
            f"{v} = 0",
            f"for x in {u}:",
            f"    if x > {_rk(rng, 0, 5)}:",
            f"        {v} += x",
            "    else:",
            f"        {v} -= {_rk(rng, 1, 3)}",
        ], None

    def to_str(rng, u, v, _):
        return [f"{v} = ''.join(str(x) for x in {u})"], None

    def call(rng, u, v, _):
        helper = rng.choice(
            [
                [
                    "def HELPER(items):",
                    "    total = 0",
                    "    for x in items:",
                    "        total += x",
                    f"    return total * {_rk(rng, 2, 3)}",
                ],
                [
                    "def HELPER(items):",
                    "    result = []",
                    "    for x in items:",
                    f"        if x > {_rk(rng, 0, 5)}:",
                    "            result.append(x)",
                    "    return result",
                ],
            ]
        )
        return [f"{v} = HELPER({u})"], helper

    return [transform, transform, transform, mutate, to_int, to_int, loop, to_str, call]


def _digit_templates() -> list[Template]:
    """The "digits" family: one-digit values, each step modular arithmetic on the previous one. Nothing
    to learn but the chain itself, so small models trained for minutes can show what depth buys."""

    def add(rng, u, v, _):
        return [f"{v} = ({u} + {_rk(rng, 1, 9)}) % 10"], None

    def mul(rng, u, v, _):
        return [f"{v} = ({u} * {_rk(rng, 2, 9)}) % 10"], None

    def rsub(rng, u, v, _):
        return [f"{v} = ({_rk(rng, 1, 9)} - {u}) % 10"], None

    return [add, add, mul, rsub]


_TEMPLATES: dict[type, list[Template]] = {int: _int_templates(), str: _str_templates(), list: _list_templates()}
FAMILIES: dict[str, dict[type, list[Template]]] = {
    "mixed": _TEMPLATES,
    "digits": {int: _digit_templates()},
    "chains": {},
}


def _in_bounds(val: Any) -> bool:
    if isinstance(val, bool):
        return False
    if isinstance(val, int):
        return abs(val) <= _MAX_INT
    if isinstance(val, str):
        return 1 <= len(val) <= _MAX_STR and val.isalnum() and val.isascii()
    if isinstance(val, list):
        return len(val) <= _MAX_LIST and all(
            isinstance(x, int) and not isinstance(x, bool) and abs(x) <= _MAX_INT for x in val
        )
    return False


def _exec(code: str, env: dict[str, Any]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<program>", "exec"), env)
    return out.getvalue()


def run_program(program: str) -> str:
    """Execute a generated program and return what it prints (without the final newline)."""
    return _exec(program, {"__builtins__": builtins.__dict__}).rstrip("\n")


_BUILTIN_NAMES = frozenset(dir(builtins))


class _Canon(ast.NodeTransformer):
    """Renames variables, parameters and functions to v0, v1, ... in order of first appearance."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def _name(self, name: str) -> str:
        if name in _BUILTIN_NAMES:
            return name
        return self.names.setdefault(name, f"v{len(self.names)}")

    def visit_Name(self, node: ast.Name) -> ast.AST:
        node.id = self._name(node.id)
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.name = self._name(node.name)
        self.generic_visit(node)
        return node

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.arg = self._name(node.arg)
        return node


def canonical_form(program: str) -> str:
    """The program with every name renamed by order of appearance: equal for programs equal up to renaming."""
    return ast.unparse(_Canon().visit(ast.parse(program)))


def program_hash(program: str) -> str:
    return hashlib.sha256(canonical_form(program).encode()).hexdigest()


def split_of_program(program: str) -> str:
    """ "eval" for a fixed EVAL_SHARE of canonical programs, "train" for the rest (independent of any seed)."""
    return _split_of_hash(program_hash(program))


def _split_of_hash(h: str) -> str:
    return "eval" if int(h[:12], 16) / 16**12 < EVAL_SHARE else "train"


def _render(init_var: str, init_value: Any, helpers: list[list[str]], body: list[str], result: str) -> tuple[str, str]:
    head = "".join("\n".join(h) + "\n\n" for h in helpers)
    program = head + f"{init_var} = {init_value!r}\n" + "".join(line + "\n" for line in body) + f"print({result})\n"
    function = head + f"def f({init_var}):\n" + "".join(f"    {line}\n" for line in body) + f"    return {result}\n"
    return program, function


def _one_program(rng: random.Random, steps: int, distractors: int, family: str = "mixed") -> dict[str, Any] | None:
    """One random chain of `steps` accepted steps, or None when no step fits (the caller draws again).

    `chain` in the result is what `_every_step_matters` needs; the caller checks it.
    """
    names = list(_VARS)
    rng.shuffle(names)
    helper_names = list(_HELPERS)
    rng.shuffle(helper_names)
    kind = rng.choice([int, int, str, list]) if family == "mixed" else int
    if family == "digits":
        init: Any = rng.randint(0, 9)
    elif kind is int:
        init: Any = rng.randint(0, 20)
    elif kind is str:
        init = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 5)))
    else:
        init = [rng.randint(0, 9) for _ in range(rng.randint(3, 4))]
    x0 = names.pop()
    env: dict[str, Any] = {"__builtins__": builtins.__dict__, x0: init}
    helpers: list[list[str]] = []
    blocks: list[list[str]] = []  # one per step: a statement, or a block (if/for/while)
    ablations: list[list[str]] = []  # per step: the same step made the identity
    int_names: list[list[str]] = [[x0] if kind is int else []]  # int variables defined after each step
    cur = x0
    for _ in range(steps):
        for _attempt in range(40):
            val = env[cur]
            fresh = bool(names) and rng.random() < 0.8  # else the step reassigns the current variable
            v = names[-1] if fresh else cur
            lines, helper, mutates = _draw(rng, cur, v, val, family)
            if helper is not None:
                if not helper_names:
                    continue
                helper = [h.replace("HELPER", helper_names[-1]) for h in helper]
                lines = [ln.replace("HELPER", helper_names[-1]) for ln in lines]
            out = cur if mutates else v
            trial = {**env, cur: list(val) if isinstance(val, list) else val}
            try:
                _exec("\n".join((helper or []) + lines) + "\n", trial)
            except Exception:  # a bad combination (index out of range, max of []): draw another step
                continue
            if not _in_bounds(trial.get(out)) or trial.get(out) == val:
                continue  # too big, or a step that changes nothing
            env = trial
            if helper is not None:
                helpers.append(helper)
                helper_names.pop()
            if out != cur:
                names.pop()
            blocks.append(lines)
            ablations.append([f"{out} = {cur}"] if out != cur else [])
            cur = out
            int_names.append([n for n in int_names[-1] if n != cur] + ([cur] if isinstance(env[cur], int) else []))
            break
        else:
            return None
    chain = (x0, init, [list(h) for h in helpers], list(blocks), ablations, cur)  # for _every_step_matters
    # Distractors: fresh variables the answer does not read, placed between steps; they may read an int
    # variable defined at that point, so they look like part of the computation.
    for _ in range(distractors):
        if not names:
            break
        w = names.pop()
        pos = rng.randint(0, len(blocks))
        src = rng.choice([str(rng.randint(1, 20)), *int_names[pos]])
        blocks.insert(pos, [f"{w} = {src} {rng.choice(['+', '-', '*'])} {rng.randint(1, 9)}"])
        int_names.insert(pos + 1, int_names[pos])  # distractors never read each other
    body = [line for block in blocks for line in block]
    program, function = _render(x0, init, helpers, body, cur)
    return {"program": program, "function": function, "input": repr(init), "chain": chain}


_CHAIN_VARS = tuple("abcdeghjkmpqrtuvwyz")


def _chain_program(rng: random.Random, steps: int, distractors: int) -> dict[str, Any] | None:
    """The "chains" family: variable tracking. The printed variable is a copy of a copy ... (`steps` hops)
    of a one-digit root; two more chains of copies, with other roots, are interleaved with it in a random
    order (plus `distractors` extra roots), so the answer is found only by following the hops back."""
    names = list(_CHAIN_VARS)
    rng.shuffle(names)
    lengths = [steps] + [rng.randint(0, steps) for _ in range(2)] + [0] * distractors
    if sum(n + 1 for n in lengths) > len(names):
        return None
    values = rng.sample(range(10), len(lengths))
    chains = []
    for n, value in zip(lengths, values):
        var = [names.pop() for _ in range(n + 1)]
        chains.append([f"{var[0]} = {value}"] + [f"{var[i]} = {var[i - 1]}" for i in range(1, n + 1)])
    main_root, main_last = chains[0][0].split(" = ")[0], chains[0][-1].split(" = ")[0]
    order = [c for c, chain in enumerate(chains) for _ in chain]
    rng.shuffle(order)  # a random interleaving that keeps each chain's own order
    pos = [0] * len(chains)
    lines = []
    for c in order:
        lines.append(chains[c][pos[c]])
        pos[c] += 1
    program = "".join(line + "\n" for line in lines) + f"print({main_last})\n"
    body = [line for line in lines if line != chains[0][0]]
    function = f"def f({main_root}):\n" + "".join(f"    {line}\n" for line in body) + f"    return {main_last}\n"
    return {"program": program, "function": function, "input": repr(values[0]), "chain": None}


def _every_step_matters(
    x0: str, init: Any, helpers: list[list[str]], blocks: list[list[str]], ablations: list[list[str]], result: str
) -> bool:
    """True when replacing any one step by the identity changes the output (no step is undone later)."""

    def output(bs: list[list[str]]) -> str | None:
        try:
            return run_program(_render(x0, init, helpers, [ln for b in bs for ln in b], result)[0])
        except Exception:
            return None

    full = output(blocks)
    return all(output([*blocks[:i], ablations[i], *blocks[i + 1 :]]) != full for i in range(len(blocks)))


def _draw(
    rng: random.Random, u: str, v: str, val: Any, family: str = "mixed"
) -> tuple[list[str], list[str] | None, bool]:
    """A random step on `u`'s type: (lines, helper or None, whether it mutates `u` in place)."""
    template = rng.choice(FAMILIES[family][type(val)])
    lines, helper = template(rng, u, v, val)
    return lines, helper, getattr(template, "mutates", False)


def parse_steps(spec: str | int | Sequence[int]) -> list[int]:
    """`3`, `"1-6"` or `"1,2,4"` -> a list of step counts in [1, MAX_STEPS]."""
    if isinstance(spec, int):
        values = [spec]
    elif isinstance(spec, str):
        try:
            if re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", spec):
                lo, hi = (int(x) for x in spec.split("-"))
                values = list(range(lo, hi + 1))
            else:
                values = [int(x) for x in spec.split(",")]
        except ValueError:
            raise LoopcoderError(f"steps {spec!r}: expected N, LO-HI or N,M,...") from None
    else:
        values = [int(x) for x in spec]
    if not values or any(not 1 <= s <= MAX_STEPS for s in values):
        raise LoopcoderError(f"steps {spec!r}: each step count must be in [1, {MAX_STEPS}]")
    return values


def generate_examples(
    n: int,
    steps: int | str | Sequence[int],
    seed: int = 0,
    split: str = "train",
    distractors: int = 0,
    progress: bool = False,
    family: str = "mixed",
) -> list[dict[str, Any]]:
    """`n` distinct examples {id, program, answer, steps, ...} of the given split; deterministic in the seed.

    `family` "mixed" (ints, strings, lists, conditionals, loops, helper functions), "digits" (one-digit
    modular arithmetic chains) or "chains" (variable tracking: follow `steps` copies back to a root among
    interleaved distractor chains; the cleanest probe of depth for small models).

    `steps` is a count or several (each example draws one). Every answer comes from running the program.
    Each example also has `function`/`input`/`answer_repr`, the CRUXEval form (`f(input) == answer_repr`).
    With `progress`, counts, rate and ETA go to stderr.
    """
    if split not in SPLITS:
        raise LoopcoderError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if n < 0:
        raise LoopcoderError(f"number of examples {n} must not be negative")
    if distractors < 0:
        raise LoopcoderError(f"distractors {distractors} must not be negative")
    if family not in FAMILIES:
        raise LoopcoderError(f"family {family!r}: expected one of {', '.join(FAMILIES)}")
    choices = parse_steps(steps)
    # The step counts are part of the seed: sets of different difficulty do not share program prefixes.
    tag = "" if family == "mixed" else f":{family}"
    rng = random.Random(f"loopcoder-reasoning:{seed}:{split}:{choices}:{distractors}{tag}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    attempts = 0
    meter = Progress(f"reasoning ({split})", n, "examples") if progress else None
    k = rng.choice(choices)
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise LoopcoderError(f"could only generate {len(out)} distinct {split} programs of {choices} steps")
        # The step count is drawn once per example and kept until a program succeeds: longer chains
        # are rejected more often, and redrawing would skew the mix towards short ones.
        if family == "chains":
            prog = _chain_program(rng, k, distractors)
        else:
            prog = _one_program(rng, k, distractors, family)
        if prog is None:
            continue
        h = program_hash(prog["program"])
        # The cheap checks first: most candidates of the eval split fail the split test. (Chains need no
        # step check: the answer is reached only through every hop.)
        if (
            h in seen
            or _split_of_hash(h) != split
            or (prog["chain"] is not None and not _every_step_matters(*prog["chain"]))
        ):
            continue
        seen.add(h)
        answer = run_program(prog["program"])
        env: dict[str, Any] = {"__builtins__": builtins.__dict__}
        _exec(prog["function"], env)
        value = env["f"](ast.literal_eval(prog["input"]))
        out.append(
            {
                "id": f"{split}-s{k}-{h[:12]}",
                "split": split,
                "steps": k,
                "distractors": distractors,
                "program": prog["program"],
                "answer": answer,
                "function": prog["function"],
                "input": prog["input"],
                "answer_repr": repr(value),
            }
        )
        k = rng.choice(choices)
        if meter is not None:
            meter.advance()
    if meter is not None:
        meter.finish()
    return out


# --- prompts and scoring ---------------------------------------------------------------------------------

CHAT_INSTRUCTION = "What does this Python program print? Reply with the output only."


def completion_prompt(example: dict[str, Any]) -> str:
    return example["program"] + "# Output: "


def cruxeval_prompt(example: dict[str, Any]) -> str:
    call = f"f({example['input']})"
    return f"[PYTHON]\n{example['function']}assert {call} == ??\n[/PYTHON]\n[ANSWER]\nassert {call} == "


def chat_prompt(example: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{CHAT_INSTRUCTION}\n\n```python\n{example['program']}```"}]


def format_prompt(example: dict[str, Any], style: str = "completion") -> str | list[dict[str, str]]:
    """The prompt in one of STYLES: a string for "completion" and "cruxeval", messages for "chat"."""
    if style == "completion":
        return completion_prompt(example)
    if style == "cruxeval":
        return cruxeval_prompt(example)
    if style == "chat":
        return chat_prompt(example)
    raise LoopcoderError(f"prompt style {style!r}: expected one of {', '.join(STYLES)}")


def target(example: dict[str, Any], style: str = "completion") -> str:
    """What a perfect model writes after the prompt (answer plus the style's terminator)."""
    if style == "cruxeval":
        return f"{example['answer_repr']}\n[/ANSWER]"
    if style in ("completion", "chat"):
        return example["answer"] + ("\n" if style == "completion" else "")
    raise LoopcoderError(f"prompt style {style!r}: expected one of {', '.join(STYLES)}")


def to_text(example: dict[str, Any], style: str = "completion") -> str:
    """Prompt + answer as one training document (styles "completion" and "cruxeval")."""
    if style == "chat":
        raise LoopcoderError("style 'chat' is a conversation: use to_chat_messages")
    return format_prompt(example, style) + target(example, style)  # type: ignore[operator]


def to_chat_messages(example: dict[str, Any]) -> list[dict[str, str]]:
    """The example as a user/assistant conversation, for SFT mixing."""
    return [*chat_prompt(example), {"role": "assistant", "content": example["answer"]}]


_PREFIX = re.compile(r"^(?:the\s+)?(?:program\s+)?(?:output|answer|prints?)(?:\s+is)?\s*[:=]?\s*", re.I)


def extract_answer(completion: str, style: str = "completion") -> str:
    """The predicted answer in a model's completion (the text after the prompt)."""
    text = completion.replace("<|im_end|>", "\n").replace("<|endoftext|>", "\n")
    if style == "cruxeval":
        text = text.split("[/ANSWER]")[0]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            return ""
        line = lines[0]
        if line.startswith("assert") and "==" in line:
            line = line.split("==", 1)[1]
        return line.strip()
    if style not in STYLES:
        raise LoopcoderError(f"prompt style {style!r}: expected one of {', '.join(STYLES)}")
    if style == "chat":
        text = re.sub(r"```[a-zA-Z]*", "\n", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    return _PREFIX.sub("", lines[0]).strip() if style == "chat" else lines[0]


def _literal(text: str) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def is_correct(example: dict[str, Any], completion: str, style: str = "completion") -> bool:
    """Exact match of the extracted answer.

    Printed output ("completion", "chat") is compared as text, ignoring spaces ("[1,2]" matches
    "[1, 2]"; our answers never contain spaces otherwise); CRUXEval literals compare by value and type
    ('abc' matches "abc").
    """
    got = extract_answer(completion, style)
    if style != "cruxeval":
        return got.replace(" ", "") == example["answer"].replace(" ", "")
    ok_a, a = _literal(got)
    ok_b, b = _literal(example["answer_repr"])
    return got == example["answer_repr"] or (ok_a and ok_b and type(a) is type(b) and a == b)
