"""Shared helpers of the data tests (no tests here): a small synthetic Python corpus and a tiny build."""

from __future__ import annotations

import io
import random
from pathlib import Path

from loopcoder.data.build import BuildConfig, build
from loopcoder.data.corpus import CorpusSpec

_WORDS = ["alpha", "beta", "gamma", "delta", "count", "total", "value", "items", "name", "index", "result"]


def _module(rng: random.Random, k: int) -> str:
    parts = [f'"""Module {k}: helpers for {rng.choice(_WORDS)}."""\n\nimport os\n']
    for j in range(rng.randint(2, 4)):
        a, b = rng.sample(_WORDS, 2)
        parts.append(
            f"\n\ndef {a}_{b}_{k}_{j}({a}, {b}=None):\n"
            f'    """Return the {a} combined with {b} ({k}.{j})."""\n'
            f"    {b} = {b} or {rng.randint(0, 99)}\n"
            f"    for i in range({rng.randint(2, 9)}):\n"
            f"        {a} = {a} + i * {b}\n"
            f"    return {a}\n"
        )
    parts.append(
        f"\n\nclass Thing{k}:\n"
        f'    """A thing number {k}."""\n\n'
        f"    def __init__(self, size):\n"
        f"        self.size = size\n\n"
        f"    @property\n"
        f"    def doubled(self):\n"
        f'        """Twice the size."""\n'
        f"        return self.size * {rng.randint(2, 5)}\n\n"
        f"    def todo(self):\n"
        f'        """Not written yet."""\n'
        f"        raise NotImplementedError\n"
    )
    return "".join(parts)


def make_corpus(root: Path, n_files: int = 40, seed: int = 0) -> Path:
    """An ASCII Python corpus plus one file of each kind the cleaner must skip."""
    rng = random.Random(seed)
    (root / "pkg" / "sub").mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        d = root / "pkg" if k % 2 else root / "pkg" / "sub"
        (d / f"mod{k}.py").write_text(_module(rng, k))
    (root / "pkg" / "z_copy_of_mod1.py").write_text((root / "pkg" / "mod1.py").read_text())  # duplicate
    (root / "pkg" / "blob.py").write_bytes(b"x = 1\n\0\0\0binary")  # binary
    (root / "pkg" / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))  # undecodable
    (root / "pkg" / "empty.py").write_text("   \n")  # empty
    (root / "pkg" / "huge.py").write_text("x = 1\n" * 50_000)  # too large (300 kB)
    (root / "pkg" / "notes.txt").write_text("not python\n")  # wrong extension
    (root / "pkg" / "__pycache__").mkdir(exist_ok=True)
    (root / "pkg" / "__pycache__" / "cached.py").write_text("y = 2\n")  # default-ignored directory
    (root / "pkg" / "vendored").mkdir(exist_ok=True)
    (root / "pkg" / "vendored" / "lib.py").write_text("z = 3\n")  # ignored by pattern in some tests
    return root


def data_config(source: Path, **overrides) -> BuildConfig:
    corpus = {k: overrides.pop(k) for k in list(overrides) if k in CorpusSpec.__dataclass_fields__}
    spec = CorpusSpec(sources=(str(source),), val_fraction=corpus.pop("val_fraction", 0.25), **corpus)
    fields = {"vocab_size": 400, "seq_len": 64, **overrides}
    return BuildConfig(corpus=spec, **fields)


def small_build(tmp: Path, name: str = "data", **overrides) -> tuple[Path, dict]:
    src = tmp / "corpus"
    if not src.exists():
        make_corpus(src)
    out = tmp / name
    manifest = build(data_config(src, **overrides), out, log=io.StringIO())
    return out, manifest


def tiny_model_dir(tmp: Path, max_positions: int) -> tuple[Path, Path]:
    """A random 2-loop PLT (hidden 32) made for the tokenizer of `small_build` (`init --data`): (model dir,
    data dir)."""
    import contextlib

    from loopcoder.cli import main

    data, _ = small_build(tmp, seq_len=64)
    out = tmp / "model"
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "init",
                    "--out",
                    str(out),
                    "--hidden-size",
                    "32",
                    "--layers",
                    "2",
                    "--heads",
                    "4",
                    "--data",
                    str(data),
                    "--window",
                    "4",
                    "--max-positions",
                    str(max_positions),
                    "--loops",
                    "2",
                ]
            )
            == 0
        )
    return out, data
