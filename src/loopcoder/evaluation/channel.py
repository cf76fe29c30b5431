"""Both sides of a checked run's channel, as program text: plain data between a program and its checker.

A checked run (`sandbox.Checked`) runs the model's code in one process (the program) and the trusted
check in another (the checker); `sandbox_launcher.py` joins them with two pipes and passes their
numbers in sys.argv. This module writes the code each side starts with:

- `PROGRAM_SIDE` defines `_serve(functions)`: it answers the checker's calls of those functions, one
  request per line, with the result as plain data or the exception's name and message. It runs after
  the model's code, in the model's process, so the model can change it: that only changes what the
  checker is told, never how the checker judges it.
- `CHECKER_SIDE` defines `_remote(name)`, a function that calls `name` in the program and returns the
  result rebuilt from plain data (or raises `ProgramError`), and `_load(filename, source, namespace)`.

Plain data is what `benchmark_files.encode_value` writes (its own source runs on both sides) and
`_decode` reads: None, bools, ints, floats (NaN and infinities too), strings, and lists, tuples, sets,
dicts and complex numbers of them, as tagged JSON. The checker builds only these builtin types from it,
so a program's object (one whose `__eq__` is always true, a subclass with its own methods) never
reaches the comparison, and the checker's code, its expected values and its evidence of completion
never enter the program's process.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from typing import Any

from loopcoder.evaluation.benchmark_files import encode_value

# Rebuilds `benchmark_files.encode_value`'s tagged JSON as builtin types only.
DECODE = """\
def _decode(x):
    if isinstance(x, list):
        return [_decode(i) for i in x]
    if isinstance(x, dict):
        if "__tuple__" in x:
            return tuple(_decode(i) for i in x["__tuple__"])
        if "__set__" in x:
            return set(_decode(i) for i in x["__set__"])
        if "__complex__" in x:
            return complex(*x["__complex__"])
        if "__dict__" in x:
            return {_decode(k): _decode(v) for k, v in x["__dict__"]}
        raise ValueError("not plain data: a JSON object without a known tag")
    return x
"""


def _without_annotations(function: Callable[..., Any]) -> str:
    """A function's source for the sandbox's interpreter, where its annotations' names do not exist."""
    tree = ast.parse(inspect.getsource(function))
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            node.annotation = None
        elif isinstance(node, ast.FunctionDef):
            node.returns = None
    return ast.unparse(tree) + "\n"


# Plain data out: `benchmark_files.encode_value` itself, its source run in the sandbox's interpreter.
ENCODE = _without_annotations(encode_value) + "\n\n_encode = encode_value\n"

LOAD = """\
def _load(filename, source, namespace):
    _linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show lines
    exec(compile(source, filename, "exec"), namespace)
    return namespace
"""

PROGRAM_SIDE = (
    """\
import json as _json
import linecache as _linecache
import os as _os
import sys as _sys

_requests, _replies = _os.fdopen(int(_sys.argv[1]), "rb"), _os.fdopen(int(_sys.argv[2]), "wb")
_dumps, _loads = _json.dumps, _json.loads  # bound before the model's code runs: it may patch json
del _sys.argv[1:]
"""
    + DECODE
    + ENCODE
    + LOAD
    + """

def _serve(functions):
    for line in _requests:
        request = _loads(line)
        try:
            value = functions[request["call"]](*_decode(request["args"]), **_decode(request["kwargs"]))
            reply = {"value": _encode(value)}
        except BaseException as e:  # the checker decides what an exception means
            reply = {"error": type(e).__name__ + ": " + str(e)[:1000]}
        try:
            text = _dumps(reply)
        except (ValueError, RecursionError) as e:  # e.g. a structure too deep to write
            text = _dumps({"error": type(e).__name__ + ": " + str(e)[:1000]})
        _replies.write(text.encode() + b"\\n")
        _replies.flush()
"""
)

CHECKER_SIDE = (
    """\
import json as _json
import linecache as _linecache
import os as _os
import sys as _sys

_replies, _requests = _os.fdopen(int(_sys.argv[1]), "rb"), _os.fdopen(int(_sys.argv[2]), "wb")
del _sys.argv[1:]
_REPLY_CAP = 256 << 20


class ProgramError(Exception):
    \"\"\"The program raised, answered with something that is not plain data, or did not answer.\"\"\"

"""
    + DECODE
    + ENCODE
    + LOAD
    + """

def _remote(name):
    def call(*args, **kwargs):
        request = {"call": name, "args": _encode(list(args)), "kwargs": _encode(kwargs)}
        try:
            _requests.write(_json.dumps(request).encode() + b"\\n")
            _requests.flush()
        except BrokenPipeError:
            raise ProgramError("the program ended before answering") from None
        line = _replies.readline(_REPLY_CAP)
        if not line:
            raise ProgramError("the program ended before answering")
        if not line.endswith(b"\\n"):
            raise ProgramError("the program's answer is longer than %d bytes" % _REPLY_CAP)
        try:
            reply = _json.loads(line)
            if "error" in reply:
                raise ProgramError("the program raised " + str(reply["error"]))
            return _decode(reply["value"])
        except (ValueError, TypeError, KeyError, RecursionError) as e:
            raise ProgramError("the program's answer is not plain data (%s)" % e) from None

    call.__name__ = name
    return call
"""
)


def program_side(header: str) -> str:
    """The start of a checked run's program: a comment naming it, then the channel's program side."""
    return f"# {header}\n{PROGRAM_SIDE}\n"


def checker_side(header: str) -> str:
    """The start of a checked run's checker: a comment naming it, then the channel's checker side."""
    return f"# {header}\n{CHECKER_SIDE}\n"
