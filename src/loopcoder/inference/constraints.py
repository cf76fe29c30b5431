"""Grammar-constrained decoding: a request's output must match a JSON schema, a regex or a Lark grammar.

Built on llguidance (docs/serving.md, "Constrained decoding", says why this library). The engine only calls
`GrammarCompiler.matcher` when a constrained request arrives and `mask_logits` before sampling; the rest is here.

- `Constraint`: what an output must match, carried by `SamplingParams.constraint`. Its `key` is canonical text,
  so equal constraints share one compiled grammar.
- `GrammarCompiler`: one tokenizer's grammars. A constraint is compiled once into a template matcher and
  cached (LRU by key; thread-safe, because the server compiles on its tokenizer thread to answer a bad
  schema with a 400, and the engine thread reuses the result). Each request gets a fresh copy.
- `GrammarMatcher`: one request's parser: the tokens allowed at its next step (a row of a bitmask, one bit per
  token), the token it accepted, whether the grammar is complete. The grammar's end (llguidance's EOS bit) is
  mapped to the request's own stop tokens: they are allowed exactly where the output may end.
- `mask_logits`: fills the masks of a batch's constrained rows and applies them to those rows only: other
  rows are not touched, and a batch without constraints costs one pass over the list.

JSON is generated compact and in one layout (`", "` between items, `": "` after keys, no other whitespace):
a model cannot wander in whitespace, so a JSON output ends once its values do. Strings, arrays and numbers
are as long as the schema allows (`maxLength`, `maxItems`, `maximum`): an unbounded string can run to
`max_tokens`, and the output then ends with `finish_reason` "length".
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
import torch.nn.functional as F

from loopcoder.utils.errors import LoopcoderError

KINDS = ("json_schema", "regex", "grammar")
# One layout for generated JSON: what json.dumps writes (and what chat templates render tool calls with).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(LoopcoderError):
    """A constraint that cannot be compiled, or a request's output that left its grammar."""


def _one_line(message: str) -> str:
    """llguidance's message on one line, without the parser state and grammar it may append (internal detail)."""
    message = message.split("<state>")[0].split("<grammar>")[0]
    return " ".join(part.strip() for part in message.strip().splitlines() if part.strip())


def ref_cycle(schema: Any) -> list[str] | None:
    """A chain of local `$ref`s that leads back to itself with nothing in between (`{"$ref": "#"}`, or `$defs` that
    refer to each other): such a schema describes no value, and a grammar cannot be built from it. Returns the
    chain of pointers, or None. (A recursive schema whose recursion goes through a property or an item is fine.)"""

    def resolve(pointer: str) -> Any:
        node = schema
        for part in pointer[1:].split("/")[1:] if pointer != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def starts(node: Any) -> Any:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node
            for v in node.values():
                yield from starts(v)
        elif isinstance(node, list):
            for v in node:
                yield from starts(v)

    for node in starts(schema):
        chain: list[str] = []
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
            if set(node) - _ANNOTATIONS - {"$ref"}:  # other keywords describe the value too
                break
            pointer = node["$ref"]
            if pointer in chain:
                return [*chain[chain.index(pointer) :], pointer]
            chain.append(pointer)
            node = resolve(pointer)
    return None


_ANNOTATIONS = {"title", "description", "$comment", "examples", "default", "$id", "$schema", "$defs", "definitions"}


def json_options(strict: bool) -> dict[str, Any]:
    """llguidance's JSON options: our layout; `strict` refuses schema keywords it cannot enforce, otherwise
    they are ignored (`lenient`)."""
    return {**JSON_LAYOUT, "lenient": not strict}


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match. Build one with `json_schema`, `json_object`, `regex` or `grammar`."""

    kind: str  # one of KINDS
    source: str  # the schema as compact JSON (key order kept: it is the order of generated properties), the
    # regex, or the Lark grammar (llguidance's dialect: docs/serving.md)
    strict: bool = True  # json_schema: refuse keywords that cannot be enforced (False: ignore them)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str, strict: bool = True) -> Constraint:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ConstraintError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False), strict)

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, lark: str) -> Constraint:
        return cls("grammar", lark)

    @property
    def key(self) -> tuple[str, bool, str]:
        return self.kind, self.strict, self.source

    def validate(self) -> Constraint:
        if self.kind not in KINDS:
            raise ConstraintError(f"constraint kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.source, str) or not self.source:
            raise ConstraintError(f"the {self.kind} constraint is empty")
        return self

    def llguidance_grammar(self) -> str:
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=json_options(self.strict))
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        return llguidance.LLMatcher.grammar_from_lark(self.source)


# ---------------------------------------------------------------------------------------------- Lark pieces
def lark_json(schema: dict[str, Any], strict: bool = True) -> str:
    """A Lark expression matching JSON that validates against `schema`, in our layout."""
    options = {**json_options(strict), **schema.get("x-guidance", {})}
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


def lark_text_without(text: str) -> str:
    """A Lark regex terminal matching any text that does not contain `text` (every character escaped as
    `\\x{..}`, so nothing in it is a regex operator or ends the `/.../`)."""
    escaped = "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):x}}}" for c in text)
    return f"/(.|\\n)*/ & ~/(.|\\n)*{escaped}(.|\\n)*/"


# ---------------------------------------------------------------------------------------------- compiling
class GrammarCompiler:
    """One tokenizer's grammars: compile a `Constraint` once (LRU cache by its key), then a `GrammarMatcher`
    per request. Cheap to create: the tokenizer's llguidance view (about 1.5 s for a 77k vocabulary) is built
    when the first constraint is compiled. Thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int, cache_size: int = 256) -> None:
        if cache_size < 1:
            raise LoopcoderError(f"cache_size must be >= 1, got {cache_size}")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.compiled = 0  # cache misses (grammars built)
        self.hits = 0
        self._templates: OrderedDict[tuple, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._llt: llguidance.LLTokenizer | None = None

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._llt is None:
                self._llt = self._build_lltokenizer()
            return self._llt

    def _build_lltokenizer(self) -> llguidance.LLTokenizer:
        tok = self.tokenizer
        if tok is None:
            raise ConstraintError("constrained decoding needs the model's tokenizer")
        if getattr(tok, "eos_token_id", None) is None:
            raise ConstraintError("constrained decoding needs a tokenizer with an end-of-text token")
        if len(tok) > self.vocab_size:
            raise ConstraintError(
                f"the tokenizer has {len(tok)} tokens, more than the model's vocabulary ({self.vocab_size})"
            )
        try:
            return llguidance.hf.from_tokenizer(tok, n_vocab=self.vocab_size, eos_token=tok.eos_token_id)
        except ValueError as e:  # not a fast (Rust) tokenizer
            raise ConstraintError(f"constrained decoding cannot use this tokenizer ({e})") from None

    @property
    def eos_id(self) -> int:
        """The token whose bit in llguidance's mask means 'the output may end here'."""
        return self.lltokenizer.eos_token

    def compile(self, constraint: Constraint) -> llguidance.LLMatcher:
        """The template matcher of `constraint` (compiled on first use); `ConstraintError` names what is wrong. A
        grammar that compiles but cannot start (a schema that describes no value) is refused here too, so that no
        request fails at its first token."""
        key = constraint.validate().key
        with self._lock:
            if key in self._templates:
                self._templates.move_to_end(key)
                self.hits += 1
                return self._templates[key]
        if constraint.kind == "json_schema":
            cycle = ref_cycle(json.loads(constraint.source))
            if cycle:
                raise ConstraintError(
                    f"the JSON schema's $ref {' -> '.join(cycle)} refers back to itself with nothing in between: "
                    "such a schema describes no value (a recursive schema must recurse through a property or an item)"
                )
        try:
            grammar = constraint.llguidance_grammar()
        except ValueError as e:
            raise ConstraintError(
                f"cannot compile the {constraint.kind.replace('_', ' ')}: {_one_line(str(e))}"
            ) from None
        template = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)  # drops the GIL while it builds
        if template.is_error():
            raise ConstraintError(
                f"cannot compile the {constraint.kind.replace('_', ' ')}: {_one_line(template.get_error())}"
            )
        self._probe(constraint, template)
        with self._lock:
            self._templates[key] = template
            self.compiled += 1
            while len(self._templates) > self.cache_size:
                self._templates.popitem(last=False)
        return template

    def _probe(self, constraint: Constraint, template: llguidance.LLMatcher) -> None:
        """Compute the first mask of a copy: llguidance builds the grammar lazily, and a schema that describes no value
        (llguidance's "NoExtensionBias") only shows there."""
        probe = template.deep_copy()
        row = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
        probe.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        if probe.is_error() or not row.any():
            if constraint.kind == "json_schema":
                raise ConstraintError(
                    "the JSON schema allows no value at all: not even a first token can be written (for example, a "
                    "$ref that leads back to itself through anyOf, allOf or oneOf alone)"
                )
            raise ConstraintError(
                f"the {constraint.kind} allows no output at all: not even a first token can be written"
            )

    def matcher(self, constraint: Constraint, end_ids: Sequence[int]) -> GrammarMatcher:
        """A fresh matcher for one request; `end_ids` are the tokens that end its output (its stop tokens)."""
        template = self.compile(constraint)
        return GrammarMatcher(template.deep_copy(), frozenset(end_ids), self.eos_id, self.vocab_size)

    def lark_literal(self, text: str) -> str:
        """Lark for exactly `text`. The special tokens in it (`<tool_call>` is one in our tokenizers) are not text
        to the grammar and become `<[id]>`; the rest are strings."""
        if not text:
            raise ConstraintError("a grammar literal cannot be empty")
        llt = self.lltokenizer
        parts: list[str] = []
        run: list[int] = []
        for t in [*llt.tokenize_str(text), None]:
            if t is None or llt.is_special_token(t):
                if run:
                    parts.append(json.dumps(llt.decode_str(run), ensure_ascii=False))
                    run = []
                if t is not None:
                    parts.append(f"<[{t}]>")
            else:
                run.append(t)
        return " ".join(parts)


# ---------------------------------------------------------------------------------------------- one request
class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, end_ids: frozenset[int], eos_id: int, vocab_size: int) -> None:
        self._m = matcher
        self.end_ids = frozenset(t for t in end_ids if 0 <= t < vocab_size)
        self._eos = eos_id

    @property
    def done(self) -> bool:
        """The grammar is complete: no token may follow (the output ends here)."""
        return self._m.is_stopped() and not self._m.is_error()

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into `row` (int32 words, bit t % 32 of word t // 32 for token t)."""
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)  # row: C-contiguous, one mask wide
        if self._m.is_error():
            raise ConstraintError(f"the grammar failed: {_one_line(self._m.get_error())}")
        bits = row.view(np.uint32)
        eos_word, eos_bit = divmod(self._eos, 32)
        can_end = bool(bits[eos_word] >> np.uint32(eos_bit) & np.uint32(1))
        bits[eos_word] &= ~np.uint32(1 << eos_bit)
        for t in self.end_ids:  # the request's stop tokens stand for the end, and only there
            word, bit = divmod(t, 32)
            if can_end:
                bits[word] |= np.uint32(1 << bit)
            else:
                bits[word] &= ~np.uint32(1 << bit)
        if not bits.any():
            raise ConstraintError(
                "the grammar allows no next token (it can only end here, and this request has no stop token)"
                if can_end
                else "the grammar allows no next token"
            )

    def accept(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise ConstraintError(f"token {token} does not match the grammar: {_one_line(self._m.get_error())}")


# ---------------------------------------------------------------------------------------------- a batch
_BIAS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _bias_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): for each byte of a mask, the 8 tokens' additive bias (0 allowed, -inf not)."""
    table = _BIAS.get((device, dtype))
    if table is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        table = _BIAS[(device, dtype)] = (
            torch.zeros(256, 8, dtype=dtype).masked_fill_(bits == 0, float("-inf")).to(device)
        )
    return table


def apply_masks(logits: torch.Tensor, rows: list[int], masks: np.ndarray) -> None:
    """Set the logits of disallowed tokens of `rows` to -inf, in place; `masks` (len(rows), words) int32.

    A byte of the mask indexes a table of 8 biases (branch-free: masked_fill with an irregular mask is several
    times slower on CPU), and the bias is added: allowed logits are unchanged bit for bit."""
    n, vocab = len(rows), logits.shape[-1]
    as_bytes = torch.from_numpy(masks.astype("<i4", copy=False).view(np.uint8)).to(logits.device, non_blocking=True)
    bias = F.embedding(as_bytes.long(), _bias_table(logits.device, logits.dtype)).view(n, -1)[:, :vocab]
    if rows == list(range(logits.shape[0])):
        logits.add_(bias)
    else:
        logits.index_add_(0, torch.tensor(rows, device=logits.device), bias)


def mask_logits(logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> dict[int, str]:
    """Mask, in place, the rows of `logits` (n, vocab) that have a matcher; {row: why} for rows whose grammar
    failed (their logits are left as they were: the caller fails those requests)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return {}
    masks = np.zeros((len(rows), (logits.shape[-1] + 31) // 32), dtype=np.int32)
    errors: dict[int, str] = {}
    for k, i in enumerate(rows):
        try:
            matchers[i].fill(masks[k])
        except ConstraintError as e:
            errors[i] = str(e)
    if errors:
        keep = [k for k, i in enumerate(rows) if i not in errors]
        rows, masks = [rows[k] for k in keep], masks[keep]
    if rows:
        apply_masks(logits, rows, masks)
    return errors
