"""Problem statements written from the failing behaviour, as a user would report it.

What a statement holds: which tests of the module's suite fail, and for up to three of them the
traceback as the test runner printed it, cut to the test's own frames and the exception: the
assertion that failed, with what was expected and what came instead. It never looks at the bug's
diff: frames inside the buggy module are left out, so the statement does not point at the line.
"""

from __future__ import annotations

import re

MAX_DETAILED = 3
MAX_MESSAGE_CHARS = 600
MAX_FRAMES = 3
_ADDRESS = re.compile(r"\b0x[0-9a-f]{6,}\b")
_FRAME = re.compile(r'^  File "(?P<path>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')


def short_name(test_id: str) -> str:
    """`tests/test_x.py::Class::test_y` -> `Class.test_y`."""
    return ".".join(test_id.split("::")[1:]) or test_id


def excerpt(traceback: str) -> str:
    """The test's own frames (at most the last three) and the exception; paths are relative to the repository
    (the runner's tracebacks, with the repository's directory taken out)."""
    lines = traceback.rstrip("\n").split("\n")
    if lines and lines[0].startswith("Traceback"):
        lines = lines[1:]
    frames: list[list[str]] = []
    message: list[str] = []
    i = 0
    while i < len(lines):
        m = _FRAME.match(lines[i])
        if m:
            frame = [lines[i]]
            i += 1
            while i < len(lines) and lines[i].startswith("    "):
                frame.append(lines[i])
                i += 1
            if m.group("path").startswith("tests/"):  # the test's frames; not the library's, not the module's
                frames.append([f for f in frame if not set(f.strip()) <= set("^~ ")])
        elif lines[i].startswith("During handling") or lines[i].startswith("The above exception"):
            frames, message = [], []  # the last exception of a chain is the one that failed the test
            i += 1
        elif lines[i].startswith("Traceback"):
            i += 1
        else:
            message.append(lines[i])
            i += 1
    text = _ADDRESS.sub("0x...", "\n".join(message).strip())  # `<object at 0x7f...>` differs from run to run
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + " ..."
    body = ["Traceback (most recent call last):", *[x for f in frames[-MAX_FRAMES:] for x in f], text]
    return "\n".join(body)


def problem_statement(module: str, test_files: list[str], failing: list[str], traces: dict[str, str]) -> str:
    """The issue text of a task: `failing` are its FAIL_TO_PASS ids, `traces` the runner's tracebacks."""
    names = [short_name(t) for t in failing]
    head = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} other test{'s' * (len(names) > 2)}"
    modules = " ".join(f.removesuffix(".py").replace("/", ".") for f in test_files)
    out = [
        f"`{module}`: {head} fail{'s' if len(names) == 1 else ''}",
        "",
        f"Regression tests of `{module}` fail on this version. They are not in this repository's `tests/` "
        f"(they are added when a fix is checked, with `python3 -m unittest {modules}`); the failing tests:",
        "",
        *[f"- {n}" for n in names[:20]],
        *([f"- ... and {len(names) - 20} more"] if len(names) > 20 else []),
        "",
    ]
    for test in failing[:MAX_DETAILED]:
        if test in traces:
            out += [f"{short_name(test)}:", "", "```", excerpt(traces[test]), "```", ""]
    out.append(f"Expected: these tests pass, as they did before, without breaking the other tests of `{module}`.")
    return "\n".join(out)
