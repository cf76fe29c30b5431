"""The bug injector: every kind is found, each mutation changes exactly one piece of one line of a
function body, and the sites are the same every time."""

from __future__ import annotations

import ast
import difflib

from loopcoder.swe.mutations import KINDS, sites

SOURCE = '''\
LIMIT = 10  # module level: never mutated


def clamp(values, lo, hi):
    """Keep values in [lo, hi]."""
    out = []
    for v in values:
        if v < lo and hi > 0:
            out.append(lo)
        elif not v > hi:
            out.append(v + 0)
        else:
            out.append(hi)
    total = len(out) * 2
    print(f"{total}")
    return out


class Box:
    def size(self, n=3):
        x = n - 1
        return x
'''


def changed_lines(before: str, after: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def test_every_kind_is_found_and_changes_one_line():
    found = sites(SOURCE)
    assert {m.kind for m in found} == set(KINDS)
    for m in found:
        mutated = m.apply(SOURCE)
        ast.parse(mutated)  # still Python
        diff = changed_lines(SOURCE, mutated)
        if m.new is None:  # a dropped statement: one line removed
            assert len(diff) == 1 and diff[0].startswith("-"), (m, diff)
        else:
            assert len(diff) == 2 and diff[0].startswith("-") and diff[1].startswith("+"), (m, diff)


def test_the_mutations_are_the_expected_edits():
    edits = {(m.kind, m.old.strip(), m.new) for m in sites(SOURCE)}
    assert ("condition", "<", "<=") in edits
    assert ("condition", ">", ">=") in edits
    assert ("operator", "and", "or") in edits
    assert ("operator", "*", "//") in edits
    assert ("operator", "-", "+") in edits
    assert ("condition", "not v > hi", "v > hi") in edits  # a negated test loses its `not`
    assert ("condition", "v < lo and hi > 0", "not (v < lo and hi > 0)") in edits
    assert ("off_by_one", "2", "3") in edits and ("off_by_one", "2", "1") in edits
    assert ("dropped_call", "out.append(hi)", None) not in edits  # the only statement of its block stays
    assert ("dropped_return", "return out", None) in edits
    assert ("dropped_call", 'print(f"{total}")', None) in edits
    assert ("wrong_variable", "lo", "out") in edits  # the next local name in sorted order


def test_nothing_outside_function_bodies_is_mutated():
    lines = SOURCE.splitlines()
    for m in sites(SOURCE):
        assert not lines[m.line - 1].startswith("LIMIT"), m
        assert "def size" not in lines[m.line - 1], m  # the default `n=3` is the signature, not the body
    assert {m.function for m in sites(SOURCE)} == {"clamp", "Box.size"}


def test_sites_are_deterministic_and_unique():
    a, b = sites(SOURCE), sites(SOURCE)
    assert a == b
    assert len({(m.line, m.start, m.end, m.new) for m in a}) == len(a)


def test_a_stale_mutation_refuses_to_apply():
    m = next(m for m in sites(SOURCE) if m.kind == "operator")
    changed = m.apply(SOURCE)
    try:
        m.apply(changed)
    except ValueError as e:
        assert "does not hold" in str(e)
    else:
        raise AssertionError("applying a mutation twice must fail")
