"""Every fenced shell and Python block of README.md and docs/*.md runs as written, at small sizes.

The rule: a reader who follows a page top to bottom, in a fresh clone, typing exactly what the page
shows, runs every command with nothing else typed. So a page that needs a model, data or a file SHOWS
the commands that make them (`loopcoder data build ...`, `loopcoder train ...`), in a block of its own
before the first block that uses them; nothing is made behind the reader's back.

How to keep this test passing when you write or change docs:

- Every fenced block needs a language. `bash` (or `sh`, `shell`) and `python` blocks are run; any other
  language is not (`text` for output, directory layouts, formulas and diagrams; `yaml`, `json`, ...).
- Each page runs in its own empty scratch directory, as a fresh clone's root would look after `make`:
  `.venv`, `src` and `benchmarks` are links to this checkout's, nothing else is there. Its blocks run in
  page order, so a block may use only what an earlier block of the same page made (`data/stdlib`,
  `runs/r2`, ...), or a file of the repository. `loopcoder` and `python` are this checkout's. `loopcoder`
  commands and Python blocks run in a process forked from a warm one that has imported the package
  (tests/support/warm_cli.py): the same `cli.main(argv)` as the console script, without 5 s of imports each.
- `test_blocks_use_only_paths_an_earlier_block_made` checks this before anything runs: a path given to
  `--model`, `--init`, `--data`, `--tokenizer`, `--config` (unless a preset), `--json-schema`,
  `--grammar`, `data.dir=` or `init=` must be one an earlier run block of the page wrote (`--out P`,
  `out=P`, `> P`, `mkdir P`, `cat > P`) or a file of the repository. A placeholder such as `DIR` fails it:
  name a directory the page made. Skipped blocks make nothing (they do not run).
- HTML comments on the lines right before a block (GitHub does not show them) adjust how it runs:
    <!-- doc-test: skip REASON -->          do not run it; say why (it needs a GPU, it runs for minutes and
                                            a named test covers it, ...). Keep these few.
    <!-- doc-test: replace OLD => NEW -->   run the block with OLD replaced by NEW: smaller sizes, a small
                                            corpus, a free port. The page keeps showing what a user would
                                            type. NEW changes arguments only: no new command, redirection
                                            or path that a later block relies on (no `;`, `&&`, `|`, `>`,
                                            `<`, backticks, `$(`, newlines).
    <!-- doc-test: background -->           a server: start it, wait until $DOCTEST_PORT answers /health,
                                            stop it (SIGTERM) after the page's last block
  Directives may repeat. There is no `setup` directive: what a block needs, an earlier block shows.
  In NEW, these are set (and expanded):
    $DOCTEST_CORPUS  a small Python corpus (this package's sources) for `data build --source`
    $DOCTEST_TINY    a YAML config: the `tiny` preset at test size (2 steps of a 32-wide model)
    $DOCTEST_PORT    a free port on 127.0.0.1
- Inline `loopcoder ...` commands outside blocks are parsed: the command and every flag they name must
  exist (missing required arguments are fine: inline text often names one option; so are placeholders in
  capitals, `--vocab-size V`; a synopsis with `[...]` or `...` is not parsed).

This test is slow (marked so); `-k PAGE` runs one page.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
WARM = ROOT / "tests" / "support" / "warm_cli.py"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python"}
TINY_YAML = """base: tiny
model: {hidden_size: 32, layers: 1, heads: 4, kv_heads: 2, intermediate_size: 64, window: 8}
train: {steps: 2, global_batch_size: 2, threads: 1}
eval: {every: 0, max_batches: 1, batch_size: 2}
checkpoint: {every: 0}
logging: {progress: "off", tensorboard: false}
sft: {train: {steps: 2}, eval: {every: 0}, checkpoint: {every: 0}}
"""

FENCE = re.compile(r"^(```+)(.*)$")
DIRECTIVE = re.compile(r"^<!--\s*doc-test:\s*(\w+)\s*(.*?)\s*-->$")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    directives: list[tuple[str, str]] = field(default_factory=list)

    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def get(self, name: str) -> list[str]:
        return [arg for kind, arg in self.directives if kind == name]


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, each with the doc-test directives on the lines just before it."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        directives, j = [], i - 1
        while j >= 0 and (d := DIRECTIVE.match(lines[j].strip())):
            directives.insert(0, (d.group(1), d.group(2)))
            j -= 1
        end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith(m.group(1)))
        out.append(Block(page.name, i + 1, m.group(2).strip(), "\n".join(lines[i + 1 : end]) + "\n", directives))
        i = end + 1
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """One warm `loopcoder` for every page (tests/support/warm_cli.py): a command costs a fork, not the
    5 s of imports a fresh interpreter pays."""
    sock = tmp_path_factory.mktemp("warm") / "cli.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(WARM), "serve", str(sock)], env=env)
    deadline = time.monotonic() + 300
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the warm loopcoder did not start"
        time.sleep(0.1)
    yield sock
    proc.terminate()
    proc.wait(60)


def environment(scratch: Path, sock: Path) -> dict[str, str]:
    """The page's directory `scratch` holds only what a fresh clone's root has after `make` (links); the
    test's own files live beside it, out of the page's sight."""
    scratch.mkdir()
    (scratch.parent / "doctest-tiny.yaml").write_text(TINY_YAML)
    for name, target in ((".venv", Path(sys.prefix)), ("src", ROOT / "src"), ("benchmarks", ROOT / "benchmarks")):
        (scratch / name).symlink_to(target)
    bin_dir = scratch.parent / "bin"
    bin_dir.mkdir()
    (bin_dir / "loopcoder").write_text(f'#!/bin/sh\nexec {sys.executable} {WARM} run {sock} "$@"\n')
    (bin_dir / "loopcoder").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCTEST_")}
    env.update(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")]),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT / "src"),
        DOCTEST_CORPUS=str(ROOT / "src" / "loopcoder"),
        DOCTEST_TINY=str(scratch.parent / "doctest-tiny.yaml"),
        DOCTEST_PORT=str(free_port()),
        DOCTEST_SOCKET=str(sock),
        HF_HUB_OFFLINE="1",
        HF_HOME=str(scratch.parent / "hf"),
        MPLBACKEND="Agg",
    )
    return env


def prepared(block: Block, env: dict[str, str]) -> str:
    code = block.code
    for rule in block.get("replace"):
        old, sep, new = rule.partition(" => ")
        assert sep and old, f"{block.where()}: write `replace OLD => NEW`"
        assert old in code, f"{block.where()}: `replace {old} => ...`: {old!r} is not in the block"
        code = code.replace(old, re.sub(r"\$(DOCTEST_\w+)", lambda m: env[m.group(1)], new))
    return code


def run_code(block: Block, code: str, scratch: Path, env: dict[str, str], background: bool = False):
    if RUN[block.lang] == "python":
        script = scratch.parent / f"block-{block.line}.py"
        script.write_text(code)
        cmd = [sys.executable, str(WARM), "script", env["DOCTEST_SOCKET"], str(script)]  # `python script`, warm
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
    if background:
        return subprocess.Popen(
            cmd,
            cwd=scratch,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    r = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (
        f"{block.where()} ({block.lang}) failed:\n{code}\n--- stdout\n{r.stdout[-3000:]}"
        f"\n--- stderr\n{r.stderr[-3000:]}"
    )
    return None


def wait_for_server(proc: subprocess.Popen, port: str, where: str) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{where}: the server exited with {proc.returncode}:\n{proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{where}: no server on port {port} after 180 s")


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_blocks_of_a_page_run_as_written(page, tmp_path, warm):
    scratch = tmp_path / "page"
    env = environment(scratch, warm)
    servers: list[subprocess.Popen] = []
    try:
        for block in blocks(page):
            if block.lang not in RUN or block.get("skip"):
                continue
            code = prepared(block, env)
            if any(kind == "background" for kind, _ in block.directives):
                servers.append(run_code(block, code, scratch, env, background=True))
                wait_for_server(servers[-1], env["DOCTEST_PORT"], block.where())
            else:
                run_code(block, code, scratch, env)
    finally:
        for proc in servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


# ---------------------------------------------------------------------------------------------- conventions
def test_every_block_names_its_language_and_every_skip_a_reason():
    problems = []
    for page in PAGES:
        for b in blocks(page):
            if not b.lang:
                problems.append(f"{b.where()}: a fenced block without a language (`text` if it is not to be run)")
            for kind, arg in b.directives:
                if kind == "setup":
                    problems.append(
                        f"{b.where()}: doc-test: setup makes what the reader never sees; show the commands "
                        "that make it in a block before this one (see the top of tests/test_docs.py)"
                    )
                elif kind not in ("skip", "replace", "background"):
                    problems.append(f"{b.where()}: unknown directive doc-test: {kind}")
                elif kind in ("skip", "replace") and not arg:
                    problems.append(f"{b.where()}: doc-test: {kind} needs {'a reason' if kind == 'skip' else 'text'}")
                elif kind == "replace" and (bad := re.search(r"[;&|<>`\n]|\$\(", arg.partition(" => ")[2])):
                    problems.append(
                        f"{b.where()}: doc-test: replace adds {bad.group()!r}: a replacement may change "
                        "arguments (sizes, a port), not add commands, redirections or paths"
                    )
            if b.directives and b.lang not in RUN:
                problems.append(f"{b.where()}: doc-test directives on a `{b.lang}` block, which is never run")
    assert not problems, "\n".join(problems)


def test_the_skip_list_is_short():
    skipped = [f"{b.where()}: {b.get('skip')[0]}" for p in PAGES for b in blocks(p) if b.get("skip")]
    assert len(skipped) <= 16, "too many skipped blocks; make them run at small sizes instead:\n" + "\n".join(skipped)


class _Refused(Exception):
    pass


def _parse(argv: list[str]) -> None:
    from loopcoder.cli import COMMANDS, Parser, command_parser

    class Refusing(Parser):  # the command's own parser (subcommands too), raising instead of exiting
        def error(self, message: str):
            raise _Refused(message)

    if not argv or argv[0] in ("-h", "--help", "-V", "--version"):
        return
    if argv[0] not in COMMANDS:
        raise _Refused(f"unknown command {argv[0]!r}")
    module = importlib.import_module(COMMANDS[argv[0]][0])
    if getattr(module, "PASSTHROUGH", False):  # another tool's command line (lm-eval): not ours to check
        return
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            command_parser(argv[0], module, parser_class=Refusing).parse_args(argv[1:])
        except SystemExit as e:  # `loopcoder CMD --help` printed its help: a real command
            if e.code:
                raise _Refused(f"exit status {e.code}") from None


def inline_commands(page: Path) -> list[tuple[str, str]]:
    text = re.sub(r"^(```+).*?^\1", "", page.read_text(), flags=re.S | re.M)  # outside fenced blocks
    found = []
    for span in re.findall(r"`(loopcoder [^`]+)`", text):
        if any(s in span for s in ("...", "[", "error:")) or not re.match(r"loopcoder (-|[a-z])", span):
            continue  # a synopsis, a message or an entry point (`loopcoder = module:Class`), not a command
        for alternative in _alternatives(span.replace("\\|", "|")):
            found.append((page.name, alternative))
    return found


def _alternatives(span: str) -> list[str]:
    """`loopcoder bench decode|train|serve` is three commands."""
    words = shlex.split(span)
    for i, w in enumerate(words):
        if "|" in w and not w.startswith("-"):
            return [x for alt in w.split("|") for x in _alternatives(shlex.join([*words[:i], alt, *words[i + 1 :]]))]
    return [shlex.join(words)]


def test_inline_commands_name_real_commands_and_flags():
    problems = []
    for page in PAGES:
        for name, command in inline_commands(page):
            try:
                _parse(shlex.split(command)[1:])
            except _Refused as e:
                placeholder = re.search(r"invalid \w+ value: '[A-Z][A-Z0-9_]*'", str(e))  # --vocab-size V
                required = (
                    "the following arguments are required",
                    "one of the arguments",
                )  # inline text names one option
                if not any(r in str(e) for r in required) and not placeholder:
                    problems.append(f"{name}: `{command}`: {e}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------- paths
PRESETS = ("tiny", "small", "7b")
# where a command reads a path, and where a block writes one
USES = re.compile(
    r"(?:--model|--init|--data|--tokenizer|--config|--json-schema|--grammar)(?:\s+|=)(\S+)|(?:^|\s)(?:data\.dir|init)=(\S+)"
)
MAKES = re.compile(r"(?:--out(?:\s+|=)|(?:^|\s)out=)(\S+)|>\s*(\S+)|\bmkdir\s+(?:-p\s+)?(\S+)")


def _shell_text(code: str) -> str:
    """A shell block as one logical text: continuation lines joined, comments dropped."""
    code = code.replace("\\\n", " ")
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in code.splitlines())


def _clean(path: str) -> str:
    path = path.rstrip(";&|)").strip("'\"").rstrip("/")  # `--out runs/r$R; done`
    return path[2:] if path.startswith("./") else path


def _made_pattern(path: str) -> re.Pattern:
    """A written path as a pattern: `runs/r$R` (a loop's) is any `runs/r...`."""
    parts = re.split(r"\$\{?\w+\}?", _clean(path))
    return re.compile("[^/]+".join(map(re.escape, parts)) + "(/.*)?")


def unmade_paths(page: Path) -> list[str]:
    """Paths a run block reads that no earlier run block of the page wrote, and that are not files of the
    repository: what a reader following the page would not have."""
    made: list[re.Pattern] = []
    problems = []
    for block in blocks(page):
        if RUN.get(block.lang) != "shell" or block.get("skip"):
            continue
        for text in _shell_text(block.code).splitlines():  # line by line: a line may use what one above made
            problems += _unmade(block, text, made, page.name)
            made += [_made_pattern(m.group(1) or m.group(2) or m.group(3)) for m in MAKES.finditer(text)]
    return problems


def _unmade(block: Block, line: str, made: list[re.Pattern], page_name: str) -> list[str]:
    """The paths one line of a block reads that are neither `made` nor in the repository."""
    problems = []
    for m in USES.finditer(line):
        path = _clean(m.group(1) or m.group(2))
        path = path.partition("=")[2] if "=" in path else path  # --data TASK=FILE
        if (
            not path
            or "$" in path  # a shell variable: what it holds is not known here
            or path.startswith(("/", "-"))
            or (m.group(0).startswith("--config") and path in PRESETS)
            or (ROOT / path).exists()
            or any(p.fullmatch(path) for p in made)
        ):
            continue
        problems.append(f"{block.where()}: {m.group(0).strip()!r}: no earlier block of {page_name} makes {path!r}")
    return problems


def test_blocks_use_only_paths_an_earlier_block_made():
    problems = [p for page in PAGES for p in unmade_paths(page)]
    assert not problems, (
        "blocks that read what the page never makes (show the commands that make it in an earlier block; "
        "see the top of tests/test_docs.py):\n" + "\n".join(problems)
    )


def test_the_path_check_sees_a_missing_path(tmp_path):
    """The check above on a made-up page, so that a check that sees nothing cannot pass."""
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nloopcoder data build --out data/stdlib\n"
        "for R in 1 2; do loopcoder train --config tiny --data data/stdlib/ --loops $R --out runs/r$R; done\n```\n\n"
        "```bash\nloopcoder diagnose --model runs/r2 --data val.jsonl --out diag/\n"
        "loopcoder export --model DIR --out exported   # a placeholder\n```\n\n"
        "<!-- doc-test: skip needs a GPU -->\n```bash\nloopcoder init --out models/m\n```\n\n"
        "```bash\nloopcoder generate --model models/m \\\n   --prompt x\n```\n"
    )
    problems = unmade_paths(page)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "'--data val.jsonl': no earlier block of page.md makes 'val.jsonl'",
        "'--model DIR': no earlier block of page.md makes 'DIR'",
        "'--model models/m': no earlier block of page.md makes 'models/m'",  # a skipped block makes nothing
    ]
