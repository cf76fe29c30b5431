"""The text of one completion as its tokens arrive: detokenised, cut at stop strings, released when final.

The engine keeps one `TextStream` per request, so `loopcoder generate`, `Engine.generate`/`stream`, the
evaluation runner and `loopcoder serve` all cut and stream text the same way.

Each token costs the same however long the output already is: the ids are decoded incrementally, as vLLM's
incremental detokenizer does it (a prefix offset and a read offset), and stop strings are searched for only
where a new match can lie. The text is what decoding all the ids at once gives (tests/inference/test_textstream.py
checks it against that on random token sequences of a byte-level BPE tokenizer).
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder gives for a UTF-8 character split across tokens


class TextStream:
    """Decodes a growing list of token ids. `push` one token at a time; `take` returns the text that can no
    longer change. Held back until it is final: a trailing split UTF-8 character (it decodes to U+FFFD
    until its last byte arrives) and, with stop strings, the last `len(longest stop) - 1` characters (they
    could be the start of a stop string). A stop string ends the text just before it.

    Decoding: the text of `ids[:read]` is settled (it ended on a whole character, so later tokens cannot change
    it); each push decodes only `ids[prefix:]`, where `prefix` is the previous settled point (context for
    decoders that treat a leading token specially, e.g. a leading space), and keeps what it adds to the text of
    `ids[prefix:read]`. Why not `tokenizers.decoders.DecodeStream`: it needs the raw `tokenizers.Tokenizer` (the
    engine takes any transformers tokenizer) and hides a pending U+FFFD, which `text` shows as before.

    Without a tokenizer the text stays empty (token ids only, as benchmarks use the engine).
    """

    def __init__(self, tokenizer: Any, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.hold = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.stopped = False  # a stop string was found: `text` ends before it
        self.emitted = 0  # characters of `text` already returned by `take`
        self._settled: list[str] = []  # the text of ids[:read], in pieces
        self._settled_len = 0
        self._recent = ""  # its last `hold` characters: where a stop string may begin
        self._unsent: list[str] = []  # its pieces from `_unsent_at` on (what `take` has not passed yet)
        self._unsent_at = 0
        self._prefix = self._read = 0  # token offsets: decoding starts at `prefix`; ids[:read] are settled
        self._prefix_text = ""  # the text of ids[prefix:read]
        self._tail = ""  # the text of ids[read:] (it may still change, e.g. end in U+FFFD)

    @property
    def text(self) -> str:
        """The text so far (cut before a stop string once one is found)."""
        if len(self._settled) > 1:
            self._settled = ["".join(self._settled)]
        return (self._settled[0] if self._settled else "") + self._tail

    def push(self, token_id: int) -> bool:
        """Add a token; True when the text now contains a stop string (then it is cut before the first one)."""
        if self.stopped:
            raise ValueError("the text already ended at a stop string")
        self.ids.append(token_id)
        if self.tokenizer is None:
            return False
        before = self._settled_len + len(self._tail)
        self._tail = self._decode_tail()
        if self.stop:
            self._cut_at_stop(max(0, before - self.hold))  # a new match ends in the new text
        if not self.stopped and self._tail and not self._tail.endswith(REPLACEMENT):
            self._settle()
        return self.stopped

    def take(self, final: bool = False) -> str:
        """The text that became final since the last call; `final`: the stream ended, release everything."""
        length = self._settled_len + len(self._tail)
        end = length
        if not (final or self.stopped):
            if self._tail.endswith(REPLACEMENT):  # the settled text never ends in one
                end -= 1
            if self.hold:
                end = max(self.emitted, end - (self.hold - 1))
        if end <= self.emitted:
            return ""
        pending = "".join(self._unsent) + self._tail  # the text from `_unsent_at` on
        piece = pending[self.emitted - self._unsent_at : end - self._unsent_at]
        self.emitted = end
        if end >= self._settled_len:
            self._unsent, self._unsent_at = [], self._settled_len
        else:  # keep the settled text not yet passed as one piece
            self._unsent, self._unsent_at = [pending[end - self._unsent_at : self._settled_len - self._unsent_at]], end
        return piece

    def _decode_tail(self) -> str:
        """The text of ids[read:], from a decode of ids[prefix:] only (all ids when a decoder breaks the rule)."""
        window = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=False)
        if not window.startswith(self._prefix_text):  # ids[prefix:read] alone decode otherwise (a leading space)
            self._prefix_text = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=False)
        if window.startswith(self._prefix_text):
            return window[len(self._prefix_text) :]
        whole = self.tokenizer.decode(self.ids, skip_special_tokens=False)  # the settled text is not a prefix here
        return whole[self._settled_len :]

    def _settle(self) -> None:
        """The tail ended on a whole character: it joins the settled text, and decoding starts after it."""
        piece = self._tail
        self._settled.append(piece)
        self._unsent.append(piece)
        self._settled_len += len(piece)
        if self.hold:
            self._recent = (self._recent + piece)[-self.hold :]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text, self._tail = piece, ""

    def _cut_at_stop(self, start: int) -> None:
        """Find the first stop string that begins at `start` or later; cut the text before it."""
        base = self._settled_len - len(self._recent)  # where `_recent` begins in the text
        if start < base:  # cannot happen: `start` is at most `hold` characters before the settled end
            raise AssertionError("stop search starts before the recent text")
        window = self._recent + self._tail
        hits = [i for i in (window.find(s, start - base) for s in self.stop) if i >= 0]
        if not hits:
            return
        cut = base + min(hits)
        self.stopped = True
        if cut >= self._settled_len:
            self._tail = self._tail[: cut - self._settled_len]
            return
        whole = self.text  # a stop string that begins in the settled text: it is cut there (once per stream)
        self._settled = [whole[:cut]]
        self._unsent = [whole[self._unsent_at : cut]] if self._unsent_at < cut else []
        self._settled_len, self._tail = cut, ""
