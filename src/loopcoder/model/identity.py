"""What a model directory is: the fingerprint of the tokenizer it was trained with, and its weights' checksums.

A tokenizer is identified by its content, not its size: two byte-level BPEs of 4,096 tokens trained on
different corpora agree on a few hundred of their id/token pairs, so a model paired with the other one
reads scrambled ids. The fingerprint is a SHA-256 of a canonical form of `tokenizer.json`'s parts that
decide which id a text gets and which text an id stands for: the model (type, vocabulary, merges and
options), the added tokens (id, content, special), the normaliser and the pre-tokeniser. Formatting,
padding and truncation settings and the file's bytes do not count, so a tokenizer saved again by another
tool keeps its fingerprint.

`model_identity.json`, written beside the weights by every loopcoder writer (init, training checkpoints,
SFT, export), records that fingerprint and each weights file's size and SHA-256. A directory without it
(the released LoopCoder-V2 layout, or one written by an older loopcoder) is checked by computing its own
tokenizer's fingerprint, and its weights are checked by loading them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.errors import CheckpointError, LoopcoderError

IDENTITY_FILE = "model_identity.json"
IDENTITY_FORMAT = 1
FINGERPRINT_VERSION = 1  # part of the hashed form: a change of canonicalisation changes every fingerprint
OVERRIDE_FLAG = "--allow-tokenizer-mismatch"
OVERRIDE_KEY = "data.allow_tokenizer_mismatch=true"
# Files that make up a tokenizer besides tokenizer.json (slow tokenizers: vocabularies, sentencepiece models)
_OTHER_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")
_CHUNK = 8 << 20


class TokenizerMismatch(LoopcoderError):
    """A model paired with a tokenizer (or data) of another vocabulary: the message names both sources."""


def short(fingerprint: str | None) -> str:
    """How a fingerprint is shown in messages."""
    return "none" if fingerprint is None else fingerprint[:12]


# ----------------------------------------------------------------------------- tokenizer fingerprints
def _canonical(doc: dict[str, Any]) -> dict[str, Any]:
    model = dict(doc.get("model") or {})
    merges = model.get("merges")
    if isinstance(merges, list):  # tokenizers writes "a b" strings or ["a", "b"] pairs depending on its version
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    added = sorted(
        (
            {"id": int(t["id"]), "content": str(t["content"]), "special": bool(t.get("special", False))}
            for t in doc.get("added_tokens") or []
        ),
        key=lambda t: t["id"],
    )
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "model": model,
        "added_tokens": added,
        "normalizer": doc.get("normalizer"),
        "pre_tokenizer": doc.get("pre_tokenizer"),
    }


def fingerprint_tokenizer_json(text: str | bytes, where: str = "tokenizer.json") -> str:
    """The fingerprint of a `tokenizer.json` document (`tokenizers.Tokenizer.to_str()` gives one too)."""
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
            raise ValueError("no 'model' object")
        canonical = _canonical(doc)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise LoopcoderError(f"{where}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None
    blob = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenizer_files_dir(path: str | os.PathLike) -> Path | None:
    """The directory holding the tokenizer of a tokenizer, model or data directory (`DIR/tokenizer/`), or None."""
    p = Path(path)
    for d in (p, p / "tokenizer"):
        if (d / "tokenizer.json").is_file() or any((d / f).is_file() for f in _OTHER_TOKENIZER_FILES):
            return d
    return None


def tokenizer_fingerprint(path: str | os.PathLike) -> str | None:
    """The fingerprint of the tokenizer in a tokenizer, model or data directory; None when there is none.
    A tokenizer without `tokenizer.json` (slow tokenizers only) is fingerprinted by its files' bytes."""
    d = tokenizer_files_dir(path)
    if d is None:
        return None
    f = d / "tokenizer.json"
    if f.is_file():
        return fingerprint_tokenizer_json(_read_bytes(f), str(f))
    h = hashlib.sha256(f"loopcoder-tokenizer-files-v{FINGERPRINT_VERSION}".encode())
    for name in _OTHER_TOKENIZER_FILES:
        if (d / name).is_file():
            h.update(name.encode() + b"\0" + _read_bytes(d / name))
    return h.hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise LoopcoderError(f"cannot read {path}: {e.strerror or e}") from None


def model_tokenizer_fingerprint(model_dir: str | os.PathLike) -> tuple[str | None, str]:
    """(fingerprint, where it comes from) of the tokenizer a model was trained with: the one its identity
    file records, else its own tokenizer's (computed), else (None, ...) when it has neither."""
    identity = read_identity(model_dir)
    recorded = (identity or {}).get("tokenizer", {}).get("fingerprint")
    if recorded:
        return str(recorded), f"{str(model_dir)!r} ({IDENTITY_FILE})"
    return tokenizer_fingerprint(model_dir), repr(str(model_dir))


def check_same_tokenizer(
    expected: str | None, expected_source: str, actual: str | None, actual_source: str, override: str, allow: bool
) -> bool:
    """Raise `TokenizerMismatch` (one line naming both sources and the override) unless the two
    fingerprints agree, either is unknown, or `allow`. Returns whether they were found to differ."""
    if expected is None or actual is None or expected == actual:
        return False
    if allow:
        return True
    raise TokenizerMismatch(
        f"tokenizer mismatch: {actual_source} has tokenizer {short(actual)}, but {expected_source} "
        f"was made with tokenizer {short(expected)}; their ids mean different tokens. Use the matching "
        f"tokenizer (`loopcoder init --data DIR` makes a model for a data directory's), or pass {override} "
        "if you mean it"
    )


# ----------------------------------------------------------------------------- the identity file
def weights_files(model_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_identity(model_dir: str | os.PathLike, tokenizer_fp: str | None = None) -> dict[str, Any]:
    """Record the weights' checksums and the tokenizer's fingerprint (given, else the directory's own
    tokenizer's) in `model_dir/model_identity.json`."""
    d = Path(model_dir)
    fp = tokenizer_fp if tokenizer_fp is not None else tokenizer_fingerprint(d)
    identity: dict[str, Any] = {
        "format": IDENTITY_FORMAT,
        "tokenizer": {"fingerprint": fp, "fingerprint_version": FINGERPRINT_VERSION} if fp else {},
        "weights": {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in weights_files(d)},
    }
    atomic_write_text(d / IDENTITY_FILE, json.dumps(identity, indent=1, sort_keys=True) + "\n")
    return identity


def read_identity(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The identity file of a model directory, None if it has none; a damaged one is a one-line error."""
    f = Path(model_dir) / IDENTITY_FILE
    if not f.is_file():
        return None
    try:
        identity = json.loads(_read_bytes(f))
        if not isinstance(identity, dict) or not isinstance(identity.get("weights", {}), dict):
            raise ValueError("not an object with 'weights'")
        if not isinstance(identity.get("tokenizer", {}), dict):
            raise ValueError("'tokenizer' is not an object")
    except ValueError as e:
        raise CheckpointError(
            f"{f} is damaged ({str(e).splitlines()[0][:200]}); delete it to skip the checks"
        ) from None
    return identity


def verify_weights(model_dir: str | os.PathLike) -> bool:
    """Check the weights files against the sizes and checksums the identity file records (a truncated,
    emptied or byte-flipped file is named). False when there is no record to check against."""
    d = Path(model_dir)
    identity = read_identity(d)
    if not identity or not identity.get("weights"):
        return False
    recorded = identity["weights"]
    present = {p.name for p in weights_files(d)}
    if extra := sorted(present - set(recorded)):
        raise CheckpointError(
            f"{d / extra[0]} is not among the weights {IDENTITY_FILE} records ({', '.join(sorted(recorded))}); "
            f"if the weights were rewritten on purpose, delete {d / IDENTITY_FILE}"
        )
    for name, want in sorted(recorded.items()):
        p = d / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing ({IDENTITY_FILE} records it)")
        size = p.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(
                f"{p} has {size:,} bytes, {int(want.get('bytes') or 0):,} when it was written: truncated or replaced"
            )
        if file_sha256(p) != want.get("sha256"):
            raise CheckpointError(
                f"{p} does not match the checksum recorded when it was written: its bytes changed on disk"
            )
    return True
