"""Per-token cost of streaming a completion's text and tool calls, at growing output lengths, before and after
incremental detokenization (issue 25), in pairs.

    PYTHONPATH=src python3 benchmarks/detokenize.py [--lengths 100,1000,4000] [--rounds 5] [--out FILE]

One thread (tokenizers' pool pinned to 1; nothing here uses torch). The tokenizer is loopcoder's byte-level BPE
(vocab 2,000) trained on this package's source; the output is that source's tokens.
- text: `TextStream.push` + `take` per token, with two stop strings that never match, as the engine streams a
  request; before = every token decodes all the ids again (tests/support/whole_streams.py), after = this tree's
  `TextStream`.
- tool calls: `ToolCallStream.feed` + `calls` per token, then `finish`, as the server streams a reply with tools; the
  reply is a short sentence, one small call and one long `write_file` call whose argument is source code (an agent
  writing a file: most tokens fall inside one open call).
Each round runs every length once on both sides, in random order. Reported per length: the median microseconds per
token of each side and the median per-round ratio before / after; flat means linear in the output length.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its pool
os.environ["TOKENIZERS_PARALLELISM"] = "false"

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the old algorithms, kept with the tests
from loopcoder import engine, model, sampling
from loopcoder.commands.options import int_list
from loopcoder.data import tokenizer as T
from loopcoder.inference.textstream import TextStream
from loopcoder.model.loading import load_tokenizer
from loopcoder.serving.tool_calls import HermesToolCallParser, ToolCallStream
from loopcoder.utils.atomic import atomic_write_text
from support.whole_streams import WholeTextStream, WholeToolCallStream

STOP = ["\n\n\n\n\n", "<|endoftext|>"]


def build_tokenizer(source: str) -> Any:
    tok = T.train_tokenizer((source[i : i + 4000] for i in range(0, len(source), 4000)), vocab_size=2000)
    return load_tokenizer(T.save_tokenizer(tok, tempfile.mkdtemp(prefix="detokenize-bench-")))


def token_pieces(tok: Any, ids: list[int]) -> list[str]:
    """The text each token adds, as the engine hands it to the server."""
    stream, pieces = TextStream(tok), []
    for t in ids:
        stream.push(t)
        pieces.append(stream.take())
    pieces[-1] += stream.take(final=True)
    return pieces


def time_text(make: Callable[[], Any], ids: list[int]) -> float:
    stream = make()
    start = time.perf_counter()
    for t in ids:
        stream.push(t)
        stream.take()
    stream.take(final=True)
    return time.perf_counter() - start


def time_tools(make: Callable[[], Any], pieces: list[str]) -> float:
    stream = make()
    start = time.perf_counter()
    for p in pieces:
        stream.feed(p)
        stream.calls()
    stream.finish()
    return time.perf_counter() - start


def main_(args: argparse.Namespace) -> dict:
    source = "".join(inspect.getsource(m) for m in (engine, model, sampling))
    tok = build_tokenizer(source)
    longest = max(args.lengths)
    text_ids = tok(source, add_special_tokens=False)["input_ids"][:longest]
    parser = HermesToolCallParser()
    small = json.dumps({"name": "read_file", "arguments": {"path": "src/loopcoder/engine.py"}})
    write = json.dumps({"name": "write_file", "arguments": {"path": "engine.py", "content": source}})
    reply = f"Let me look first.\n<tool_call>\n{small}\n</tool_call>\n<tool_call>\n{write}\n</tool_call>"
    tool_pieces = token_pieces(tok, tok(reply, add_special_tokens=False)["input_ids"][:longest])
    if len(text_ids) < longest or len(tool_pieces) < longest:
        raise SystemExit(f"the source has fewer than {longest} tokens")
    sides: dict[str, dict[str, Callable[[], Any]]] = {
        "text": {"before": lambda: WholeTextStream(tok, STOP), "after": lambda: TextStream(tok, STOP)},
        "tool_calls": {"before": lambda: WholeToolCallStream(parser), "after": lambda: ToolCallStream(parser)},
    }
    times = {kind: {n: {"before": [], "after": []} for n in args.lengths} for kind in sides}
    rng = random.Random(0)
    for _ in range(args.rounds):
        for n in args.lengths:
            for kind, makers in sides.items():
                order = list(makers)
                rng.shuffle(order)
                for side in order:
                    if kind == "text":
                        seconds = time_text(makers[side], text_ids[:n])
                    else:
                        seconds = time_tools(makers[side], tool_pieces[:n])
                    times[kind][n][side].append(seconds / n)
    report: dict[str, Any] = {"rounds": args.rounds, "threads": 1, "vocab_size": len(tok), "stop": STOP}
    for kind, by_length in times.items():
        report[kind] = {
            str(n): {
                "before_us_per_token": 1e6 * statistics.median(t["before"]),
                "after_us_per_token": 1e6 * statistics.median(t["after"]),
                "median_ratio_before_after": statistics.median(b / a for b, a in zip(t["before"], t["after"])),
            }
            for n, t in by_length.items()
        }
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int_list, default=(100, 1000, 4000), help="output lengths in tokens")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", help="also write the report here (JSON)")
    args = p.parse_args()
    text = json.dumps(main_(args), indent=1)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
