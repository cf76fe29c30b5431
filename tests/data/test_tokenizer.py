"""The byte-level BPE tokenizer: losslessness on the whole default corpus, fixed ids, chat template."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loopcoder.data import tokenizer as T
from loopcoder.data.corpus import CorpusSpec, iter_documents
from loopcoder.utils.errors import LoopcoderError

UNICODE = "x = 'é漢字 ✓ 🐍'\r\n\tif a  and\tb:\n\x0c\x00  pass   \n\n\n# 0123456789 <|endoftext|> <|im_end|>\u200b"


@pytest.fixture(scope="module")
def stdlib_docs():
    return list(iter_documents(CorpusSpec()))


@pytest.fixture(scope="module")
def stdlib_tok(stdlib_docs, tmp_path_factory):
    """Trained once for this module, on the train split of the default corpus, with a small vocabulary."""
    tok = T.train_tokenizer((d.text for d in stdlib_docs if d.split == "train"), vocab_size=1024)
    out = tmp_path_factory.mktemp("tok")
    T.save_tokenizer(tok, out)
    return tok, out


@pytest.mark.slow
def test_round_trip_is_lossless_on_every_file_of_the_default_corpus(stdlib_docs, stdlib_tok):
    tok, _ = stdlib_tok
    texts = [d.text for d in stdlib_docs]
    ids = T.encode_documents(tok, texts)
    decoded = tok.decode_batch(ids, skip_special_tokens=False)
    bad = [d.id for d, text, back in zip(stdlib_docs, texts, decoded) if text != back]
    assert not bad, f"not lossless: {bad[:5]}"
    # The byte table is exact: each file's tokens stand for exactly its UTF-8 bytes.
    tb = T.token_byte_lengths(tok)
    assert [int(tb[np.asarray(i)].sum()) for i in ids] == [d.nbytes for d in stdlib_docs]
    n_tokens = sum(map(len, ids))
    assert 2.3 < sum(d.nbytes for d in stdlib_docs) / n_tokens < 4.0  # bytes per token at vocab 1024


@pytest.mark.slow
def test_transformers_tokenizer_round_trip_on_every_file(stdlib_docs, stdlib_tok):
    _, path = stdlib_tok
    hf = T.load_tokenizer(path)
    texts = [d.text for d in stdlib_docs]
    enc = hf(texts, add_special_tokens=False)["input_ids"]
    assert hf.batch_decode(enc) == texts


def test_special_token_ids_are_fixed_and_tool_tokens_decode_as_text(stdlib_tok):
    tok, path = stdlib_tok
    assert [tok.token_to_id(t) for t in T.ALL_ADDED] == list(range(12))
    hf = T.load_tokenizer(path)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf.convert_tokens_to_ids(
        ["<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    ) == [3, 4, 5, 6, 7]
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>'
    ids = hf.encode(text, add_special_tokens=False)
    assert ids[0] == 8 and 9 in ids and ids[-1] == 4
    assert hf.decode(ids, skip_special_tokens=True) == text.replace("<|im_end|>", "")
    assert hf.decode(ids) == text
    # No BOS/EOS is added by encode.
    assert hf.encode("a", add_special_tokens=True) == hf.encode("a", add_special_tokens=False)
    assert T.stop_token_ids(hf) == [2, 4] == T.stop_token_ids()
    assert T.model_config_fields(hf) == {"vocab_size": 1024, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    assert T.model_config_fields(tok, pad_to_multiple_of=1000)["vocab_size"] == 2000


def test_unicode_and_special_token_text_in_documents(stdlib_tok):
    tok, _ = stdlib_tok
    ids = T.encode_documents(tok, [UNICODE])[0]
    assert tok.decode(ids, skip_special_tokens=False) == UNICODE
    assert T.EOS_ID not in ids and T.IM_END_ID not in ids  # special-token text is encoded as text
    digits = [tok.id_to_token(i) for i in T.encode_documents(tok, ["12345"])[0]]
    assert digits == list("12345")  # digits are split one by one
    assert int(T.token_byte_lengths(tok)[np.asarray(ids)].sum()) == len(UNICODE.encode())


def test_saved_directory_loads_offline_with_autotokenizer(stdlib_tok, monkeypatch):
    from transformers import AutoTokenizer

    _, path = stdlib_tok
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = AutoTokenizer.from_pretrained(str(path))
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == T.CHAT_TEMPLATE and config["clean_up_tokenization_spaces"] is False
    assert hf.chat_template == T.CHAT_TEMPLATE
    assert T.load_raw_tokenizer(path).get_vocab_size() == 1024


def test_chat_template_chatml(stdlib_tok):
    hf = T.load_tokenizer(stdlib_tok[1])
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )
    assert hf.apply_chat_template(msgs[1:2], tokenize=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_chat_template_tools(stdlib_tok):
    hf = T.load_tokenizer(stdlib_tok[1])
    tools = [
        {
            "type": "function",
            "function": {"name": "add", "description": "Add.", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    msgs = [
        {"role": "user", "content": "1+2?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
                {"name": "add", "arguments": {"a": 3, "b": 4}},
            ],
        },
        {"role": "tool", "content": "3"},
        {"role": "tool", "content": {"sum": 7}},
        {"role": "assistant", "content": "3 and 7."},
    ]
    text = hf.apply_chat_template(msgs, tools=tools, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert "<tools>\n" + json.dumps(tools[0]) + "\n</tools>" in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>\n'
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\n3\n</tool_response>\n<tool_response>\n"
        '{"sum": 7}\n</tool_response><|im_end|>\n<|im_start|>assistant\n3 and 7.<|im_end|>\n'
    ) in text
    with_system = hf.apply_chat_template([{"role": "system", "content": "S."}, *msgs[:1]], tools=tools, tokenize=False)
    assert with_system.startswith("<|im_start|>system\nS.\n\n# Tools\n") and with_system.count("S.") == 1


def test_vocabulary_too_small_and_empty_corpus():
    with pytest.raises(LoopcoderError, match=r"vocabulary size 200 is too small: 12 special/added tokens \+ 256"):
        T.train_tokenizer(["x = 1"], vocab_size=200)
    with pytest.raises(LoopcoderError, match="empty corpus"):
        T.train_tokenizer([], vocab_size=300)


def test_training_is_deterministic():
    texts = [f"def f{i}(x):\n    return x * {i} + {i * 7}\n" for i in range(300)]
    a = T.train_tokenizer(texts, vocab_size=400).to_str()
    b = T.train_tokenizer(iter(texts), vocab_size=400).to_str()
    assert a == b


def test_load_errors(tmp_path):
    with pytest.raises(LoopcoderError, match="does not exist"):
        T.load_tokenizer(tmp_path / "nope")
    with pytest.raises(LoopcoderError, match=r"has no tokenizer\.json"):
        T.load_raw_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(LoopcoderError, match=r"not a valid tokenizer\.json"):
        T.load_raw_tokenizer(tmp_path)
