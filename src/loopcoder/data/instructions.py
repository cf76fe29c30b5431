"""A built-in instruction set derived from the corpus: documented functions become chat examples.

Every module-level function and every method (found with `ast`) that has a docstring and a real body
(not just `pass`, `...` or `raise NotImplementedError`) becomes one record:
user: "Write the Python function `name` ... with this signature and docstring:" + the exact source of
its decorators, signature and docstring; assistant: the function's exact source (dedented), in a
```python block. Records keep the split of the file they come from (the corpus's content-hash split),
a function whose code also occurs in a train file is dropped from validation, and long ones are
dropped so a record fits `max_tokens` (the data directory's sequence length by default).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from loopcoder.data import corpus as corpus_mod
from loopcoder.data.build import read_manifest
from loopcoder.data.corpus import SPLITS, CorpusSpec, Document, iter_documents
from loopcoder.data.tokenizer import load_raw_tokenizer
from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.progress import Progress


@dataclass
class InstructionStats:
    files: int = 0
    unparsable: int = 0
    candidates: int = 0  # documented functions and methods with a real body
    too_long: int = 0
    duplicates: int = 0
    train: int = 0
    validation: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def module_name(doc_id: str) -> str:
    """ "json/decoder.py" -> "json.decoder", "json/__init__.py" -> "json"."""
    path = doc_id.rsplit(":", 1)[-1] if doc_id.endswith(".py") else doc_id  # drop a "source:" prefix
    parts = Path(path).with_suffix("").parts
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or path


def _trivial(body: list[ast.stmt]) -> bool:
    for stmt in body:
        if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            continue
        if isinstance(stmt, ast.Raise) and "NotImplementedError" in ast.unparse(stmt):
            continue
        return False
    return True


def _dedent(lines: list[str], indent: int) -> str:
    # Remove the def's own indentation only; lines indented less (inside multi-line strings) keep theirs.
    out = []
    for line in lines:
        k = len(line) - len(line.lstrip(" \t"))
        out.append(line[min(k, indent) :])
    return "\n".join(out).rstrip() + "\n"


def extract_functions(source: str, module: str) -> Iterator[dict[str, str]]:
    """Documented functions and methods of one module: {qualname, kind, stub, code}. Raises SyntaxError."""
    tree = ast.parse(source)
    lines = source.splitlines()

    def visit(body: list[ast.stmt], cls: str | None) -> Iterator[dict[str, str]]:
        for node in body:
            if isinstance(node, ast.ClassDef) and cls is None:
                yield from visit(node.body, node.name)
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not ast.get_docstring(node):
                continue
            if _trivial(node.body[1:]):
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            stub = _dedent(lines[first - 1 : node.body[0].end_lineno], node.col_offset)
            code = _dedent(lines[first - 1 : node.end_lineno], node.col_offset)
            try:
                ast.parse(code)
            except SyntaxError:  # dedenting changed a multi-line string's layout: skip it
                continue
            yield {
                "qualname": f"{cls}.{node.name}" if cls else node.name,
                "name": node.name,
                "cls": cls or "",
                "module": module,
                "stub": stub,
                "code": code,
            }

    yield from visit(tree.body, None)


def to_messages(fn: dict[str, str]) -> list[dict[str, str]]:
    if fn["cls"]:
        what = f"the method `{fn['name']}` of class `{fn['cls']}` (module `{fn['module']}`)"
    else:
        what = f"the Python function `{fn['name']}` (module `{fn['module']}`)"
    user = f"Write {what} with this signature and docstring:\n\n```python\n{fn['stub']}```"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": f"```python\n{fn['code']}```"}]


def _chatml(messages: list[dict[str, str]]) -> str:
    # What the loopcoder chat template renders for a system-less conversation (see tokenizer.CHAT_TEMPLATE).
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def build_instruction_set(
    documents: Iterable[Document], tokenizer: Any = None, max_tokens: int | None = 512, max_code_chars: int = 6000
) -> tuple[dict[str, list[dict[str, Any]]], InstructionStats]:
    """Records per split from (Python) documents; `tokenizer` (a `tokenizers.Tokenizer`) enables `max_tokens`."""
    stats = InstructionStats()
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    pending: list[tuple[str, dict[str, Any], str]] = []
    for doc in documents:
        stats.files += 1
        try:
            fns = list(extract_functions(doc.text, module_name(doc.id)))
        except (SyntaxError, ValueError, RecursionError):
            stats.unparsable += 1
            continue
        for fn in fns:
            stats.candidates += 1
            if len(fn["code"]) > max_code_chars:
                stats.too_long += 1
                continue
            record = {"id": f"{doc.id}::{fn['qualname']}", "source": doc.id, "messages": to_messages(fn)}
            pending.append((doc.split, record, hashlib.sha256(fn["code"].encode()).hexdigest()))
    if tokenizer is not None and max_tokens is not None:
        texts = [_chatml(r["messages"]) for _, r, _ in pending]
        lengths = [len(e.ids) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        kept = [p for p, n in zip(pending, lengths) if n <= max_tokens]
        stats.too_long += len(pending) - len(kept)
        pending = kept
    # Train first, so that validation drops any function whose code a train file also has.
    seen: set[str] = set()
    for split in SPLITS:
        for s, record, h in pending:
            if s != split:
                continue
            if h in seen:
                stats.duplicates += 1
                continue
            seen.add(h)
            out[split].append(record)
    stats.train, stats.validation = len(out["train"]), len(out["validation"])
    return out, stats


def write_instruction_set(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    max_tokens: int | None = None,
    max_code_chars: int = 6000,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """Build the instruction set of a data directory's corpus into `out_dir` (default DATA/instructions)."""
    manifest = read_manifest(data_dir)
    spec = CorpusSpec.from_dict(manifest["settings"]["corpus"])
    seq_len = manifest["settings"]["seq_len"]
    tok = load_raw_tokenizer(data_dir)
    limit = max_tokens if max_tokens is not None else seq_len
    if limit < 16:
        raise LoopcoderError(f"max tokens {limit} is too small for any instruction record")
    meter = Progress(
        "instructions: parsing",
        unit="documents",
        amount_unit="bytes",
        total_amount=corpus_mod.total_bytes(spec),
        stream=log,
    )

    def documents() -> Iterator[Document]:
        for doc in iter_documents(spec):
            meter.advance(1, doc.nbytes)
            yield doc
        meter.finish()

    records, stats = build_instruction_set(documents(), tok, limit, max_code_chars)
    if not records["train"]:
        raise LoopcoderError(f"no documented functions found in {manifest['source']} within {limit} tokens")
    out = Path(out_dir) if out_dir is not None else Path(data_dir) / "instructions"
    files = {}
    for split, recs in records.items():
        path = out / f"{split}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        files[split] = str(path)
    return {"files": files, "max_tokens": limit, "statistics": stats.to_dict()}
