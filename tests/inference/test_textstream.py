"""`TextStream`: detokenisation, stop strings and what may be streamed, against the whole text cut once."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from loopcoder.inference.textstream import TextStream
from support.whole_streams import WholeTextStream


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


# ------------------------------------------------------------------- incremental decoding against the old whole
SAMPLES = [
    "def héllo(wörld):\n    return '日本語' + \"🙂\" * 3  # ünïcode\n",
    "for i in range(10):\n    print(f'{i}: ✓ ≤ ≥ → ←')\n",
    '<tool_call>\n{"name": "f", "arguments": {"x": "ÄÖÜ 中文"}}\n</tool_call><|im_end|>',
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """loopcoder's byte-level BPE tokenizer (special and tool tokens at their fixed ids), trained on code with
    multi-byte characters so that merges split and join characters, loaded as the engine loads it."""
    from loopcoder.data import tokenizer as T
    from loopcoder.model.loading import load_tokenizer

    corpus = [s * 3 for s in SAMPLES] * 20 + [Path(__file__).read_text()]
    tok = T.train_tokenizer(corpus, vocab_size=600)
    return load_tokenizer(T.save_tokenizer(tok, tmp_path_factory.mktemp("tok")))


def random_ids(rng: random.Random, tok) -> list[int]:
    """Real text's tokens, random ids (bytes that need not form UTF-8, special tokens), or both mixed."""
    text = "".join(rng.choice(SAMPLES)[rng.randrange(30) :][: rng.randint(1, 60)] for _ in range(rng.randint(1, 4)))
    real = tok(text, add_special_tokens=False)["input_ids"]
    noise = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
    kind = rng.randrange(3)
    if kind == 0:
        return real
    if kind == 1:
        return noise
    mixed = real + noise
    rng.shuffle(mixed)
    return mixed


def random_stops(rng: random.Random, tok, ids: list[int]) -> list[str]:
    """Pieces of the sequence's own text (they straddle tokens and split characters' neighbours), and others."""
    text = tok.decode(ids, skip_special_tokens=False)
    stops = []
    for _ in range(rng.randint(0, 3)):
        if text and rng.random() < 0.7:
            i = rng.randrange(len(text))
            stops.append(text[i : i + rng.randint(1, 6)])
        else:
            stops.append("".join(rng.choice("ab é🙂\n{}") for _ in range(rng.randint(1, 4))))
    return stops


def drive(stream, ids: list[int], take_every: int) -> list:
    """What a caller sees: per token, push's answer and (every `take_every` tokens) the piece taken; the end."""
    seen = []
    for n, t in enumerate(ids, 1):
        stopped = stream.push(t)
        seen.append((stopped, stream.take() if n % take_every == 0 else None))
        if stopped:
            break
    seen.append(stream.take(final=True))
    return [seen, stream.text, stream.stopped, len(stream.ids)]


@pytest.mark.parametrize("seed", range(8))
def test_incremental_decoding_matches_decoding_everything_every_token(bpe, seed):
    rng = random.Random(seed)
    for _ in range(150):
        ids = random_ids(rng, bpe)
        stop = random_stops(rng, bpe, ids)
        take_every = rng.choice([1, 1, 2, 5])
        new, old = drive(TextStream(bpe, stop), ids, take_every), drive(WholeTextStream(bpe, stop), ids, take_every)
        assert new == old, (ids, stop, take_every)


class CountingTokenizer(ByteTokenizer):
    def __init__(self):
        self.longest = 0

    def decode(self, ids, skip_special_tokens=False):
        self.longest = max(self.longest, len(ids))
        return super().decode(ids, skip_special_tokens)


def test_each_token_decodes_only_the_unsettled_window():
    tok = CountingTokenizer()
    ts = TextStream(tok, ["\n\n\n"])
    text = "héllo wörld 🙂, " * 200
    for b in text.encode():
        ts.push(b)
        ts.take()
    assert ts.text == text and len(ts.ids) > 3000
    assert tok.longest <= 1 + 4  # the last settled token as context, and at most one split character's bytes
