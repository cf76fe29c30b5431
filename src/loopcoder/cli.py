"""`loopcoder`: one command, many subcommands.

Each subcommand lives in its own module, imported only when it runs, so `loopcoder --help` is fast
and a broken optional dependency only affects its own command. A module provides
`add_arguments(parser)` and `run(args) -> int` (or `PASSTHROUGH = True` and `run(argv) -> int` for a
command that hands its arguments to another tool). Bad input raises `LoopcoderError` (or
`ConfigError`): the CLI prints one line, `loopcoder <command>: error: ...`, and exits with status 2.
So does an `OSError` (a full disk, a read-only or missing path), naming the file.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from loopcoder.config import ConfigError
from loopcoder.errors import LoopcoderError
from loopcoder.runtime import quiet_libraries

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("loopcoder.commands.demo", "the main job on the embedded default (what `make demo` runs)"),
    "study": ("loopcoder.commands.study", "the loop-count study: train, tune, evaluate, diagnose R=1,2,3; report"),
    "diagnose": ("loopcoder.commands.diagnose", "per-loop diagnostics (spec 3), report, loop-count advice"),
    "init": ("loopcoder.commands.init", "write a randomly initialised PLT model directory"),
    "export": ("loopcoder.commands.export", "add HF remote-code files: the model loads without loopcoder installed"),
    "data": ("loopcoder.commands.data", "build tokenizer and packed shards; write instruction and reasoning sets"),
    "eval": ("loopcoder.commands.eval", "HumanEval (sandboxed), code reasoning by difficulty, bits per byte"),
    "lm-eval": ("loopcoder.commands.lm_eval", "lm-evaluation-harness with the loopcoder backend registered (its CLI)"),
    "generate": ("loopcoder.commands.generate", "complete a prompt with the parallel-loop decode engine"),
    "serve": ("loopcoder.commands.serve", "OpenAI-compatible HTTP server: completions, chat, tool calls, streaming"),
    "bench": ("loopcoder.commands.bench", "benchmarks: decode (and train, serve)"),
    "train": ("loopcoder.commands.train", "pretrain from scratch on packed shards (single process or torchrun)"),
    "sft": ("loopcoder.commands.sft", "instruction-tune a checkpoint with the same engine and loss masks"),
    "plan": ("loopcoder.commands.plan", "parameters, FLOPs/token, memory and the largest batch that fits"),
    "plot": ("loopcoder.commands.plot", "training curves (loss, validation, bits per byte, LR) of runs as a PNG"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopcoder",
        description="Parallel Loop Transformer (LoopCoder-v2) code models: build, train, decode, evaluate, diagnose.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            top.print_usage(sys.stderr)
            print(f"loopcoder: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
            return 2
        top.print_help()
        return 0
    name = argv[0]
    quiet_libraries()
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except LoopcoderError as e:  # an optional dependency of this command is missing: its import says which
        print(f"loopcoder {name}: error: {e}", file=sys.stderr)
        return 2
    if getattr(module, "PASSTHROUGH", False):  # another tool's command line, handed over as it is
        return run_command(name, module.run, argv[1:])
    parser = argparse.ArgumentParser(prog=f"loopcoder {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return run_command(name, module.run, args)


def run_command(name: str, fn, args: argparse.Namespace) -> int:
    """Run a command; user errors become one line on stderr and exit status 2."""
    try:
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
