"""The built-in instruction set: documented functions and methods -> chat records, split like the corpus."""

from __future__ import annotations

import json

import pytest

from loopcoder.data.corpus import Document, iter_documents
from loopcoder.data.instructions import (
    build_instruction_set,
    extract_functions,
    module_name,
    to_messages,
    write_instruction_set,
)
from loopcoder.data.tokenizer import load_raw_tokenizer
from loopcoder.utils.errors import LoopcoderError
from support.data import data_config, small_build

SOURCE = '''"""A module."""
import functools


def no_doc(x):
    return x


def documented(a, b=2):
    """Add a and b.

Continuation at column 0.
    """
    return a + b


class Box:
    """A box."""

    @functools.cache
    def area(self, w: int, h: int) -> int:
        """The area."""
        # a comment
        return w * h

    def stub(self):
        """Not yet."""
        ...

    async def fetch(self):
        """Fetch it."""
        await self.area(1, 2)

    class Inner:
        def hidden(self):
            """Nested classes are not visited."""
            return 1
'''


def test_extract_functions_exact_source():
    fns = {f["qualname"]: f for f in extract_functions(SOURCE, "pkg.mod")}
    assert set(fns) == {"documented", "Box.area", "Box.fetch"}
    assert fns["documented"]["code"] == SOURCE[SOURCE.index("def documented") : SOURCE.index("\n\n\nclass")] + "\n"
    area = fns["Box.area"]
    assert area["code"] == (
        '@functools.cache\ndef area(self, w: int, h: int) -> int:\n    """The area."""\n'
        "    # a comment\n    return w * h\n"
    )
    assert area["stub"] == '@functools.cache\ndef area(self, w: int, h: int) -> int:\n    """The area."""\n'
    user, assistant = to_messages(area)
    assert user["role"] == "user" and "the method `area` of class `Box` (module `pkg.mod`)" in user["content"]
    assert area["stub"] in user["content"] and "return w * h" not in user["content"]
    assert assistant == {"role": "assistant", "content": f"```python\n{area['code']}```"}
    assert module_name("json/decoder.py") == "json.decoder" and module_name("json/__init__.py") == "json"
    assert module_name("stdlib:email/utils.py") == "email.utils"


def test_records_follow_the_file_split_and_drop_leaks_and_long_ones():
    other = SOURCE.replace("def documented", "def documented_too")
    docs = [
        Document("a.py", SOURCE, "h1", len(SOURCE), "train"),
        Document("b.py", other, "h2", len(other), "validation"),
        Document("c.py", "def broken(:\n", "h3", 13, "train"),
    ]
    records, stats = build_instruction_set(docs, tokenizer=None)
    assert [r["id"] for r in records["train"]] == ["a.py::documented", "a.py::Box.area", "a.py::Box.fetch"]
    # b.py's methods are the same code as a.py's (train): only its renamed function stays in validation.
    assert [r["id"] for r in records["validation"]] == ["b.py::documented_too"]
    assert (stats.unparsable, stats.duplicates, stats.candidates) == (1, 2, 6)
    lengths = [len(f["code"]) for d in docs[:2] for f in extract_functions(d.text, "m")]
    _, stats = build_instruction_set(docs, max_code_chars=100)
    assert stats.too_long == sum(n > 100 for n in lengths) and 0 < stats.too_long < len(lengths)


def test_write_instruction_set_for_a_data_directory(tmp_path):
    out, _ = small_build(tmp_path, seq_len=256, val_fraction=0.3)
    result = write_instruction_set(out)
    split_of = {d.id: d.split for d in iter_documents(data_config(tmp_path / "corpus", val_fraction=0.3).corpus)}
    counts = {}
    for split in ("train", "validation"):
        lines = (out / "instructions" / f"{split}.jsonl").read_text().splitlines()
        recs = [json.loads(line) for line in lines]
        counts[split] = len(recs)
        assert recs and all(split_of[r["source"]] == split for r in recs)
        assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in recs)
    assert result["statistics"]["train"] == counts["train"] and result["max_tokens"] == 256
    # The token limit is real: every record fits, and a lower limit drops some.
    tok = load_raw_tokenizer(out)
    recs = [json.loads(line) for line in (out / "instructions" / "train.jsonl").read_text().splitlines()]
    chatml = ["".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in r["messages"]) for r in recs]
    lengths = [len(tok.encode(t, add_special_tokens=False).ids) for t in chatml]
    assert max(lengths) <= 256
    smaller = write_instruction_set(out, tmp_path / "small", max_tokens=min(lengths))
    assert 0 < smaller["statistics"]["train"] < counts["train"]
    with pytest.raises(LoopcoderError, match="too small"):
        write_instruction_set(out, tmp_path / "x", max_tokens=4)
    with pytest.raises(LoopcoderError, match=r"no manifest\.json"):
        write_instruction_set(tmp_path / "corpus")
