"""Prompts in, completions out: text or chat prompts through the batched parallel-loop engine."""

from __future__ import annotations

from typing import Any

import torch

from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.model.modeling import causal_lm_loss
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.progress import Progress


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    """A completion prompt (str) as is; a chat (list of messages) through the chat template."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))


def complete(
    engine: Engine,
    tokenizer: Any,
    prompts: list[str | list[dict[str, str]]],
    params: list[SamplingParams],
    label: str = "generating",
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Run every prompt; returns, per prompt, {text, tokens, finish_reason, skipped (why, or None)}.

    A prompt too long for the model is not an error for a whole benchmark: it is skipped and says so.
    `progress`: the caller's reporter, advanced by these completions (a task run in chunks has one reporter
    for the whole task, so its ETA covers the task); without it, a line of its own for these prompts.
    """
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    reqs = {}
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        ids = encode_prompt(tokenizer, prompt)
        try:
            reqs[engine.add_request(ids, sp).id] = i
        except LoopcoderError as e:
            results[i] = {"text": "", "tokens": 0, "finish_reason": "skipped", "skipped": str(e)}
    done, tokens = 0, 0
    own = progress is None
    meter = progress or Progress(f"  {label}", len(reqs), "completions", amount_unit="tokens", mode="lines")
    base_done, base_tokens = meter.done, meter.amount
    while engine.has_work():
        for ev in engine.step():
            tokens += len(ev.token_ids)
            if ev.finished and ev.request.id in reqs:
                r = ev.request
                results[reqs[r.id]] = {
                    "text": r.text,
                    "tokens": len(r.output_ids),
                    "finish_reason": r.finish_reason,
                    "skipped": None,
                }
                done += 1
        meter.update(base_done + done, base_tokens + tokens)
    if not own:  # skipped prompts count as done for the caller's total
        meter.update(base_done + len(prompts), base_tokens + tokens)
    elif reqs:
        meter.finish()
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"no completion for prompts {missing[:5]}")
    return results  # type: ignore[return-value]


@torch.inference_mode()
def answer_nll(
    model: Any, tokenizer: Any, prompts: list[str | list[dict[str, str]]], answers: list[str], batch_size: int = 16
) -> list[float]:
    """Negative log-likelihood (nats) of each reference answer given its prompt, by teacher forcing: a
    graded measure of how close a model is to the answer, informative where exact-match accuracy is
    still near chance. Sequences are right-padded into batches."""
    device = next(model.parameters()).device
    pairs = [
        (encode_prompt(tokenizer, p), tokenizer(a, add_special_tokens=False)["input_ids"])
        for p, a in zip(prompts, answers)
    ]
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)  # only the answer's tokens are scored
        for i, (p, a) in enumerate(chunk):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, : len(p) + len(a)] = 1
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        logits = model(ids.to(device), attention_mask=mask.to(device)).logits
        nll = causal_lm_loss(logits, labels.to(device), reduction="none").view(len(chunk), -1)
        out += nll.sum(-1).tolist()
    return out
