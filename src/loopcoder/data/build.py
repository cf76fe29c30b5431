"""`build`: corpus -> tokenizer -> packed shards -> manifest, in one atomic directory.

Two passes over the corpus: the first trains the tokenizer on the train split (skipped when an
existing tokenizer is reused), the second encodes every document into its split's shards. The output
directory is written to a temporary sibling and renamed into place, so it is complete or absent.

`manifest.json` records the settings, the statistics, the timings, an `inputs_hash` (settings plus
cheap source metadata: a rerun with an equal hash is skipped), a `content_hash` (of the tokenizer
and every shard's tokens: later stages can cache on it; it does not depend on timings or paths) and the
tokenizer's fingerprint (`identity.py`), which models made for this data (`init --data`, training)
record too, so that a model is never paired with data of another tokenizer.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from loopcoder.data import corpus as corpus_mod
from loopcoder.data import tokenizer as tok_mod
from loopcoder.data.corpus import SPLITS, CleaningStats, CorpusSpec, Document
from loopcoder.data.shards import DEFAULT_SHARD_TOKENS, INDEX_FORMAT, INDEX_VERSION, ShardWriter, shard_dtype
from loopcoder.model.identity import tokenizer_fingerprint
from loopcoder.utils.atomic import atomic_directory, atomic_write_text, check_output_dir
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.progress import Progress

MANIFEST_VERSION = 1
_BUILT = {"tokenizer", "train", "validation", "token_bytes.npy", "index.json", "manifest.json"}  # what a build writes
_ENCODE_BATCH_DOCS = 256
_ENCODE_BATCH_BYTES = 8 << 20


@dataclass(frozen=True)
class BuildConfig:
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    vocab_size: int = 4096
    seq_len: int = 512
    tokenizer: str | None = None  # an existing tokenizer (or data) directory to reuse instead of training
    tokenizer_max_bytes: int | None = None  # train the tokenizer on at most this many bytes
    min_frequency: int = 2
    shard_tokens: int = DEFAULT_SHARD_TOKENS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["corpus"] = self.corpus.to_dict()
        return d

    def validate(self) -> None:
        if self.tokenizer is None:
            tok_mod.check_vocab_size(self.vocab_size)
        if self.seq_len < 2:
            raise LoopcoderError(f"sequence length {self.seq_len} must be at least 2")
        if self.shard_tokens < self.seq_len:
            raise LoopcoderError(f"shard size {self.shard_tokens} tokens is smaller than one sequence ({self.seq_len})")
        for s in self.corpus.sources:  # fail on a bad path before any work
            corpus_mod.resolve_source(s)


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(data_dir) / "manifest.json"
    if not p.is_file():
        raise LoopcoderError(f"{str(data_dir)!r} has no manifest.json: not a loopcoder data directory")
    try:
        manifest = json.loads(p.read_bytes())
    except (ValueError, OSError) as e:
        manifest = e
    if not isinstance(manifest, dict):
        why = str(manifest).splitlines()[0][:200] if isinstance(manifest, Exception) else "not a JSON object"
        raise LoopcoderError(f"{p} is damaged ({why}): rebuild the data directory (`loopcoder data build --force`)")
    return manifest


def inputs_hash(config: BuildConfig) -> str:
    tok_fp = None
    if config.tokenizer is not None:
        tok_fp = hashlib.sha256((tok_mod.tokenizer_dir(config.tokenizer) / "tokenizer.json").read_bytes()).hexdigest()
    parts = {
        "manifest_version": MANIFEST_VERSION,
        "config": config.to_dict(),
        "corpus": corpus_mod.fingerprint(config.corpus),
        "tokenizer": tok_fp,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _up_to_date(out: Path, ihash: str) -> dict[str, Any] | None:
    try:
        manifest = read_manifest(out)
        index = json.loads((out / "index.json").read_text())
    except (LoopcoderError, OSError, ValueError):
        return None
    if manifest.get("inputs_hash") != ihash or not (out / "tokenizer" / "tokenizer.json").is_file():
        return None
    files = [s["file"] for split in index.get("splits", {}).values() for s in split.get("shards", [])]
    return manifest if all((out / f).is_file() for f in files) else None


def build(
    config: BuildConfig,
    out: str | os.PathLike,
    force: bool = False,
    log: TextIO | None = None,
    overwrite: bool | None = None,
) -> dict[str, Any]:
    """Build (or find up to date) the data directory `out`; returns its manifest (`skipped` says which).

    `force` rebuilds even an up-to-date directory. An existing data directory built from other inputs
    is replaced only with `overwrite` (default: `force`), since everything in it goes, `instructions/`
    included; a non-empty directory that is not a data directory is never replaced. The replacement is
    atomic: until the new directory is complete, the old one stays as it was."""
    log = log if log is not None else sys.stderr
    out = Path(out)
    overwrite = force if overwrite is None else overwrite
    config.validate()
    ihash = inputs_hash(config)
    if not force and (manifest := _up_to_date(out, ihash)) is not None:
        return {**manifest, "skipped": True}
    # the rule of every command that writes a directory; "built from other inputs" is this one's own message
    check_output_dir(out, True, "loopcoder data directory", lambda d: (d / "manifest.json").is_file())
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        extra = sorted(p.name for p in out.iterdir() if p.name not in _BUILT)
        held = f" (and {', '.join(extra)}, which would be lost)" if extra else ""
        raise LoopcoderError(
            f"--out {str(out)!r} holds a data directory built from other inputs{held}: pass "
            "--force to replace it, or choose a new --out"
        )
    t0 = time.perf_counter()
    with atomic_directory(out) as tmp:
        timing: dict[str, float] = {}
        total = corpus_mod.total_bytes(config.corpus)  # walks directory sources: once, for both passes
        tok, trained = _tokenizer(config, tmp, log, timing, total)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        stats = CleaningStats()
        index_splits = _encode(config, tok, vocab, tmp, stats, log, timing, total)
        token_bytes = tok_mod.token_byte_lengths(tok)
        np.save(tmp / "token_bytes.npy", token_bytes)
        index = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "seq_len": config.seq_len,
            "dtype": shard_dtype(vocab).name,
            "vocab_size": vocab,
            "eot_id": tok_mod.EOS_ID,
            "pad_id": tok_mod.PAD_ID,
            "splits": index_splits,
        }
        atomic_write_text(tmp / "index.json", json.dumps(index, indent=1) + "\n")
        content = hashlib.sha256((tmp / "tokenizer" / "tokenizer.json").read_bytes())
        content.update(json.dumps([config.seq_len, index["dtype"]]).encode())
        for split in SPLITS:
            content.update(index_splits[split]["sha256"].encode())
        timing["total"] = time.perf_counter() - t0
        manifest = {
            "loopcoder_data": MANIFEST_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "source": corpus_mod.describe(config.corpus),
            "settings": config.to_dict(),
            "inputs_hash": ihash,
            "content_hash": content.hexdigest(),
            "tokenizer": {
                "vocab_size": vocab,
                "trained": trained,
                "requested_vocab_size": None if config.tokenizer else config.vocab_size,
                "fingerprint": tokenizer_fingerprint(tmp / "tokenizer"),
                "special_tokens": {t: i for i, t in enumerate(tok_mod.ALL_ADDED)},
                "stop_token_ids": tok_mod.stop_token_ids(),
            },
            "statistics": _statistics(stats, index_splits, config.seq_len),
            "timing_s": {k: round(v, 2) for k, v in timing.items()},
        }
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return {**manifest, "skipped": False}


def _no_documents(config: BuildConfig, stats: CleaningStats) -> LoopcoderError:
    if stats.kept:
        return LoopcoderError(
            f"the train split is empty: all {stats.kept} documents went to validation; lower --val-fraction or add data"
        )
    return LoopcoderError(
        f"corpus {corpus_mod.describe(config.corpus)} has no usable documents "
        f"({stats.seen} seen; skipped: {stats.skipped_summary()})"
    )


def _train_texts(config: BuildConfig, log: TextIO, stats: CleaningStats, total: int | None) -> Iterator[str]:
    progress = Progress(
        "tokenizer: reading the train split", unit="documents", amount_unit="bytes", total_amount=total, stream=log
    )
    cap = config.tokenizer_max_bytes
    for doc in corpus_mod.iter_documents(config.corpus, stats, split="train"):
        progress.advance(1, doc.nbytes)
        yield doc.text
        if cap is not None and progress.amount >= cap:
            break
    progress.finish()


def _tokenizer(
    config: BuildConfig, tmp: Path, log: TextIO, timing: dict[str, float], total: int | None
) -> tuple[Any, bool]:
    t = time.perf_counter()
    if config.tokenizer is not None:
        tok = tok_mod.load_raw_tokenizer(config.tokenizer)
        trained = False
    else:
        print(f"tokenizer: training byte-level BPE, vocabulary {config.vocab_size}", file=log, flush=True)
        stats = CleaningStats()
        try:
            tok = tok_mod.train_tokenizer(
                _train_texts(config, log, stats, total), config.vocab_size, config.min_frequency
            )
        except tok_mod.EmptyCorpusError:
            raise _no_documents(config, stats) from None
        trained = True
        got = tok.get_vocab_size(with_added_tokens=True)
        if got < config.vocab_size:
            print(
                f"tokenizer: the corpus gave only {got} tokens of the {config.vocab_size} asked for",
                file=log,
                flush=True,
            )
    tok_mod.save_tokenizer(tok, tmp / "tokenizer")
    timing["tokenizer"] = time.perf_counter() - t
    return tok, trained


def _encode(
    config: BuildConfig,
    tok: Any,
    vocab: int,
    tmp: Path,
    stats: CleaningStats,
    log: TextIO,
    timing: dict[str, float],
    total: int | None,
) -> dict[str, dict[str, Any]]:
    t = time.perf_counter()
    writers = {s: ShardWriter(tmp, s, config.seq_len, vocab, tok_mod.EOS_ID, config.shard_tokens) for s in SPLITS}
    progress = Progress("encoding", unit="documents", amount_unit="bytes", total_amount=total, stream=log)
    batch: list[Document] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch_bytes
        for doc, ids in zip(batch, tok_mod.encode_documents(tok, [d.text for d in batch])):
            writers[doc.split].add(ids, doc.nbytes)
        progress.advance(len(batch), batch_bytes)
        batch.clear()
        batch_bytes = 0

    for doc in corpus_mod.iter_documents(config.corpus, stats):
        batch.append(doc)
        batch_bytes += doc.nbytes
        if len(batch) >= _ENCODE_BATCH_DOCS or batch_bytes >= _ENCODE_BATCH_BYTES:
            flush()
    flush()
    progress.finish()
    if writers["train"].documents == 0:
        raise _no_documents(config, stats)
    splits = {s: w.close() for s, w in writers.items()}
    for s in SPLITS:
        if splits[s]["sequences"] == 0 and (s == "train" or config.corpus.val_fraction > 0):
            have = splits[s]["document_tokens"] + splits[s]["documents"]
            hint = "lower --seq-len or raise --val-fraction" if s == "validation" else "lower --seq-len"
            raise LoopcoderError(
                f"the {s} split has {have} tokens ({splits[s]['documents']} documents), fewer "
                f"than one sequence of {config.seq_len}: {hint}, or add data"
            )
    timing["encode"] = time.perf_counter() - t
    return splits


def _statistics(stats: CleaningStats, splits: dict[str, dict[str, Any]], seq_len: int) -> dict[str, Any]:
    def row(documents: int, nbytes: int, tokens: int, sequences: int, dropped: int) -> dict[str, Any]:
        return {
            "documents": documents,
            "bytes": nbytes,
            "tokens": tokens,
            "bytes_per_token": round(nbytes / tokens, 4) if tokens else None,
            "sequences": sequences,
            "dropped_tokens": dropped,
        }

    per = {
        s: row(e["documents"], e["document_bytes"], e["document_tokens"], e["sequences"], e["dropped_tokens"])
        for s, e in splits.items()
    }
    total = row(*(sum(per[s][k] for s in per) for k in ("documents", "bytes", "tokens", "sequences", "dropped_tokens")))
    return {"files": stats.to_dict(), "splits": per, "total": total, "seq_len": seq_len}


def format_statistics(manifest: dict[str, Any], out: str | os.PathLike | None = None) -> str:
    """The table `loopcoder data build` prints."""
    st = manifest["statistics"]
    f = st["files"]
    tk = manifest["tokenizer"]
    how = "trained on the train split" if tk["trained"] else "reused"
    lines = [
        f"corpus      {manifest['source']}",
        f"files       {f['seen']} seen, {f['kept']} kept; skipped: {CleaningStats(**f).skipped_summary()}",
        f"tokenizer   byte-level BPE, vocabulary {tk['vocab_size']} ({how})",
        "",
        f"{'split':<11} {'documents':>9} {'bytes':>13} {'tokens':>12} {'bytes/token':>11} {'sequences':>9}",
    ]
    for name, r in [*st["splits"].items(), ("total", st["total"])]:
        bpt = f"{r['bytes_per_token']:.3f}" if r["bytes_per_token"] else "-"
        lines.append(
            f"{name:<11} {r['documents']:>9,} {r['bytes']:>13,} {r['tokens']:>12,} {bpt:>11} {r['sequences']:>9,}"
        )
    t = manifest.get("timing_s", {})
    lines += [
        "",
        f"sequences of {st['seq_len']} tokens; {st['total']['dropped_tokens']:,} tokens dropped at split tails",
        f"built in {t.get('total', 0):.1f} s (tokenizer {t.get('tokenizer', 0):.1f} s, encoding "
        f"{t.get('encode', 0):.1f} s); content hash {manifest['content_hash'][:16]}",
    ]
    if out is not None:
        lines.append(f"{'up to date' if manifest.get('skipped') else 'wrote'} {out}")
    return "\n".join(lines)
