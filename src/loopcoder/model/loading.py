"""Loading a model and tokenizer for inference (the tokenizer checked to be the model's, by size and by
fingerprint), verifying a model directory before it is declared good, chat prompts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from loopcoder.model.checkpoint import load_model
from loopcoder.model.identity import (
    OVERRIDE_FLAG,
    check_same_tokenizer,
    model_tokenizer_fingerprint,
    tokenizer_fingerprint,
    verify_weights,
)
from loopcoder.utils.errors import CheckpointError, LoopcoderError
from loopcoder.utils.runtime import pick_device, pick_dtype


def load_tokenizer(path: str | os.PathLike, required: bool = True) -> Any:
    """The tokenizer saved with a model (or a tokenizer directory), loaded offline."""
    p = Path(path)
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        if (p / "tokenizer").is_dir():
            return load_tokenizer(p / "tokenizer", required)
        if required:
            raise LoopcoderError(f"{str(path)!r} has no tokenizer (tokenizer.json); pass --tokenizer DIR")
        return None
    tokenizer_fingerprint(p)  # a damaged tokenizer.json: one line that names it, before transformers parses it
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # tokenizers raises bare Exceptions; transformers ValueError, OSError, KeyError, ...
        lines = str(e).strip().splitlines()
        raise LoopcoderError(
            f"cannot load the tokenizer in {str(p)!r}: {lines[0][:300] if lines else type(e).__name__}"
        ) from None
    if isinstance(tokenizer, bool) or not callable(getattr(tokenizer, "encode", None)):
        raise LoopcoderError(f"cannot load the tokenizer in {str(p)!r}: not a tokenizer")
    return tokenizer


def check_tokenizer(
    model_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None,
    allow: bool = False,
    what: str = "the tokenizer",
    override: str = OVERRIDE_FLAG,
) -> None:
    """Refuse a tokenizer that is not the one the model was made with, by content (`identity.py`): the
    fingerprint the model directory records (else its own tokenizer's) against the given tokenizer's
    (`tokenizer_dir` may be a data directory: its `tokenizer/`, `what` says which in the message)."""
    if tokenizer_dir is None:
        tokenizer_dir = model_dir
    expected, where = model_tokenizer_fingerprint(model_dir)
    given = tokenizer_fingerprint(tokenizer_dir)
    source = f"{what} {str(tokenizer_dir)!r}" if Path(tokenizer_dir) != Path(model_dir) else repr(str(model_dir))
    check_same_tokenizer(expected, f"the model {where}", given, source, override, allow)


def check_vocab(model_vocab: int, tokenizer_vocab: int, where: str) -> None:
    """Refuse a tokenizer that does not belong to the model. The model's vocabulary may be padded
    beyond the tokenizer's (training rounds it up to a multiple of 64; released models pad too), but a
    smaller one cannot embed every token, and a much larger one means another model's tokenizer, whose
    ids the model would map to the wrong tokens."""
    gap = model_vocab - tokenizer_vocab
    if gap < 0:
        raise LoopcoderError(
            f"{where}: the model's vocabulary ({model_vocab}) is smaller than its tokenizer's "
            f"({tokenizer_vocab}); pass the tokenizer it was trained with (--tokenizer DIR)"
        )
    if gap >= 128 and gap > tokenizer_vocab // 8:
        raise LoopcoderError(
            f"{where}: the model's vocabulary ({model_vocab}) does not match its tokenizer's "
            f"({tokenizer_vocab}), more than padding explains; pass the tokenizer it was trained "
            "with (--tokenizer DIR)"
        )


def load_for_inference(
    model_dir: str,
    tokenizer_dir: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    allow_tokenizer_mismatch: bool = False,
    override: str = OVERRIDE_FLAG,
) -> tuple[Any, Any]:
    """(model, tokenizer) ready for decoding: strict checkpoint load, eval mode, on the device; the
    tokenizer checked to be the model's (size, then fingerprint, unless `allow_tokenizer_mismatch`;
    `override` is how the caller's user says so, named in the error)."""
    dev = pick_device(device)
    model = load_model(model_dir, dtype=pick_dtype(dtype, dev), device=dev)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    check_vocab(model.config.vocab_size, len(tokenizer), str(tokenizer_dir or model_dir))
    check_tokenizer(model_dir, tokenizer_dir, allow_tokenizer_mismatch, override=override)
    return model, tokenizer


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]], what: str = "chat") -> list[int]:
    """A conversation rendered by the tokenizer's chat template, ready for the assistant's next turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise LoopcoderError(f"{what}: this tokenizer has no chat template")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


PROBE_TEXT = "def add(a, b):\n    return a + b\n"


def verify_model_dir(
    path: str | os.PathLike, require_tokenizer: bool = True, allow_tokenizer_mismatch: bool = False
) -> dict[str, Any]:
    """Check that a model directory works before it is declared good (what `export` writes): the weights
    against their recorded checksums, a strict load (config against weights), every weight finite, a
    forward pass with finite logits, and the tokenizer: present (unless not `require_tokenizer`), loads,
    fits the vocabulary, is the model's by fingerprint, and encodes text into ids the model has.
    Each failure is one `LoopcoderError` line; returns what was checked."""
    p = Path(path)
    checked = {"checksums": verify_weights(p)}
    model = load_model(p)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{str(p)!r}: weight {name} has {bad:,} NaN or infinite value(s)")
    config = model.config
    n = min(8, config.max_position_embeddings)
    ids = torch.arange(n, dtype=torch.long).remainder(config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    if tuple(logits.shape) != (1, n, config.vocab_size) or not bool(torch.isfinite(logits).all()):
        raise CheckpointError(f"{str(p)!r}: a forward pass gave non-finite logits (or of shape {tuple(logits.shape)})")
    checked["forward"] = True
    tokenizer = load_tokenizer(p, required=require_tokenizer)
    if tokenizer is not None:
        check_vocab(config.vocab_size, len(tokenizer), str(p))
        check_tokenizer(p, p, allow_tokenizer_mismatch)
        encoded = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        if not encoded or max(encoded) >= config.vocab_size or min(encoded) < 0:
            raise LoopcoderError(f"{str(p)!r}: its tokenizer encodes text into ids the model does not have")
    checked["tokenizer"] = tokenizer is not None
    return checked


def chat_stop_ids(eos_ids: Any, tokenizer: Any) -> list[int]:
    """Where a chat reply ends: the model's end-of-text ids and the tokenizer's `<|im_end|>`, if it has one."""
    ids = {i for i in (eos_ids if isinstance(eos_ids, (list, set, tuple)) else [eos_ids]) if i is not None}
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    if "<|im_end|>" in vocab:
        ids.add(vocab["<|im_end|>"])
    return sorted(ids)
