"""`loopcoder`: one command, many subcommands.

Each subcommand lives in its own module, imported only when it runs, so a broken optional dependency
only affects its own command. A module provides `add_arguments(parser)` and `run(args) -> int` (or
`PASSTHROUGH = True` and `run(argv) -> int` for a command that hands its arguments to another tool).
Its module level imports nothing heavy: torch, transformers and the rest are imported inside `run()`,
so `loopcoder --help`, `loopcoder CMD --help` and `--version` answer without importing torch
(tests/commands/test_cli.py checks every parser).

Bad input raises `LoopcoderError` (or `ConfigError`): the CLI prints one line, `loopcoder <command>:
error: ...`, and exits with status 2. So does an `OSError` (a full disk, a read-only or missing path),
naming the file, and so does a bad command line: an unknown command, option or config key names the
nearest known one. `--help` shows every option's default.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import importlib
import sys
from collections.abc import Callable
from typing import Any

import loopcoder
from loopcoder.utils.errors import ConfigError, LoopcoderError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("loopcoder.commands.demo", "the main job on the embedded default (what `make demo` runs)"),
    "study": ("loopcoder.commands.study", "the loop-count study: train, tune, evaluate, diagnose R=1,2,3; report"),
    "diagnose": ("loopcoder.commands.diagnose", "per-loop diagnostics (spec 3), report, loop-count advice"),
    "init": ("loopcoder.commands.init", "write a randomly initialised PLT model directory"),
    "export": ("loopcoder.commands.export", "add HF remote-code files: the model loads without loopcoder installed"),
    "data": ("loopcoder.commands.data", "build tokenizer and packed shards; write instruction and reasoning sets"),
    "eval": ("loopcoder.commands.eval", "HumanEval (sandboxed), code reasoning by difficulty, bits per byte"),
    "swe": ("loopcoder.commands.swe", "agentic SWE evaluation, offline: task set, agent, scoring, reports"),
    "bfcl": ("loopcoder.commands.bfcl", "BFCL's AST categories (tool calls) scored by BFCL's own checker"),
    "lm-eval": ("loopcoder.commands.lm_eval", "lm-evaluation-harness with the loopcoder backend registered (its CLI)"),
    "generate": ("loopcoder.commands.generate", "complete a prompt with the parallel-loop decode engine"),
    "chat": ("loopcoder.commands.chat", "a multi-turn chat in the terminal (the model's chat template, streamed)"),
    "serve": ("loopcoder.commands.serve", "OpenAI-compatible HTTP server: completions, chat, tool calls, streaming"),
    "bench": ("loopcoder.commands.bench", "benchmarks: decode (and train, serve)"),
    "train": ("loopcoder.commands.train", "pretrain from scratch on packed shards (single process or torchrun)"),
    "sft": ("loopcoder.commands.sft", "instruction-tune a checkpoint with the same engine and loss masks"),
    "plan": ("loopcoder.commands.plan", "parameters, FLOPs/token, memory and the largest batch that fits"),
    "plot": ("loopcoder.commands.plot", "training curves (loss, validation, bits per byte, LR) of runs as a PNG"),
}


def nearest(word: str, choices: Any) -> str | None:
    """The closest of `choices` to a mistyped `word` (difflib), or None."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with every option's default: `(default: 128)` after the help text, unless the
    text already says what happens by default (a default of None: "default: the model's")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.required
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            or (not action.option_strings and action.nargs not in ("?", "*"))
            or (isinstance(default, (list, tuple)) and not default)
            or "(default" in text
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help:  # argparse prints nothing for an option without help: show its default
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """Every loopcoder parser: defaults in `--help`, and a bad command line is one line on stderr (no
    usage block) with exit status 2; an unknown option names the nearest known one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)  # subcommands' parsers too
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        parsed, extras = self.parse_known_args(argv, namespace)
        if extras:
            self.error(self._unrecognized(argv, extras))
        return parsed

    def _unrecognized(self, argv: list[str], extras: list[str]) -> str:
        parser: argparse.ArgumentParser = self  # the (sub)command the options were meant for
        for word in argv:
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction) and word in action.choices:
                    parser = action.choices[word]
        options = [o for a in parser._actions for o in a.option_strings]
        word = extras[0]
        if not word.startswith("-"):
            return f"unexpected argument {word!r}"
        name = word.split("=", 1)[0]
        close = nearest(name, options)
        hint = f"did you mean {close}?" if close else f"`{parser.prog} --help` lists the options"
        return f"unknown option {name}; {hint}"

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="loopcoder",
        description="Parallel Loop Transformer (LoopCoder-v2) code models: build, train, decode, evaluate, diagnose.",
        epilog="`loopcoder COMMAND --help` shows a command's options and their defaults.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"loopcoder {loopcoder.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str, module: Any = None, parser_class: type[Parser] = Parser) -> argparse.ArgumentParser:
    """The parser of `loopcoder NAME` (its module's `add_arguments`). Importing a command module and
    building its parser imports no torch."""
    module = module or importlib.import_module(COMMANDS[name][0])
    parser = parser_class(prog=f"loopcoder {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"loopcoder {loopcoder.__version__}")
        return 0
    if argv[0] not in COMMANDS:
        close = nearest(argv[0], COMMANDS)
        hint = f"did you mean {close}?" if close else f"choose from {', '.join(COMMANDS)}"
        print(f"loopcoder: error: unknown command {argv[0]!r}; {hint}", file=sys.stderr)
        return 2
    name = argv[0]
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except LoopcoderError as e:  # an optional dependency of this command is missing: its import says which
        print(f"loopcoder {name}: error: {e}", file=sys.stderr)
        return 2
    if getattr(module, "PASSTHROUGH", False):  # another tool's command line, handed over as it is
        return run_command(name, module.run, argv[1:])
    args = command_parser(name, module).parse_args(argv[1:])  # --help ends here, before any heavy import
    return run_command(name, module.run, args)


def run_command(name: str, fn: Callable[[Any], Any], args: Any) -> int:
    """Run a command; user errors become one line on stderr and exit status 2."""
    try:
        from loopcoder.utils.runtime import quiet_libraries  # imports transformers: only for a command that runs

        quiet_libraries()
        return int(fn(args) or 0)
    except (LoopcoderError, ConfigError) as e:
        print(f"loopcoder {name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (disk full, permission, read-only): name the file
        where = f" ({e.filename})" if e.filename else ""
        print(f"loopcoder {name}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loopcoder {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
