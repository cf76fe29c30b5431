"""The text of one completion as its tokens arrive: detokenised, cut at stop strings, released when final.

The engine keeps one `TextStream` per request, so `loopcoder generate`, `Engine.generate`/`stream`, the
evaluation runner and `loopcoder serve` all cut and stream text the same way.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder gives for a UTF-8 character split across tokens


class TextStream:
    """Decodes a growing list of token ids. `push` one token at a time; `take` returns the text that can no
    longer change. Held back until it is final: a trailing split UTF-8 character (it decodes to U+FFFD
    until its last byte arrives) and, with stop strings, the last `len(longest stop) - 1` characters (they
    could be the start of a stop string). A stop string ends the text just before it.

    Without a tokenizer the text stays empty (token ids only, as benchmarks use the engine).
    """

    def __init__(self, tokenizer: Any, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.hold = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False  # a stop string was found: `text` ends before it
        self.emitted = 0  # characters of `text` already returned by `take`

    def push(self, token_id: int) -> bool:
        """Add a token; True when the text now contains a stop string (then it is cut before the first one)."""
        if self.stopped:
            raise ValueError("the text already ended at a stop string")
        self.ids.append(token_id)
        if self.tokenizer is None:
            return False
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if self.stop:
            start = max(0, len(self.text) - self.hold)  # a new match ends in the new text
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                text, self.stopped = text[: min(hits)], True
        self.text = text
        return self.stopped

    def take(self, final: bool = False) -> str:
        """The text that became final since the last call; `final`: the stream ended, release everything."""
        end = len(self.text)
        if not (final or self.stopped):
            if self.text.endswith(REPLACEMENT):
                end -= 1
            if self.hold:
                end = max(self.emitted, end - (self.hold - 1))
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece
