"""Corpora: where documents come from, how they are cleaned, and which split each one belongs to.

Sources (`--source`, repeatable): `stdlib` (the running Python's standard library, the embedded default:
nothing to download), a directory (extension filter, ignore patterns), a JSONL or Parquet file with a
text field, or `hf:NAME_OR_PATH` (any Hugging Face `datasets` dataset, streamed).

Cleaning: undecodable (not UTF-8) and binary (NUL byte) documents are skipped, as are empty ones and
those over `max_file_bytes`; exact duplicates (same SHA-256 of the text) are kept once, first seen
wins. Every skip is counted in `CleaningStats`.

Split: by document content, not position. A document goes to validation when a hash of
(seed, its SHA-256) falls below `val_fraction`, so the split of a file never depends on which other
files are present, and duplicates can never straddle the split.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from loopcoder.utils.errors import LoopcoderError

# Always skipped when walking a directory: VCS metadata, caches, virtual environments, vendored packages.
DEFAULT_IGNORE = (".*", "__pycache__", "node_modules", "site-packages", "dist-packages")
# The standard library without its test suites, generated tables and bundled applications:
# tests are mostly boilerplate asserts, `encodings` and `pydoc_data` are generated data, idlelib and
# turtledemo are applications (idlelib also ships its own tests), lib2to3 is deprecated and its test
# data contains Python 2. `config-*` and `lib-dynload` hold build files, not library code.
STDLIB_IGNORE = (
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "turtledemo",
    "lib2to3",
    "pydoc_data",
    "encodings",
    "__phello__",
    "config-*",
    "lib-dynload",
    "_sysconfigdata*",
)
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class CorpusSpec:
    """Everything that decides which documents a corpus yields and how they split."""

    sources: tuple[str, ...] = ("stdlib",)
    include_ext: tuple[str, ...] = (".py",)  # for directories; "*" takes every file
    ignore: tuple[str, ...] = ()  # fnmatch patterns on path components or relative paths
    text_field: str = "text"  # for JSONL, Parquet and Hugging Face sources
    max_file_bytes: int = 262_144
    min_file_bytes: int = 1
    val_fraction: float = 0.05
    seed: int = 0
    hf_config: str | None = None
    hf_split: str = "train"
    max_documents: int | None = None  # stop after this many kept documents (large streamed corpora)

    def __post_init__(self) -> None:
        if not self.sources:
            raise LoopcoderError("no corpus source given")
        if not 0.0 <= self.val_fraction < 1.0:
            raise LoopcoderError(f"val_fraction {self.val_fraction} must be in [0, 1)")
        if self.max_file_bytes < 1 or self.min_file_bytes < 0 or self.min_file_bytes > self.max_file_bytes:
            raise LoopcoderError(
                f"size limits [{self.min_file_bytes}, {self.max_file_bytes}] bytes are empty or negative"
            )
        if self.max_documents is not None and self.max_documents < 1:
            raise LoopcoderError(f"max_documents {self.max_documents} must be positive")
        if not self.text_field:
            raise LoopcoderError("the text field name is empty")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("sources", "include_ext", "ignore"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CorpusSpec:
        known = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**kw)


@dataclass
class Document:
    id: str  # where it came from: a relative path, "file.jsonl:LINE", "hf:NAME[i]"
    text: str
    sha256: str
    nbytes: int  # UTF-8 bytes
    split: str = "train"


@dataclass
class CleaningStats:
    seen: int = 0
    kept: int = 0
    duplicates: int = 0
    too_large: int = 0
    empty: int = 0  # below min_file_bytes, or whitespace only
    binary: int = 0
    undecodable: int = 0
    bytes_seen: int = 0
    bytes_kept: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def skipped_summary(self) -> str:
        parts = [
            f"{n} {name}"
            for name, n in (
                ("duplicate", self.duplicates),
                ("too large", self.too_large),
                ("empty", self.empty),
                ("binary", self.binary),
                ("undecodable", self.undecodable),
            )
        ]
        return ", ".join(parts)


def stdlib_root() -> Path:
    """The directory of the running Python's standard library sources."""
    path = sysconfig.get_paths().get("stdlib")
    if path and (Path(path) / "os.py").is_file():
        return Path(path)
    return Path(os.__file__).resolve().parent


def split_of(sha256_hex: str, val_fraction: float, seed: int = 0) -> str:
    """ "validation" for a `val_fraction` share of all possible contents, chosen by hashing, else "train"."""
    if val_fraction <= 0:
        return "train"
    h = hashlib.sha256(f"{seed}:{sha256_hex}".encode()).digest()
    return "validation" if int.from_bytes(h[:8], "big") / 2**64 < val_fraction else "train"


# ---------------------------------------------------------------------------------------------------------
# Sources: each yields (id, raw) with raw as bytes (files) or str (records), before any cleaning.


@dataclass(frozen=True)
class TooLarge:
    """Stands in for a file over the size limit, which is never read."""

    size: int


Raw = bytes | str | TooLarge  # a file's bytes, a record's text, or a skipped file


class Source:
    name: str

    def describe(self) -> str:
        return self.name

    def fingerprint(self, spec: CorpusSpec) -> Any:
        """Something cheap that changes when the source's content may have changed."""
        return self.name

    def total_bytes(self, spec: CorpusSpec) -> int | None:
        return None

    def iter_raw(self, spec: CorpusSpec) -> Iterator[tuple[str, Raw]]:
        raise NotImplementedError


def _ignored(rel_parts: tuple[str, ...], patterns: Iterable[str]) -> bool:
    rel = "/".join(rel_parts)
    for pat in patterns:
        if "/" in pat:
            if fnmatch.fnmatchcase(rel, pat.strip("/")) or fnmatch.fnmatchcase(rel, pat.strip("/") + "/*"):
                return True
        elif any(fnmatch.fnmatchcase(part, pat) for part in rel_parts):
            return True
    return False


class DirectorySource(Source):
    """Every file under a directory whose name ends with one of `include_ext`, in sorted path order."""

    def __init__(self, root: Path, name: str | None = None, extra_ignore: tuple[str, ...] = ()) -> None:
        self.root = root
        self.name = name or str(root)
        self.extra_ignore = extra_ignore

    def files(self, spec: CorpusSpec) -> list[tuple[str, Path, os.stat_result]]:
        patterns = DEFAULT_IGNORE + self.extra_ignore + tuple(spec.ignore)
        exts = tuple(e.lower() for e in spec.include_ext)
        take_all = "*" in exts
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = Path(dirpath).relative_to(self.root).parts
            dirnames[:] = sorted(d for d in dirnames if not _ignored((*rel_dir, d), patterns))
            for fn in sorted(filenames):
                if not (take_all or fn.lower().endswith(exts)) or _ignored((*rel_dir, fn), patterns):
                    continue
                p = Path(dirpath) / fn
                try:
                    st = p.stat()
                except OSError:  # a dangling link
                    continue
                if p.is_file():
                    out.append(("/".join((*rel_dir, fn)), p, st))
        return out

    def fingerprint(self, spec: CorpusSpec) -> Any:
        h = hashlib.sha256()
        for rel, _, st in self.files(spec):
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return [self.name, h.hexdigest()]

    def total_bytes(self, spec: CorpusSpec) -> int:
        return sum(st.st_size for _, _, st in self.files(spec) if st.st_size <= spec.max_file_bytes)

    def iter_raw(self, spec: CorpusSpec) -> Iterator[tuple[str, Raw]]:
        for rel, path, st in self.files(spec):
            if st.st_size > spec.max_file_bytes:  # do not read what will be dropped anyway
                yield rel, TooLarge(st.st_size)
                continue
            try:
                yield rel, path.read_bytes()
            except OSError as e:
                raise LoopcoderError(f"cannot read {path}: {e.strerror or e}") from e


class StdlibSource(DirectorySource):
    def __init__(self) -> None:
        super().__init__(stdlib_root(), name="stdlib", extra_ignore=STDLIB_IGNORE)

    def describe(self) -> str:
        v = sys.version_info
        return f"stdlib ({self.root}, Python {v.major}.{v.minor}.{v.micro})"

    def fingerprint(self, spec: CorpusSpec) -> Any:
        return [sys.version, *super().fingerprint(spec)]


class JsonlSource(Source):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    def fingerprint(self, spec: CorpusSpec) -> Any:
        st = self.path.stat()
        return [self.name, st.st_size, st.st_mtime_ns]

    def total_bytes(self, spec: CorpusSpec) -> int:
        return self.path.stat().st_size

    def iter_raw(self, spec: CorpusSpec) -> Iterator[tuple[str, Raw]]:
        for where, record in iter_jsonl(self.path):
            yield where, _text_field(record, spec.text_field, where)


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """("PATH:LINE", record) for each non-blank line of a JSONL file (gzip-compressed if it ends in .gz)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoopcoderError(f"{where}: not valid JSON ({e.msg})") from e
            yield where, record


def _text_field(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise LoopcoderError(f"{where}: expected a JSON object with a {text_field!r} field")
    if text_field not in record:
        keys = ", ".join(sorted(map(str, record))[:10]) or "none"
        raise LoopcoderError(f"{where}: no text field {text_field!r} (fields: {keys}); choose one with --text-field")
    value = record[text_field]
    if not isinstance(value, str):
        raise LoopcoderError(f"{where}: field {text_field!r} is {type(value).__name__}, not a string")
    return value


class ParquetSource(JsonlSource):
    def iter_raw(self, spec: CorpusSpec) -> Iterator[tuple[str, Raw]]:
        import pyarrow.parquet as pq  # only for Parquet sources: 0.2 s that `loopcoder data --help` need not pay

        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise LoopcoderError(f"{self.path}: not a readable Parquet file ({str(e).splitlines()[0]})") from e
        names = pf.schema_arrow.names
        if spec.text_field not in names:
            raise LoopcoderError(
                f"{self.path}: no text column {spec.text_field!r} (columns: "
                f"{', '.join(names[:10])}); choose one with --text-field"
            )
        row = 0
        for batch in pf.iter_batches(columns=[spec.text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                where = f"{self.path}:row {row}"
                row += 1
                if value is None:
                    yield where, ""
                elif not isinstance(value, str):
                    raise LoopcoderError(f"{where}: column {spec.text_field!r} is {type(value).__name__}, not a string")
                else:
                    yield where, value


class HFSource(Source):
    """A Hugging Face dataset by hub name or local path (a `save_to_disk` directory or data files), streamed."""

    def __init__(self, name: str) -> None:
        if not name:
            raise LoopcoderError("empty Hugging Face dataset name: use hf:NAME or hf:PATH")
        self.dataset = name
        self.name = f"hf:{name}"

    def fingerprint(self, spec: CorpusSpec) -> Any:
        p = Path(self.dataset)
        if p.exists():
            stats = sorted(
                (str(q.relative_to(p)) if p.is_dir() else q.name, q.stat().st_size, q.stat().st_mtime_ns)
                for q in ([p] if p.is_file() else p.rglob("*"))
                if q.is_file()
            )
            return [self.name, spec.hf_config, spec.hf_split, stats]
        return [self.name, spec.hf_config, spec.hf_split]

    def _open(self, spec: CorpusSpec) -> Any:
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - a pinned dependency
            raise LoopcoderError("the `datasets` package is needed for hf: sources") from e
        p = Path(self.dataset)
        try:
            if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
                ds = datasets.load_from_disk(str(p))
                if isinstance(ds, datasets.DatasetDict):
                    if spec.hf_split not in ds:
                        raise LoopcoderError(
                            f"{self.name}: no split {spec.hf_split!r} (splits: "
                            f"{', '.join(ds)}); choose one with --hf-split"
                        )
                    ds = ds[spec.hf_split]
                return ds
            return datasets.load_dataset(self.dataset, spec.hf_config, split=spec.hf_split, streaming=True)
        except LoopcoderError:
            raise
        except Exception as e:  # hub, network and format errors all land here
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoopcoderError(f"cannot load Hugging Face dataset {self.dataset!r}: {msg}") from e

    def iter_raw(self, spec: CorpusSpec) -> Iterator[tuple[str, Raw]]:
        ds = self._open(spec)
        names = getattr(ds, "column_names", None)
        if names and spec.text_field not in names:
            raise LoopcoderError(
                f"{self.name}: no text field {spec.text_field!r} (columns: "
                f"{', '.join(list(names)[:10])}); choose one with --text-field"
            )
        for i, record in enumerate(ds):
            where = f"{self.name}[{i}]"
            if isinstance(record, dict) and spec.text_field in record and record[spec.text_field] is None:
                yield where, ""
            else:
                yield where, _text_field(record, spec.text_field, where)


def resolve_source(source: str) -> Source:
    """`stdlib`, `hf:NAME`, a directory, a `.jsonl[.gz]` or `.parquet` file; anything else is an error."""
    if source == "stdlib":
        return StdlibSource()
    if source.startswith("hf:"):
        return HFSource(source[3:])
    p = Path(source).expanduser()
    if not p.exists():
        raise LoopcoderError(
            f"source {source!r} does not exist (expected stdlib, hf:NAME, a directory, a .jsonl or a .parquet file)"
        )
    if p.is_dir():
        return DirectorySource(p)
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return JsonlSource(p)
    if name.endswith(".parquet"):
        return ParquetSource(p)
    raise LoopcoderError(f"source file {source!r} is not .jsonl, .jsonl.gz or .parquet")


def describe(spec: CorpusSpec) -> str:
    return " + ".join(resolve_source(s).describe() for s in spec.sources)


def fingerprint(spec: CorpusSpec) -> str:
    """A hash of the settings and of cheap source metadata (paths, sizes, mtimes): equal means unchanged."""
    parts = [spec.to_dict(), [resolve_source(s).fingerprint(spec) for s in spec.sources]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def total_bytes(spec: CorpusSpec) -> int | None:
    totals = [resolve_source(s).total_bytes(spec) for s in spec.sources]
    return None if any(t is None for t in totals) else sum(t for t in totals if t is not None)


# ---------------------------------------------------------------------------------------------------------
# Cleaning


def iter_documents(
    spec: CorpusSpec, stats: CleaningStats | None = None, split: str | None = None
) -> Iterator[Document]:
    """The cleaned, de-duplicated documents of a corpus, each with its split, in a deterministic order.

    With `split`, only that split's documents are yielded (the others are still cleaned and counted,
    so that de-duplication is the same whichever split is asked for).
    """
    stats = stats if stats is not None else CleaningStats()
    sources = [resolve_source(s) for s in spec.sources]  # every path checked before any work
    seen_hashes: set[bytes] = set()
    for source in sources:
        # ids are prefixed with their source's name only where several sources could give the same id
        prefix = "" if isinstance(source, (JsonlSource, HFSource)) or len(spec.sources) == 1 else f"{source.name}:"
        for doc_id, raw in source.iter_raw(spec):
            stats.seen += 1
            doc = _clean(prefix + doc_id, raw, spec, stats, seen_hashes)
            if doc is None:
                continue
            stats.kept += 1
            stats.bytes_kept += doc.nbytes
            if split is None or doc.split == split:
                yield doc
            if spec.max_documents is not None and stats.kept >= spec.max_documents:
                return


def _clean(doc_id: str, raw: Raw, spec: CorpusSpec, stats: CleaningStats, seen: set[bytes]) -> Document | None:
    if isinstance(raw, TooLarge):
        stats.bytes_seen += raw.size
        stats.too_large += 1
        return None
    if isinstance(raw, bytes):
        stats.bytes_seen += len(raw)
        if b"\0" in raw:
            stats.binary += 1
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.undecodable += 1
            return None
        data = raw
    else:
        text = raw
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from a JSON "\ud800" escape
            stats.undecodable += 1
            return None
        stats.bytes_seen += len(data)
        if "\0" in text:
            stats.binary += 1
            return None
    if len(data) > spec.max_file_bytes:
        stats.too_large += 1
        return None
    if len(data) < spec.min_file_bytes or not text.strip():
        stats.empty += 1
        return None
    digest = hashlib.sha256(data).digest()
    if digest in seen:
        stats.duplicates += 1
        return None
    seen.add(digest)
    sha = digest.hex()
    return Document(
        id=doc_id, text=text, sha256=sha, nbytes=len(data), split=split_of(sha, spec.val_fraction, spec.seed)
    )
