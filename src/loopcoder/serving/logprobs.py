"""Log-probabilities in OpenAI's two shapes: chat's `logprobs.content` and the completions `logprobs` object.

The values are the model's (after a grammar's mask, before any bias or penalty: `sampling.py`). Token texts are
each token decoded alone, and a chat token's `bytes` are that text's UTF-8 bytes, as vLLM gives them (a token that
holds part of a character decodes to U+FFFD). A token the grammar forbids has logprob -inf, which JSON cannot
carry: it is reported as -9999.0, as vLLM does.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from loopcoder.inference.sampling import TokenLogprob

FLOOR = -9999.0  # -inf (and NaN) as reported


def _value(x: float) -> float:
    return x if math.isfinite(x) else FLOOR


class TokenTexts:
    """Token id -> its text (decoded alone, special tokens kept), cached."""

    def __init__(self, tokenizer: Any, cache_size: int = 1 << 16) -> None:
        self.tokenizer = tokenizer
        self.text = lru_cache(maxsize=cache_size)(self._decode)

    def _decode(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


def chat_content(entries: list[TokenLogprob], texts: TokenTexts) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content`: one entry per generated token, with its `top_logprobs`."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        text = texts.text(token)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode("utf-8", "replace"))}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]


def completion_logprobs(
    token_ids: list[int], entries: list[TokenLogprob | None], texts: TokenTexts, offset: int = 0
) -> dict[str, Any]:
    """A completion choice's `logprobs` for `token_ids` (entries aligned with them): `tokens`, `token_logprobs`,
    `top_logprobs` (the most likely tokens and the chosen one, as a dict keyed by text: of tokens that decode alike,
    the chosen one's value, else the most likely one's) and `text_offset` (where each token starts
    in the choice's text, from `offset`). An entry that is None (the first prompt token: it has no context) gives
    nulls."""
    tokens, values, tops, offsets = [], [], [], []
    for token, e in zip(token_ids, entries):
        text = texts.text(token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if e is None:
            values.append(None)
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for t, lp in ((e.token, e.logprob), *e.top):  # tokens that decode alike: the chosen one, else the likeliest
            top.setdefault(texts.text(t), _value(lp))
        values.append(_value(e.logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
