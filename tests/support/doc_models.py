"""What a docs page's examples need, made in one process (tests/test_docs.py's `$DOCTEST_MODELS`):

    python doc_models.py DATA MODEL...

builds the data directory DATA from a small corpus (this package's sources) unless it exists, then
writes a random tiny model with DATA's tokenizer into each MODEL (loop count R from a name ending in a
digit, `runs/r3`; else 2). Each `loopcoder` call costs seconds of imports; one process for all is cheaper.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

from loopcoder.cli import main

SIZE = ["--hidden-size", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--window", "8",
        "--max-positions", "1024"]


def make(data: str, models: list[str]) -> None:
    corpus = Path(__file__).resolve().parents[2] / "src" / "loopcoder"
    with contextlib.redirect_stdout(io.StringIO()):
        if not (Path(data) / "manifest.json").is_file():
            assert main(["data", "build", "--source", str(corpus), "--out", data, "--vocab-size", "1024"]) == 0
        for out in models:
            m = re.search(r"(\d+)$", out.rstrip("/"))
            loops = m.group(1) if m and 1 <= int(m.group(1)) <= 4 else "2"
            assert main(["init", "--out", out, "--tokenizer", data, "--loops", loops, *SIZE]) == 0


if __name__ == "__main__":
    make(sys.argv[1], sys.argv[2:])
