"""Readers for the benchmark files a user supplies: EvalPlus (HumanEval+, MBPP+), CRUXEval, LiveCodeBench.

Each reader checks the fields it needs and returns one dict per problem with a `task_id`; a file in
the wrong format is one error naming the file, the line and the missing field. Nothing is downloaded.

- EvalPlus `HumanEvalPlus.jsonl.gz` / `MbppPlus.jsonl.gz` (the EvalPlus releases; `.jsonl` too):
  `task_id`, `prompt`, `entry_point`, `canonical_solution`, `base_input`, `plus_input`, `atol`. MBPP+
  stores some inputs as JSON lists where the functions take tuples, sets or complex numbers; they are
  converted per task as EvalPlus does (`MBPP_PLUS_INPUTS`).
- CRUXEval `cruxeval.jsonl`: `id`, `code`, `input`, `output` (Python source of a call's arguments and
  of its result).
- LiveCodeBench code generation (`test.jsonl` ... of `livecodebench/code_generation_lite`):
  `question_id`, `question_content`, `starter_code`, `public_test_cases`, `private_test_cases`,
  `metadata`. The private tests are JSON, or base64 of zlib of a *pickled* JSON string. We never
  unpickle: `pickletools.genops` walks the opcodes without executing any, and only a pickle that holds
  exactly one string (and framing opcodes) is accepted; anything else is refused.
- LiveCodeBench code execution (`livecodebench/execution-v2`): `id`, `code`, `input` (a call,
  e.g. `f(x = 1)`), `output`.
"""

from __future__ import annotations

import base64
import binascii
import json
import pickletools
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loopcoder.data.corpus import iter_jsonl
from loopcoder.utils.errors import LoopcoderError

EVALPLUS_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input")
CRUXEVAL_FIELDS = ("id", "code", "input", "output")
LCB_CODEGEN_FIELDS = ("question_id", "question_content", "public_test_cases", "private_test_cases")
LCB_EXECUTION_FIELDS = ("id", "code", "input", "output")


class BenchmarkFileError(LoopcoderError):
    """A benchmark file that cannot be read as the format it was given for."""


def read_jsonl(path: str | Path, fields: tuple[str, ...], fmt: str) -> list[dict[str, Any]]:
    """The problems of a `.jsonl` or `.jsonl.gz` file, each an object with `fields` (else an error naming
    the file, the line and the field)."""
    p = Path(path)
    if not p.is_file():
        raise BenchmarkFileError(f"benchmark file {str(path)!r} does not exist")
    rows = []
    try:
        for where, row in iter_jsonl(p):
            if not isinstance(row, dict):
                raise BenchmarkFileError(f"{where}: a problem must be a JSON object")
            missing = [f for f in fields if f not in row]
            if missing:
                raise BenchmarkFileError(f"{where}: no {missing[0]!r} field: not a {fmt} file")
            rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise BenchmarkFileError(f"cannot read {p}: {e}") from None
    if not rows:
        raise BenchmarkFileError(f"{p}: no problems in the file")
    return rows


# ----------------------------------------------------------------------------- EvalPlus
def _tuples(x: Any) -> Any:
    return tuple(_tuples(i) for i in x) if isinstance(x, list) else x


# MBPP+ task number -> how its JSON inputs become the arguments the functions take (EvalPlus v0.2.0's
# mbpp_deserialize_inputs, restated). Each rule maps one input (the list of arguments) to another.
_ARGS_AS_TUPLES = lambda inp: [tuple(a) for a in inp]
_RULES: list[tuple[set[int], Callable[[list], list]]] = [
    (
        {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726, 740, 744, 809},
        _ARGS_AS_TUPLES,
    ),
    (
        {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780},
        lambda inp: [[tuple(x) for x in a] for a in inp],
    ),
    ({75, 413, 444, 753}, lambda inp: [[tuple(x) for x in inp[0]], inp[1]]),
    ({106, 750}, lambda inp: [inp[0], tuple(inp[1])]),
    ({115}, lambda inp: [[set(i) if isinstance(i, list) and i else {} for i in inp[0]]]),
    ({124}, lambda inp: [float(inp[0]), complex(inp[1])]),
    ({250, 405, 446, 617, 720, 763, 808}, lambda inp: [tuple(inp[0]), inp[1]]),
    ({259, 401, 445}, lambda inp: [tuple(tuple(x) for x in a) for a in inp]),
    ({278}, lambda inp: [tuple(tuple(i) if isinstance(i, list) else i for i in inp[0])]),
    ({307}, lambda inp: [tuple(inp[0]), inp[1], inp[2]]),
    ({722}, lambda inp: [{k: tuple(v) for k, v in inp[0].items()}, *inp[1:]]),
    ({252}, lambda inp: [complex(inp[0])]),
    ({580, 615, 791}, _tuples),
]
MBPP_PLUS_INPUTS = {n: rule for ids, rule in _RULES for n in ids}

# Problems whose outputs are not compared with ==, as EvalPlus special-cases them (v0.3.x):
# entry point -> oracle name understood by `checks.differential_program`.
EVALPLUS_ORACLES = {
    "humaneval": {"find_zero": "poly_root"},
    "mbpp": {
        "are_equivalent": "always",
        "sum_div": "exact_or_zero",
        "surface_Area": "surface_area",
        "digit_distance_nums": "digit_distance",
        **{
            e: "set_equal"
            for e in (
                "similar_elements",
                "find_char_long",
                "common_in_nested_lists",
                "extract_singly",
                "larg_nnum",
                "intersection_array",
                "find_dissimilar",
                "Diff",
            )
        },
        **{e: "not_none" for e in ("check_str", "text_match_three", "text_starta_endb")},
    },
}


def load_evalplus(path: str | Path, dataset: str) -> list[dict[str, Any]]:
    """HumanEval+ (`dataset="humaneval"`) or MBPP+ (`"mbpp"`) problems, inputs as the functions take them."""
    rows = read_jsonl(path, EVALPLUS_FIELDS, "EvalPlus")
    for row in rows:
        row.setdefault("atol", 0)
        row["oracle"] = EVALPLUS_ORACLES[dataset].get(row["entry_point"], "exact")
        if dataset == "mbpp":
            rule = MBPP_PLUS_INPUTS.get(int(str(row["task_id"]).rsplit("/", 1)[-1]))
            if rule is not None:
                row["base_input"] = [rule(i) for i in row["base_input"]]
                row["plus_input"] = [rule(i) for i in row["plus_input"]]
    return rows


def encode_value(x: Any) -> Any:
    """A Python value (tuples, sets, complex, non-string dict keys) as JSON, tagged so that
    `channel.DECODE` rebuilds it exactly; anything else is not plain data (TypeError). Checked runs
    use this function's own source inside the sandbox (`channel.py`): it needs nothing but builtins."""
    if isinstance(x, tuple):
        return {"__tuple__": [encode_value(i) for i in x]}
    if isinstance(x, (set, frozenset)):
        return {"__set__": [encode_value(i) for i in x]}
    if isinstance(x, complex):
        return {"__complex__": [encode_value(x.real), encode_value(x.imag)]}
    if isinstance(x, dict):
        return {"__dict__": [[encode_value(k), encode_value(v)] for k, v in x.items()]}
    if isinstance(x, list):
        return [encode_value(i) for i in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x  # numbers (inf and nan too: json writes them as Infinity and NaN), strings, bools, None
    raise TypeError(f"not plain data: {type(x).__name__}")


# ----------------------------------------------------------------------------- CRUXEval
def load_cruxeval(path: str | Path) -> list[dict[str, Any]]:
    rows = read_jsonl(path, CRUXEVAL_FIELDS, "CRUXEval")
    return [{**r, "task_id": str(r["id"])} for r in rows]


# ----------------------------------------------------------------------------- LiveCodeBench
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_FRAMING_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"}


def pickled_string(data: bytes) -> str:
    """The one string a pickle holds, read opcode by opcode. Nothing is unpickled, so nothing can run:
    a pickle with any other opcode (a global, a call, a container) is refused."""
    strings = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _STRING_OPS:
                strings.append(arg)
            elif op.name not in _FRAMING_OPS:
                raise BenchmarkFileError(
                    f"the private tests hold a pickle {op.name} opcode, not just a string: refusing to read it"
                )
    except ValueError as e:
        raise BenchmarkFileError(f"the private tests are not a valid pickle ({e})") from None
    if len(strings) != 1:
        raise BenchmarkFileError(f"the private tests pickle holds {len(strings)} strings, expected one")
    return strings[0]


def decode_lcb_tests(value: Any, where: str) -> list[dict[str, str]]:
    """LiveCodeBench test cases: a JSON list, or base64(zlib(pickle(JSON string)))."""
    if isinstance(value, list):
        tests = value
    else:
        try:
            tests = json.loads(value)
        except ValueError:
            try:
                raw = zlib.decompress(base64.b64decode(str(value).encode(), validate=True))
            except (binascii.Error, zlib.error) as e:
                raise BenchmarkFileError(f"{where}: test cases neither JSON nor base64+zlib ({e})") from None
            try:
                tests = json.loads(pickled_string(raw))
            except BenchmarkFileError as e:
                raise BenchmarkFileError(f"{where}: {e}") from None
    if not isinstance(tests, list) or any(
        not isinstance(t, dict) or not {"input", "output", "testtype"} <= set(t) for t in tests
    ):
        raise BenchmarkFileError(f"{where}: test cases must be objects with input, output and testtype")
    bad = [t["testtype"] for t in tests if t["testtype"] not in ("stdin", "functional")]
    if bad:
        raise BenchmarkFileError(f"{where}: unknown testtype {bad[0]!r} (stdin or functional)")
    return tests


def load_lcb_codegen(path: str | Path) -> list[dict[str, Any]]:
    rows = read_jsonl(path, LCB_CODEGEN_FIELDS, "LiveCodeBench code-generation")
    out = []
    for n, r in enumerate(rows, 1):
        where = f"{Path(path).name}:{n}"
        meta = r.get("metadata") or {}
        meta = json.loads(meta) if isinstance(meta, str) else meta
        tests = decode_lcb_tests(r["public_test_cases"], where) + decode_lcb_tests(r["private_test_cases"], where)
        if not tests:
            raise BenchmarkFileError(f"{where}: no test cases")
        functional = tests[0]["testtype"] == "functional"
        if functional and not meta.get("func_name"):
            raise BenchmarkFileError(f"{where}: functional tests but no metadata.func_name")
        out.append(
            {
                "task_id": str(r["question_id"]),
                "question_content": r["question_content"],
                "starter_code": r.get("starter_code") or "",
                "tests": tests,
                "func_name": meta.get("func_name") if functional else None,
                "difficulty": r.get("difficulty"),
                "contest_date": r.get("contest_date"),
            }
        )
    return out


def load_lcb_execution(path: str | Path) -> list[dict[str, Any]]:
    rows = read_jsonl(path, LCB_EXECUTION_FIELDS, "LiveCodeBench execution")
    return [{**r, "task_id": str(r["id"])} for r in rows]
