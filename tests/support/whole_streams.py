"""The streaming algorithms before incremental decoding, kept as the references that the new ones must equal
(tests/inference/test_textstream.py, tests/serving/test_tool_calls.py) and beat (benchmarks/detokenize.py): every
token decodes all the ids again, every `calls()` parses the whole buffer again."""

from __future__ import annotations

from loopcoder.serving.tool_calls import ParsedOutput, _open_call, _partial_suffix


class WholeTextStream:
    """The algorithm before incremental decoding, kept as the reference: every push decodes all the ids."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.hold = max(map(len, self.stop), default=0)
        self.ids, self.text, self.stopped, self.emitted = [], "", False, 0

    def push(self, token_id):
        if self.stopped:
            raise ValueError("the text already ended at a stop string")
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if self.stop:
            start = max(0, len(self.text) - self.hold)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                text, self.stopped = text[: min(hits)], True
        self.text = text
        return self.stopped

    def take(self, final=False):
        end = len(self.text)
        if not (final or self.stopped):
            if self.text.endswith("\ufffd"):
                end -= 1
            if self.hold:
                end = max(self.emitted, end - (self.hold - 1))
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece


class WholeToolCallStream:
    """The stream before block-by-block parsing, kept as the reference: `calls()` parses the whole buffer again."""

    def __init__(self, parser):
        self.parser, self._held, self._buffer, self._sent, self._checked = parser, "", None, 0, 0

    def calls(self):
        if self._buffer is None or len(self._buffer) == self._checked:
            return []
        self._checked = len(self._buffer)
        found = self.parser.parse(self._buffer).tool_calls
        new, self._sent = found[self._sent :], len(found)
        return new

    def feed(self, text):
        if self._buffer is not None:
            self._buffer += text
            return ""
        held = self._held + text
        marker = self.parser.start_marker
        at = held.find(marker)
        if at >= 0:
            head = held[:at]
            out = head.rstrip()
            self._buffer = head[len(out) :] + held[at:]
            self._held = ""
            return out
        keep = _partial_suffix(held, marker)
        head = held[: len(held) - keep]
        out = head.rstrip()
        self._held = held[len(out) :]
        return out

    def finish(self, cut=False):
        if self._buffer is None:
            return ParsedOutput(self._held)
        if not cut:
            parsed = self.parser.parse(self._buffer)
            return ParsedOutput(parsed.content or "", parsed.tool_calls[self._sent :])
        calls = self.parser.parse(self._buffer).tool_calls
        open_call = _open_call(self.parser, self._buffer)
        return ParsedOutput("", calls[self._sent :] + ([open_call] if open_call else []))
