"""`TextStream`: detokenisation, stop strings and what may be streamed, against the whole text cut once."""

from __future__ import annotations

import random

import pytest

from loopcoder.inference.textstream import TextStream


class ByteTokenizer:
    """Token i is byte i, decoded as UTF-8 with replacement characters, as byte-level BPE decoders do."""

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


def run(text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    """Push `text`'s bytes one at a time until a stop string; the pieces `take` returned, then the final one."""
    ts = TextStream(ByteTokenizer(), stop)
    pieces = []
    for b in text.encode():
        stopped = ts.push(b)
        pieces.append(ts.take())
        if stopped:
            break
    pieces.append(ts.take(final=True))
    return pieces, ts


def cut(text: str, stop: list[str]) -> str:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else text


def test_stop_string_ends_the_text_before_it():
    pieces, ts = run("def f():\n    return 1\n\ndef g():", ["\ndef", "\n\n\n"])
    assert ts.stopped and ts.text == "def f():\n    return 1\n"
    assert "".join(pieces) == ts.text


def test_the_earliest_of_several_stop_strings_wins():
    pieces, ts = run("abcdef", ["de", "bcd"])
    assert ts.text == "a" and "".join(pieces) == "a"


def test_a_possible_stop_prefix_is_held_back_until_it_is_decided():
    ts = TextStream(ByteTokenizer(), ["xyz"])
    for ch in "abx":
        ts.push(ord(ch))
    assert ts.take() == "a"  # "bx" could still become "...xyz": held (len("xyz") - 1 characters)
    ts.push(ord("y"))
    assert ts.take() == "b"
    ts.push(ord("a"))  # "xya" is not a stop: released up to the last two characters
    assert ts.take() == "x"
    assert ts.take(final=True) == "ya"


def test_a_split_utf8_character_is_held_until_complete():
    ts = TextStream(ByteTokenizer())
    first, second = "é".encode()
    ts.push(ord("a"))
    ts.push(first)
    assert ts.text == "a\ufffd" and ts.take() == "a"
    ts.push(second)
    assert ts.take() == "é"
    emoji = "🙂".encode()  # four bytes: three partial states
    for b in emoji[:-1]:
        ts.push(b)
        assert ts.take() == ""
    ts.push(emoji[-1])
    assert ts.take() == "🙂"


def test_a_stop_string_split_across_tokens_and_characters():
    pieces, ts = run("héllo wörld", ["ö"])
    assert ts.text == "héllo w" and "".join(pieces) == "héllo w"


@pytest.mark.parametrize("seed", range(20))
def test_streamed_pieces_add_up_to_the_text_cut_at_the_first_stop(seed):
    rng = random.Random(seed)
    alphabet = "ab\n é"
    text = "".join(rng.choice(alphabet) for _ in range(40))
    stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 2))]
    pieces, ts = run(text, stop)
    assert "".join(pieces) == ts.text == cut(text, stop)
    assert ts.stopped == (ts.text != text)
    assert "\ufffd" not in "".join(pieces)


def test_without_a_tokenizer_there_is_no_text():
    ts = TextStream(None, ["x"])
    assert ts.push(5) is False and ts.text == "" and ts.take(final=True) == ""


def test_nothing_follows_a_stop():
    ts = TextStream(ByteTokenizer(), ["b"])
    assert ts.push(ord("a")) is False and ts.push(ord("b")) is True
    with pytest.raises(ValueError):
        ts.push(ord("c"))
