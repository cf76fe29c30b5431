"""SFT data: chat -> input_ids/labels with loss only on assistant tokens, packing, padding, reader."""

from __future__ import annotations

import json

import pytest
import torch

from loopcoder.data import tokenizer as T
from loopcoder.data.sft import IGNORE_INDEX, SFTDataset, collate, load_chat_jsonl, tokenize_chat
from loopcoder.data.shards import BatchReader
from loopcoder.model.modeling import causal_lm_loss
from loopcoder.utils.errors import LoopcoderError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"Question {i}: what is {i} + {i}? The answer is {2 * i}. def f(x): return x\n" for i in range(200)]
    path = tmp_path_factory.mktemp("sfttok")
    T.save_tokenizer(T.train_tokenizer(texts, vocab_size=500), path)
    return T.load_tokenizer(path)


def _conv(i: int, answer_len: int = 1) -> list[dict]:
    return [
        {"role": "system", "content": "Answer."},
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": " ".join([str(2 * i)] * answer_len)},
        {"role": "user", "content": "And times two?"},
        {"role": "assistant", "content": str(4 * i)},
    ]


def _labelled_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == t  # labels are aligned with input_ids; the model shifts
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    return [*spans, cur] if cur else spans


def test_labels_cover_exactly_the_assistant_turns(tok):
    ids, labels = tokenize_chat(_conv(7), tok)
    assert tok.decode(ids) == tok.apply_chat_template(_conv(7), tokenize=False)
    spans = _labelled_spans(ids, labels)
    assert [tok.decode(s) for s in spans] == ["14<|im_end|>", "28<|im_end|>"]
    assert sum(lab != IGNORE_INDEX for lab in labels) == sum(map(len, spans))


def test_tool_calls_are_trained_tool_responses_are_not(tok):
    msgs = [
        {"role": "user", "content": "Add 1 and 2."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
        },
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "It is 3."},
    ]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    ids, labels = tokenize_chat(msgs, tok, tools)
    spans = [tok.decode(s) for s in _labelled_spans(ids, labels)]
    assert spans == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>',
        "It is 3.<|im_end|>",
    ]


def test_loss_is_computed_on_assistant_targets_only(tok):
    batch = collate([tokenize_chat(_conv(3), tok), tokenize_chat(_conv(12), tok)], tok.pad_token_id)
    logits = torch.randn(*batch["input_ids"].shape, len(tok), generator=torch.Generator().manual_seed(0))
    loss = causal_lm_loss(logits, batch["labels"])
    ids, labels = batch["input_ids"], batch["labels"]
    terms = [
        torch.nn.functional.cross_entropy(logits[b, t - 1], ids[b, t])
        for b in range(ids.shape[0])
        for t in range(1, ids.shape[1])
        if labels[b, t] != IGNORE_INDEX
    ]
    assert torch.allclose(loss, torch.stack(terms).mean())
    lengths = [len(tokenize_chat(_conv(i), tok)[0]) for i in (3, 12)]
    assert batch["attention_mask"].sum(1).tolist() == lengths


def test_packed_rows(tok):
    convs = [_conv(i) for i in range(30)]
    lengths = [len(tokenize_chat(c, tok)[0]) for c in convs]
    ds = SFTDataset.build(convs, tok, seq_len=256, packing=True)
    assert len(ds) < len(convs) and ds.stats.conversations == 30 and ds.stats.truncated == 0
    assert ds.stats.tokens == sum(lengths) == int(ds.attention_mask.sum())
    ex = [tokenize_chat(c, tok) for c in convs]
    assert ds.stats.label_tokens == sum(sum(x != IGNORE_INDEX for x in lab) for _, lab in ex)
    batch = ds.get([0, len(ds) - 1])
    assert set(batch) == {"input_ids", "labels", "attention_mask"} and batch["input_ids"].shape == (2, 256)
    assert all(v.dtype == torch.long for v in batch.values())
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == tok.pad_token_id).all() and (batch["labels"][pad] == IGNORE_INDEX).all()
    # Row 0 holds the first conversations back to back, in order.
    k, used = 0, 0
    while used + lengths[k] <= 256:
        used += lengths[k]
        k += 1
    assert int(batch["attention_mask"][0].sum()) == used
    assert batch["input_ids"][0, :used].tolist() == [t for ids, _ in ex[:k] for t in ids]


def test_padded_rows_truncation_and_drops(tok):
    convs = [
        _conv(1),
        _conv(2, answer_len=200),
        [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "y"}],
    ]
    assert len(tokenize_chat(convs[0], tok)[0]) < 128
    ds = SFTDataset.build(convs, tok, seq_len=128, packing=False)
    assert len(ds) == 2 and ds.stats.truncated == 2 and ds.stats.dropped == 1
    assert int(ds.attention_mask[0].sum()) == len(tokenize_chat(convs[0], tok)[0])
    assert int(ds.attention_mask[1].sum()) == 128 and (ds.labels[1] != IGNORE_INDEX).any()
    with pytest.raises(LoopcoderError, match="no SFT conversation fits"):
        SFTDataset.build(convs[2:], tok, seq_len=128)


def test_reader_over_sft_rows_is_deterministic_and_resumable(tok):
    ds = SFTDataset.build([_conv(i) for i in range(40)], tok, seq_len=48, packing=False)
    a = BatchReader(ds, batch_size=4, seed=5)
    b = BatchReader(ds, batch_size=4, seed=5)
    for _ in range(3):
        x, y = a.next_batch(), b.next_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)
    state = a.state_dict()
    want = [a.next_batch()["labels"] for _ in range(15)]
    c = BatchReader(ds, batch_size=4, seed=5)
    c.load_state_dict(state)
    assert all(torch.equal(w, c.next_batch()["labels"]) for w in want)


def test_chat_jsonl_loading_and_errors(tmp_path, tok):
    good = tmp_path / "chat.jsonl"
    good.write_text("\n".join(json.dumps({"messages": _conv(i)}) for i in range(5)) + "\n\n")
    ds = SFTDataset.from_jsonl(good, tok, seq_len=512)
    assert ds.stats.conversations == 5 and len(ds) == 1
    cases = {
        '{"text": "hello"}': r"bad\.jsonl:1: no 'messages' field",
        '{"messages": []}': "must be a non-empty list",
        '{"messages": [{"role": "robot", "content": "x"}]}': "message 0 has role 'robot'",
        '{"messages": [{"role": "user", "content": "x"}]}': "no assistant message",
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}': r"message 0 \(user\) has no text",
        "not json": "not valid JSON",
    }
    for line, msg in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(LoopcoderError, match=msg):
            load_chat_jsonl(bad)
    with pytest.raises(LoopcoderError, match="does not exist"):
        load_chat_jsonl(tmp_path / "missing.jsonl")
