"""Bugs injected into Python source by AST mutation, as SWE-smith's procedural modifications do.

`sites(source)` lists every place one of the five kinds of bug can go, each confined to one line of
a function body; `Mutation.apply(source)` rewrites just that piece of the line (or drops the line),
so the bug's diff, and the gold patch that undoes it, is one line. The kinds:

- `operator`: an arithmetic, bitwise or boolean operator swapped (`+` -> `-`, `and` -> `or`, ...);
- `off_by_one`: an integer literal one more or one less;
- `condition`: a comparison changed (`<` -> `<=`, `==` -> `!=`, `in` -> `not in`) or an `if`/`while`
  test negated;
- `wrong_variable`: a variable read replaced by another local variable of the same function;
- `dropped_call` / `dropped_return`: a statement that is a call, or a `return`, removed.

Which of them are bugs (a test notices) is decided by running the tests (`taskset.py`).
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass

KINDS = ("operator", "off_by_one", "condition", "wrong_variable", "dropped_call", "dropped_return")

_BINARY = {
    ast.Add: ("+", "-"),
    ast.Sub: ("-", "+"),
    ast.Mult: ("*", "//"),
    ast.FloorDiv: ("//", "*"),
    ast.Div: ("/", "*"),
    ast.Mod: ("%", "//"),
    ast.BitAnd: ("&", "|"),
    ast.BitOr: ("|", "&"),
    ast.BitXor: ("^", "&"),
    ast.LShift: ("<<", ">>"),
    ast.RShift: (">>", "<<"),
}
_BOOLEAN = {ast.And: ("and", "or"), ast.Or: ("or", "and")}
_COMPARE = {
    ast.Lt: ("<", "<="),
    ast.LtE: ("<=", "<"),
    ast.Gt: (">", ">="),
    ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="),
    ast.NotEq: ("!=", "=="),
    ast.In: ("in", "not in"),
    ast.NotIn: ("not in", "in"),
    ast.Is: ("is", "is not"),
    ast.IsNot: ("is not", "is"),
}
_MAX_LITERAL = 1 << 16  # larger integers are masks and magic numbers, not counts or indices


@dataclass(frozen=True)
class Mutation:
    """Replace columns [start, end) of line `line` (1-based; character columns) with `new`; `new=None`
    drops the whole line (a statement)."""

    kind: str
    line: int
    start: int
    end: int
    old: str
    new: str | None
    function: str  # the enclosing function's qualified name, for the task's description

    def apply(self, source: str) -> str:
        lines = source.splitlines(keepends=True)
        text = lines[self.line - 1]
        if text[self.start : self.end] != self.old:
            raise ValueError(f"line {self.line} does not hold {self.old!r} at {self.start}")
        if self.new is None:
            del lines[self.line - 1]
        else:
            lines[self.line - 1] = text[: self.start] + self.new + text[self.end :]
        return "".join(lines)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def sites(source: str) -> list[Mutation]:
    """Every mutation of `source` that stays on one line of a function body, in source order."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    found: list[Mutation] = []
    for func, qualname in _functions(tree):
        local_names = _local_names(func)
        for node in _own_nodes(func):
            found += _node_sites(node, lines, qualname, local_names)
        found += _statement_sites(func, lines, qualname)
    # f-string internals carry unreliable columns on older Pythons: keep what really is where it says
    found = [m for m in found if lines[m.line - 1][m.start : m.end] == m.old]
    unique = {(m.line, m.start, m.end, m.new): m for m in found}
    return sorted(unique.values(), key=lambda m: (m.line, m.start, m.end, m.new or "", m.kind))


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]]:
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node, prefix + node.name))
            out += _functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            out += _functions(node, prefix + node.name + ".")
        else:
            out += _functions(node, prefix)
    return out


def _own_nodes(func: ast.AST) -> list[ast.AST]:
    """The nodes of a function's body, not of the functions and classes nested in it (they are their own)."""
    out, todo = [], list(func.body)  # not the arguments' defaults or the decorators
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def _local_names(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = func.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    for node in _own_nodes(func):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.append(node.id)
    return sorted(set(names) - {"self", "cls", "_"})


def _single_line(node: ast.AST) -> bool:
    return getattr(node, "lineno", None) is not None and node.lineno == node.end_lineno


def _columns(lines: list[str], node: ast.AST) -> tuple[int, int]:
    """A node's character columns (ast gives UTF-8 byte offsets)."""
    raw = lines[node.lineno - 1].encode("utf-8")
    return len(raw[: node.col_offset].decode("utf-8")), len(raw[: node.end_col_offset].decode("utf-8"))


def _gap(lines: list[str], left: ast.AST, right: ast.AST) -> tuple[int, int, str]:
    """The text between two sibling nodes on one line (an operator, spaces, brackets)."""
    start = _columns(lines, left)[1]
    end = _columns(lines, right)[0]
    return start, end, lines[left.lineno - 1][start:end]


def _swap_in_gap(
    lines: list[str], left: ast.AST, right: ast.AST, old: str, new: str, kind: str, fn: str
) -> Mutation | None:
    if left.lineno != right.lineno:
        return None
    start, _, text = _gap(lines, left, right)
    word = r"\b" if old[0].isalpha() else ""
    pattern = re.compile(rf"(?<![<>=!*/]){word}{re.escape(old)}{word}(?![<>=*/])")
    hits = list(pattern.finditer(text))
    if len(hits) != 1:  # a comment or a second operator between them: not a place to rewrite blindly
        return None
    a, b = start + hits[0].start(), start + hits[0].end()
    return Mutation(kind, left.lineno, a, b, old, new, fn)


def _node_sites(node: ast.AST, lines: list[str], fn: str, local_names: list[str]) -> list[Mutation]:
    out: list[Mutation | None] = []
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY and _single_line(node):
        old, new = _BINARY[type(node.op)]
        if not (isinstance(node.op, ast.Mod) and isinstance(node.left, (ast.Constant, ast.JoinedStr))):
            out.append(_swap_in_gap(lines, node.left, node.right, old, new, "operator", fn))  # not '%' formatting
    elif isinstance(node, ast.AugAssign) and type(node.op) in _BINARY and _single_line(node):
        old, new = _BINARY[type(node.op)]
        out.append(_swap_in_gap(lines, node.target, node.value, old + "=", new + "=", "operator", fn))
    elif isinstance(node, ast.BoolOp) and _single_line(node):
        old, new = _BOOLEAN[type(node.op)]
        out.append(_swap_in_gap(lines, node.values[0], node.values[1], old, new, "operator", fn))
    elif isinstance(node, ast.Compare) and _single_line(node):
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            old, new = _COMPARE[type(op)]
            out.append(_swap_in_gap(lines, left, right, old, new, "condition", fn))
            left = right
    elif isinstance(node, (ast.If, ast.While)) and _single_line(node.test):
        a, b = _columns(lines, node.test)
        text = lines[node.test.lineno - 1][a:b]
        if isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not):
            inner = node.test.operand
            if _single_line(inner):
                ia, ib = _columns(lines, inner)
                out.append(Mutation("condition", node.test.lineno, a, b, text, lines[inner.lineno - 1][ia:ib], fn))
        else:
            out.append(Mutation("condition", node.test.lineno, a, b, text, f"not ({text})", fn))
    elif (
        isinstance(node, ast.Constant)
        and type(node.value) is int
        and abs(node.value) <= _MAX_LITERAL
        and _single_line(node)
    ):
        a, b = _columns(lines, node)
        text = lines[node.lineno - 1][a:b]
        if text.isdigit():  # a plain decimal literal (not hex, not a `_`-grouped mask)
            for delta in (1, -1):
                if node.value + delta >= 0:
                    out.append(Mutation("off_by_one", node.lineno, a, b, text, str(node.value + delta), fn))
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in local_names:
        others = [n for n in local_names if n != node.id]
        if others:
            # the nearest name in sorted order: deterministic, and often a related variable (lo/hi, i/j)
            i = local_names.index(node.id)
            other = local_names[i + 1] if i + 1 < len(local_names) else local_names[i - 1]
            a, b = _columns(lines, node)
            out.append(Mutation("wrong_variable", node.lineno, a, b, node.id, other, fn))
    return [m for m in out if m is not None]


def _statement_sites(func: ast.AST, lines: list[str], fn: str) -> list[Mutation]:
    out = []
    for node in [func, *_own_nodes(func)]:
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if not isinstance(body, list) or len(body) < 2:  # dropping the only statement leaves no block
                continue
            for stmt in body:
                if not _single_line(stmt) or not _alone_on_line(lines, stmt):
                    continue
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                    kind = "dropped_call"
                elif isinstance(stmt, ast.Return) and stmt.value is not None:
                    kind = "dropped_return"
                else:
                    continue
                text = lines[stmt.lineno - 1]
                out.append(Mutation(kind, stmt.lineno, 0, len(text), text, None, fn))
    return out


def _alone_on_line(lines: list[str], stmt: ast.stmt) -> bool:
    a, b = _columns(lines, stmt)
    text = lines[stmt.lineno - 1]
    rest = text[b:].strip()
    return not text[:a].strip() and (not rest or rest.startswith("#"))
