"""Byte-level BPE tokenizer: training, special tokens with fixed ids, the ChatML chat template, saving.

Ids 0-7 are fixed so that they line up with the released config (bos 1, eos 2):
0 `<|pad|>`, 1 `<|startoftext|>`, 2 `<|endoftext|>`, 3 `<|im_start|>`, 4 `<|im_end|>`,
5 `<|fim_prefix|>`, 6 `<|fim_middle|>`, 7 `<|fim_suffix|>`. Ids 8-11 are `<tool_call>`, `</tool_call>`,
`<tool_response>`, `</tool_response>`: added tokens that are not special, so they survive
`decode(..., skip_special_tokens=True)` (the server parses `<tool_call>{json}</tool_call>` from text).

Pre-tokenisation: digits one by one (arithmetic in the reasoning sets sees every digit), then GPT-2's
byte-level regex. Byte-level BPE over all 256 bytes plus no normaliser makes `decode(encode(x)) == x`
for every string. Corpus text is encoded with special tokens treated as text (a file that contains
"<|endoftext|>" does not end a document), see `encode_documents`.

Saved as a transformers `PreTrainedTokenizerFast` directory (tokenizer.json + tokenizer_config.json with
the chat template), so `AutoTokenizer.from_pretrained(dir)` works offline. No BOS is added anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.errors import LoopcoderError

PAD, BOS, EOS, IM_START, IM_END, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = (
    "<|pad|>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
)
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
ALL_ADDED = SPECIAL_TOKENS + TOOL_TOKENS
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = 0, 1, 2, 3, 4
BYTE_ALPHABET = 256
MIN_VOCAB = len(ALL_ADDED) + BYTE_ALPHABET  # every byte must have a token, merges come on top

# ChatML with Qwen/Hermes-style tools. `{% generation %}` marks what the assistant writes (its content,
# tool calls and closing <|im_end|>), which is what SFT trains on (`return_assistant_tokens_mask`).
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{{- message.content | tojson }}"
    "{%- endif %}"
    "{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class EmptyCorpusError(LoopcoderError):
    """No text to train a tokenizer on."""


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB:
        raise LoopcoderError(
            f"vocabulary size {vocab_size} is too small: {len(ALL_ADDED)} special/added tokens "
            f"+ {BYTE_ALPHABET} byte tokens need at least {MIN_VOCAB}"
        )
    if vocab_size > 2**32 - 1:
        raise LoopcoderError(f"vocabulary size {vocab_size} does not fit the uint32 shard format")


def _new_tokenizer() -> Any:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Any:
    """Train byte-level BPE on `texts`; returns a `tokenizers.Tokenizer` with the fixed special ids."""
    check_vocab_size(vocab_size)
    count = 0

    def counted() -> Iterable[str]:
        nonlocal count
        for t in texts:
            count += 1
            yield t

    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in ALL_ADDED],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(counted(), trainer)
    if count == 0:
        raise EmptyCorpusError("cannot train a tokenizer on an empty corpus")
    # The trainer registers every token as special; re-adding flips the tool tokens to ordinary added
    # tokens (same ids), and the JSON round trip rebuilds the special-token set from the flags.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    tok = Tokenizer.from_str(tok.to_str())
    _check_added_ids(tok, "the trained tokenizer")
    return tok


def _check_added_ids(tok: Any, where: str) -> None:
    for i, t in enumerate(ALL_ADDED):
        if tok.token_to_id(t) != i:
            raise LoopcoderError(f"{where}: token {t!r} has id {tok.token_to_id(t)}, expected {i}")


def save_tokenizer(tok: Any, out_dir: str | os.PathLike, model_max_length: int | None = None) -> Path:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) for `AutoTokenizer`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=False))
    config = {
        # PreTrainedTokenizerFast is what older transformers releases and other tools know; transformers
        # 5 maps it to its tokenizers backend.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # True would rewrite " ." etc.: not lossless
        "model_max_length": model_max_length or 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return out


def load_raw_tokenizer(path: str | os.PathLike) -> Any:
    """The `tokenizers.Tokenizer` of a tokenizer directory (or of a data directory's `tokenizer/`)."""
    f = tokenizer_dir(path) / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise LoopcoderError(f"{f}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from e
    _check_added_ids(tok, str(f))
    return tok


def load_tokenizer(path: str | os.PathLike) -> Any:
    """`AutoTokenizer.from_pretrained` of a tokenizer directory (or a data directory's `tokenizer/`), offline."""
    d = tokenizer_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as e:
        raise LoopcoderError(f"cannot load the tokenizer in {d}: {str(e).splitlines()[0]}") from e
    if tok.convert_tokens_to_ids(IM_END) != IM_END_ID or tok.eos_token_id != EOS_ID:
        raise LoopcoderError(f"{d}: not a loopcoder tokenizer (special token ids differ)")
    return tok


def tokenizer_dir(path: str | os.PathLike) -> Path:
    """`path` if it holds tokenizer.json, else its `tokenizer/` subdirectory (a data directory)."""
    p = Path(path)
    if (p / "tokenizer" / "tokenizer.json").is_file():
        return p / "tokenizer"
    if not p.exists():
        raise LoopcoderError(f"tokenizer directory {str(path)!r} does not exist")
    if not (p / "tokenizer.json").is_file():
        raise LoopcoderError(f"{str(path)!r} has no tokenizer.json (nor tokenizer/tokenizer.json)")
    return p


def stop_token_ids(tokenizer: Any = None) -> list[int]:
    """The ids generation should stop on: end of text, and end of a chat turn."""
    if tokenizer is None:
        return [EOS_ID, IM_END_ID]
    ids = [tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)]
    return [int(i) for i in ids]


def model_config_fields(tokenizer: Any, pad_to_multiple_of: int = 1) -> dict[str, int]:
    """The `PLTConfig` fields a tokenizer implies: vocab_size (optionally rounded up) and pad/bos/eos ids."""
    n = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.get_vocab_size(with_added_tokens=True)
    if pad_to_multiple_of > 1:
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    return {"vocab_size": int(n), "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def encode_documents(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of corpus documents, special-token strings in the text encoded as ordinary text."""
    tok.encode_special_tokens = True
    try:
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = False


def token_byte_lengths(tok: Any) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens): the denominator of bits per byte."""
    vocab = tok.get_vocab(with_added_tokens=True)
    out = np.zeros(max(vocab.values()) + 1, dtype=np.int32)
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}
    for token, i in vocab.items():
        if i in special:
            out[i] = 0
        elif i in added:
            out[i] = len(added[i].encode("utf-8"))
        else:
            out[i] = len(token)  # byte-level BPE: each character of a vocabulary entry stands for one byte
    return out
