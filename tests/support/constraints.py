"""Shared pieces of the constrained-decoding tests (no tests here): schemas that a random model must always
satisfy, and a random walk through a grammar (random logits, masked, sampled: what a random model does)."""

from __future__ import annotations

import torch

from loopcoder.inference.constraints import Constraint, GrammarCompiler, mask_logits

# Every string, array and number is bounded, so that even a random walk ends well within max_tokens; together
# they cover nested objects, arrays of objects, enums, consts, numbers with bounds, booleans, nulls, required
# and optional properties, anyOf.
SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": -5, "maximum": 999},
            "status": {"enum": ["open", "closed", "merged"]},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "draft": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
            "author": {
                "type": "object",
                "properties": {"login": {"type": "string", "maxLength": 8}, "admin": {"type": "boolean"}},
                "required": ["login"],
                "additionalProperties": False,
            },
            "files": {
                "type": "array",
                "minItems": 1,
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "path": {"type": "string", "maxLength": 10},
                        "lines": {"type": "integer", "minimum": 1, "maximum": 50},
                    },
                    "required": ["path", "lines"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["id", "status", "author", "files"],
        "additionalProperties": False,
    },
    "choice": {
        "type": "object",
        "properties": {
            "kind": {"const": "answer"},
            "value": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 9},
                    {"type": "null"},
                    {"type": "array", "items": {"enum": [1, 2.5, "x"]}, "maxItems": 2},
                ]
            },
        },
        "required": ["kind", "value"],
        "additionalProperties": False,
    },
}


def random_walk(
    compiler: GrammarCompiler,
    constraint: Constraint,
    seed: int,
    *,
    end_ids=(2,),
    prefix=(),
    max_tokens: int = 200,
    scale: float = 3.0,
) -> tuple[list[int], str]:
    """Sample tokens from random logits under the constraint's mask until it ends; (tokens, why it ended:
    "end" a stop token, "done" the grammar is complete, "length")."""
    m = compiler.matcher(constraint, end_ids)
    g = torch.Generator().manual_seed(seed)
    tokens = list(prefix)
    for t in tokens:
        m.accept(t)
    vocab = compiler.vocab_size
    for _ in range(max_tokens):
        logits = torch.randn(1, vocab, generator=g) * scale
        assert mask_logits(logits, [m]) == {}
        t = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        if t in m.end_ids:
            return tokens, "end"
        m.accept(t)
        tokens.append(t)
        if m.done:
            return tokens, "done"
    return tokens, "length"
