"""Grammar-constrained decoding (loopcoder/constraints.py) on a real byte-level BPE: masks against a brute-force
reference, random walks that always end in valid output, the compile cache, errors, and the mask arithmetic."""

from __future__ import annotations

import itertools
import json
import threading

import jsonschema
import numpy as np
import pytest
import torch

from loopcoder.inference.constraints import (
    Constraint,
    ConstraintError,
    GrammarCompiler,
    apply_masks,
    lark_text_without,
    mask_logits,
)
from loopcoder.model.loading import load_tokenizer
from loopcoder.utils.errors import LoopcoderError
from support.constraints import SCHEMAS, random_walk
from support.serving import build_model_dir

EOS, IM_END, TOOL_CALL = 2, 4, 8  # the fixed ids of loopcoder's tokenizers


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_model_dir(tmp_path_factory.mktemp("model")))


@pytest.fixture
def compiler(tok):
    return GrammarCompiler(tok, len(tok))


def allowed(compiler, matcher) -> set[int]:
    mask = np.zeros((1, (compiler.vocab_size + 31) // 32), dtype=np.int32)
    matcher.fill(mask[0])
    return {t for t in range(compiler.vocab_size) if mask[0, t // 32] >> (t % 32) & 1}


# ---------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("text", ["", "a", "ab", "aba", "b"])
def test_the_mask_is_exactly_the_tokens_that_keep_a_match_possible(compiler, tok, text):
    """Brute force: a token is allowed iff the text plus the token's text begins a string of the language
    (here every a/b string of length 2 or 3); the stop tokens iff the text is already in the language."""
    language = {"".join(p) for n in (2, 3) for p in itertools.product("ab", repeat=n)}
    m = compiler.matcher(Constraint.regex("[ab]{2,3}"), [EOS, IM_END])
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        m.accept(t)
    expected = {
        t
        for t in range(len(tok))
        if t not in (EOS, IM_END) and any(s.startswith(text + tok.decode([t])) for s in language) and tok.decode([t])
    }
    if text in language:
        expected |= {EOS, IM_END}
    assert allowed(compiler, m) == expected
    assert m.done == (len(text) == 3)


def test_a_stop_token_is_allowed_only_where_the_output_may_end(compiler, tok):
    """Even a stop token that is ordinary text ('1') is refused mid-grammar, and stands for the end after it."""
    one = tok.convert_tokens_to_ids("1")
    m = compiler.matcher(Constraint.regex("[0-9]+"), [one])
    assert allowed(compiler, m) == {tok.convert_tokens_to_ids(d) for d in "0123456789"} - {one}
    m.accept(tok.convert_tokens_to_ids("7"))
    assert one in allowed(compiler, m) and EOS not in allowed(compiler, m)
    assert not m.done  # more digits may follow


def test_a_token_outside_the_grammar_is_refused(compiler, tok):
    m = compiler.matcher(Constraint.regex("[0-9]+"), [EOS])
    with pytest.raises(ConstraintError, match="does not match the grammar"):
        m.accept(tok.convert_tokens_to_ids("x"))


def test_apply_masks_sets_exactly_the_disallowed_logits_to_minus_inf():
    g = torch.Generator().manual_seed(0)
    for vocab, rows in [(61, [0, 2]), (400, [1]), (400, [0, 1, 2]), (77, [2, 0])]:
        logits = torch.randn(3, vocab, generator=g)
        masks = (
            torch.randint(-(2**31), 2**31 - 1, (len(rows), (vocab + 31) // 32), generator=g, dtype=torch.int64)
            .to(torch.int32)
            .numpy()
        )
        got = logits.clone()
        apply_masks(got, rows, masks)
        expected = logits.clone()
        for k, r in enumerate(rows):
            for t in range(vocab):
                if not (int(masks[k, t // 32]) >> (t % 32)) & 1:
                    expected[r, t] = float("-inf")
        assert torch.equal(got, expected)  # allowed logits unchanged bit for bit, other rows untouched


def test_mask_logits_leaves_unconstrained_rows_alone_and_reports_a_failed_grammar(compiler, tok):
    class Broken:
        def fill(self, row):
            raise ConstraintError("the grammar failed: simulated")

    good = compiler.matcher(Constraint.regex("[0-9]"), [EOS])
    logits = torch.randn(3, len(tok))
    before = logits.clone()
    assert mask_logits(logits, [None, Broken(), good]) == {1: "the grammar failed: simulated"}
    assert torch.equal(logits[:2], before[:2])
    assert set(torch.isfinite(logits[2]).nonzero()[:, 0].tolist()) == allowed(compiler, good)
    assert mask_logits(logits, [None, None, None]) == {}


# ---------------------------------------------------------------------------------------------- random walks
@pytest.mark.parametrize("name", SCHEMAS)
def test_random_walks_always_end_in_json_that_validates(compiler, tok, name):
    schema = SCHEMAS[name]
    constraint = Constraint.json_schema(schema)
    for seed in range(12):
        tokens, why = random_walk(compiler, constraint, seed)
        assert why == "done", (seed, tok.decode(tokens))
        text = tok.decode(tokens)
        jsonschema.validate(json.loads(text), schema)
        assert one_layout(text), text


def one_layout(text: str) -> bool:
    """Outside strings, the only whitespace is one space after ',' or ':' (json.dumps's layout)."""
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            in_string, escaped = (escaped or ch != '"'), (not escaped and ch == "\\")
        elif ch == '"':
            in_string = True
        elif ch.isspace() and not (ch == " " and text[i - 1] in ",:"):
            return False
    return True


def test_one_layout():
    assert one_layout('{"a": [1, 2], "b": "x  \\" y"}')
    assert not one_layout('{"a":  1}') and not one_layout('{"a": 1 }') and not one_layout("[1,\n2]")


def test_regex_and_lark_walks_match(compiler, tok):
    import re

    for seed in range(8):
        tokens, _ = random_walk(compiler, Constraint.regex(r"(yes|no)-[0-9]{2}"), seed)
        assert re.fullmatch(r"(yes|no)-[0-9]{2}", tok.decode(tokens))
        tokens, _ = random_walk(
            compiler, Constraint.grammar('start: "sum(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'), seed
        )
        assert re.fullmatch(r"sum\([0-9]{1,3}(,[0-9]{1,3})*\)", tok.decode(tokens))


def test_text_without_a_marker_never_spells_it(compiler, tok):
    lark = f"start: TEXT\nTEXT: {lark_text_without('<tool_call>')}\n"
    m = compiler.matcher(Constraint.grammar(lark), [EOS])
    for t in tok("see <tool_ca", add_special_tokens=False)["input_ids"]:
        m.accept(t)
    ok = allowed(compiler, m)
    assert tok.convert_tokens_to_ids("ll") in ok or tok.convert_tokens_to_ids("l") in ok  # '<tool_cal' is fine
    assert TOOL_CALL not in ok  # a special token is not text
    m.accept(tok.convert_tokens_to_ids("l"))
    m.accept(tok.convert_tokens_to_ids("l"))
    assert tok.convert_tokens_to_ids(">") not in allowed(compiler, m)


def test_lark_literal_names_special_tokens(compiler):
    assert compiler.lark_literal("<tool_call>\n") == '<[8]> "\\n"'
    assert compiler.lark_literal('a"b</tool_call>') == '"a\\"b" <[9]>'
    assert compiler.lark_literal("CALL ") == '"CALL "'


# ---------------------------------------------------------------------------------------------- compiling
def test_a_constraint_is_compiled_once_and_the_cache_is_lru(tok):
    c = GrammarCompiler(tok, len(tok), cache_size=2)
    a, b, d = (Constraint.json_schema({"type": "integer", "maximum": k}) for k in (1, 2, 3))
    assert c.compile(a) is c.compile(Constraint.json_schema('{"type": "integer",  "maximum": 1}'))  # same key
    assert (c.compiled, c.hits) == (1, 1)
    c.compile(b)
    c.compile(a)  # a is now the most recent
    c.compile(d)  # evicts b
    assert c.compiled == 3
    c.compile(a)
    assert c.compiled == 3
    c.compile(b)
    assert c.compiled == 4
    # requests get their own parsers: one request's tokens do not move another's
    m1, m2 = c.matcher(a, [EOS]), c.matcher(a, [EOS])
    m1.accept(tok.convert_tokens_to_ids("1"))
    assert m1.done and not m2.done


def test_key_order_is_part_of_the_key_and_of_the_output(compiler, tok):
    ab = {
        "type": "object",
        "properties": {"a": {"const": 1}, "b": {"const": 2}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    ba = {**ab, "properties": {"b": {"const": 2}, "a": {"const": 1}}}
    assert Constraint.json_schema(ab).key != Constraint.json_schema(ba).key
    assert tok.decode(random_walk(compiler, Constraint.json_schema(ab), 0)[0]) == '{"a": 1, "b": 2}'
    assert tok.decode(random_walk(compiler, Constraint.json_schema(ba), 0)[0]) == '{"b": 2, "a": 1}'


def test_compiling_from_several_threads_at_once(tok):
    c = GrammarCompiler(tok, len(tok))
    constraints = [Constraint.json_schema({"type": "integer", "maximum": k % 5}) for k in range(40)]
    errors: list[Exception] = []

    def work(part):
        try:
            for x in part:
                c.matcher(x, [EOS])
        except Exception as e:  # pragma: no cover - what the test looks for
            errors.append(e)

    threads = [threading.Thread(target=work, args=(constraints[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and 5 <= c.compiled <= 20 and c.compiled + c.hits == 40


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (lambda: Constraint.json_schema({"type": "foo"}), "Invalid type: foo"),
        (lambda: Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 2}), "minimum"),
        (lambda: Constraint.json_schema({"type": "string", "pattern": "(a"}), "unclosed group"),
        (lambda: Constraint.json_schema({"not": {"type": "string"}}), "not"),  # strict: cannot be enforced
        (lambda: Constraint.json_schema({"$ref": "#/$defs/x"}), "does not exist"),
        (lambda: Constraint.regex("(a"), "unclosed group"),
        (lambda: Constraint.grammar("start: nothing"), "nothing"),
        (lambda: Constraint.json_schema("{not json"), "not valid JSON"),
        (lambda: Constraint.json_schema("[1, 2]"), "must be a JSON object"),
        (lambda: Constraint("xml", "<a/>"), "kind"),
        (lambda: Constraint.regex(""), "empty"),
    ],
)
def test_a_constraint_that_cannot_be_compiled_is_one_line_naming_the_problem(compiler, constraint, message):
    with pytest.raises(LoopcoderError) as e:
        compiler.compile(constraint())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_strict_false_ignores_what_cannot_be_enforced(compiler, tok):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9, "not": {"const": 3}}},
        "required": ["n"],
        "additionalProperties": False,
    }
    with pytest.raises(ConstraintError, match="not"):
        compiler.compile(Constraint.json_schema(schema))
    tokens, why = random_walk(compiler, Constraint.json_schema(schema, strict=False), 0)
    assert why == "done" and 0 <= json.loads(tok.decode(tokens))["n"] <= 9


def test_a_tokenizer_the_model_cannot_hold_is_refused(tok):
    with pytest.raises(ConstraintError, match="more than the model's vocabulary"):
        GrammarCompiler(tok, len(tok) - 1).compile(Constraint.json_object())
    with pytest.raises(ConstraintError, match="needs the model's tokenizer"):
        GrammarCompiler(None, 100).compile(Constraint.json_object())
