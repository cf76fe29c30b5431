"""Orchestration: read samples, run the probed model over them, aggregate per-sample figures.

`diagnose(model, sequences, samples)` is the Python entry point (the CLI and the loop-count study
both call it); it returns a `DiagnosticsResult` holding one value per sample and loop for every
measure, from which means and 95 % confidence intervals are computed on demand.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopcoder.data.shards import ShardDataset
from loopcoder.diagnostics.probe import GATE_BINS, LoopProbe
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.progress import Progress
from loopcoder.utils.stats import mean_ci


# ----------------------------------------------------------------------------- the measures
@dataclass(frozen=True)
class Measure:
    key: str
    label: str  # for tables and plot titles
    unit: str  # for axis labels
    group: str  # "hidden" | "attention" | "output"
    first_loop: int = 1  # the first loop it is defined for
    plt_only: bool = False  # needs G-SWA (gate / local branch): not for vanilla loops
    per_layer: bool = False  # the raw array is (L, R) or (L, H, R): has a per-layer breakdown


MEASURES: dict[str, Measure] = {
    m.key: m
    for m in [
        Measure("step_size", "step size δ(r)", "L2 norm", "hidden", 2),
        Measure("update_cosine", "update cosine cos θ(r)", "cosine", "hidden", 2),
        Measure("effective_rank", "effective rank erank(r)", "effective dims", "hidden", 1),
        Measure("fixed_point_gap", "fixed-point gap ‖h(r) − f(h(r))‖", "L2 norm", "hidden", 1),
        Measure("offset_cost", "offset cost Ω(r)", "L2 norm", "hidden", 2),
        Measure("attention_entropy", "attention entropy", "nats", "attention", 1, per_layer=True),
        Measure("attention_kl", "inter-loop attention KL", "nats", "attention", 2, per_layer=True),
        Measure("head_effective_rank", "head effective rank", "effective heads", "attention", 1, per_layer=True),
        Measure("head_cosine", "mean pairwise head cosine", "cosine", "attention", 1, per_layer=True),
        Measure("gate", "mean gate g(r)", "gate value", "attention", 2, plt_only=True, per_layer=True),
        Measure(
            "local_attention_entropy",
            "local-branch attention entropy",
            "nats",
            "attention",
            2,
            plt_only=True,
            per_layer=True,
        ),
        Measure(
            "local_head_effective_rank",
            "local-branch head effective rank",
            "effective heads",
            "attention",
            2,
            plt_only=True,
            per_layer=True,
        ),
        Measure(
            "local_head_cosine",
            "local-branch mean pairwise head cosine",
            "cosine",
            "attention",
            2,
            plt_only=True,
            per_layer=True,
        ),
        Measure("gold_rank", "gold-token rank (logit lens)", "rank (1 = top)", "output", 1),
        Measure("gold_top1", "gold token top-1 (logit lens)", "fraction", "output", 1),
        Measure("gold_nll", "gold-token NLL (logit lens)", "nats", "output", 1),
        Measure("output_entropy", "output entropy", "nats", "output", 1),
        Measure("delta_p", "Δp(r) = KL(p(r) ‖ p(r−1))", "nats", "output", 2),
        Measure("delta_p_share", "share of total Δp", "fraction", "output", 2),
        Measure("attention_kl_share", "share of total attention KL", "fraction", "output", 2),
        Measure("peak_loop_fraction", "tokens with peak loop r* = r", "fraction", "output", 2),
    ]
}
GROUPS = {"hidden": "Hidden states", "attention": "Attention", "output": "Output (logit lens)"}


@dataclass(frozen=True)
class Stat:
    """Mean and 95 % t interval over samples of one measure at one loop; `na` says why there is none."""

    mean: float = math.nan
    low: float = math.nan
    high: float = math.nan
    n: int = 0
    na: str | None = None

    def to_dict(self, loop: int) -> dict[str, Any]:
        if self.na is not None:
            return {"loop": loop, "na": self.na}
        return {"loop": loop, "mean": _num(self.mean), "ci95": [_num(self.low), _num(self.high)], "n": self.n}


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _nanmean(x: np.ndarray, axis: Any) -> np.ndarray:
    with warnings.catch_warnings():  # an all-NaN slice (a measure undefined there) is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


# ----------------------------------------------------------------------------- the result
@dataclass
class DiagnosticsResult:
    """All figures of one model. `per_sample[key]` is (samples, ...) with loops on the last axis
    (index r-1 = loop r); attention arrays carry layers (and heads) in between."""

    name: str
    num_loops: int
    architecture: str  # "plt" | "vanilla"
    model_info: dict[str, Any]
    per_sample: dict[str, np.ndarray]
    head_cosine_matrix: np.ndarray  # (L, R, H, H): mean over samples, primary branch
    gate_histogram: np.ndarray  # (L, R, GATE_BINS) counts of gate values in [0, 1]
    num_tokens: int = 0
    seconds: float = 0.0
    source: str = ""

    @property
    def num_samples(self) -> int:
        return int(next(iter(self.per_sample.values())).shape[0]) if self.per_sample else 0

    @property
    def is_plt(self) -> bool:
        return self.architecture == "plt"

    def values(self, key: str) -> np.ndarray:
        """(samples, R): one value per sample and loop (means over layers and heads where there are)."""
        raw = self.per_sample[key]
        return raw if raw.ndim == 2 else _nanmean(raw, tuple(range(1, raw.ndim - 1)))

    def not_applicable(self, key: str, loop: int) -> str | None:
        """Why measure `key` has no value at loop `loop` for this model, or None if it should have one."""
        m = MEASURES[key]
        if m.plt_only and not self.is_plt:
            return "vanilla loops have no gate and no local branch"
        if loop < m.first_loop:
            if self.num_loops == 1:
                return "R = 1: no loop r ≥ 2 to compare"
            return f"defined from loop {m.first_loop}" + (" (loop 1 has no gate)" if m.plt_only else "")
        if key == "fixed_point_gap" and self.num_loops == 1:
            return "R = 1: the model has no loop block to apply again"
        return None

    def stats(self, key: str) -> list[Stat]:
        """Per loop 1..R: mean and 95 % CI over samples, or the reason it is not applicable."""
        return self._loop_stats(key, self.values(key))

    def layer_stats(self, key: str) -> list[list[Stat]]:
        """[layer][loop] statistics of a per-layer measure (heads averaged within each sample)."""
        raw = self.per_sample[key]
        per_layer = raw if raw.ndim == 3 else _nanmean(raw, 2)  # (n, L, R)
        return [self._loop_stats(key, per_layer[:, li]) for li in range(per_layer.shape[1])]

    def _loop_stats(self, key: str, values: np.ndarray) -> list[Stat]:
        """Mean and 95 % CI of each loop's column of `values` (n, R), or why the loop has none."""
        out = []
        for r in range(1, self.num_loops + 1):
            if (why := self.not_applicable(key, r)) is not None:
                out.append(Stat(na=why))
                continue
            mean, low, high, n = mean_ci(values[:, r - 1])
            out.append(Stat(mean, low, high, n) if n else Stat(na="no finite values"))
        return out

    def paired_difference(self, key: str, loop: int) -> Stat:
        """value(loop) - value(loop - 1) per sample: mean and 95 % CI (paired over samples)."""
        v = self.values(key)
        mean, low, high, n = mean_ci(v[:, loop - 1] - v[:, loop - 2])
        return Stat(mean, low, high, n)

    def to_dict(self, per_sample: bool = True) -> dict[str, Any]:
        """Every figure, JSON-ready (NaN -> null, not-applicable cells carry an "na" reason)."""
        R = self.num_loops
        d: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "num_loops": R,
            "architecture": self.architecture,
            "model": self.model_info,
            "samples": self.num_samples,
            "tokens": self.num_tokens,
            "seconds": round(self.seconds, 3),
            "measures": {},
            "per_layer": {},
        }
        for key, m in MEASURES.items():
            d["measures"][key] = {
                "label": m.label,
                "unit": m.unit,
                "group": m.group,
                "per_loop": [s.to_dict(r + 1) for r, s in enumerate(self.stats(key))],
            }
            if m.per_layer:
                d["per_layer"][key] = [[s.to_dict(r + 1) for r, s in enumerate(row)] for row in self.layer_stats(key)]
        d["per_head"] = {
            k: _nested(_nanmean(self.per_sample[k], 0))
            for k in ("attention_entropy", "local_attention_entropy", "gate")
        }
        d["per_head"]["layout"] = "[layer][head][loop], mean over samples"
        d["head_cosine_matrix"] = {
            "layout": "[layer][loop][head][head], primary branch, mean over samples",
            "values": _nested(self.head_cosine_matrix),
        }
        d["gate_histogram"] = {
            "bin_edges": _nested(np.linspace(0, 1, GATE_BINS + 1)),
            "layout": "[layer][loop][bin], counts over heads, tokens and samples",
            "counts": self.gate_histogram.astype(np.int64).tolist(),
        }
        if per_sample:
            d["per_sample"] = {"layout": "[sample][loop]", **{k: _nested(self.values(k)) for k in MEASURES}}
        return d


def _nested(a: np.ndarray) -> Any:
    """ndarray -> nested lists with NaN as None (JSON has no NaN)."""
    a = np.asarray(a, dtype=np.float64)
    obj = np.where(np.isfinite(a), np.round(a, 6), np.nan).astype(object)
    obj[~np.isfinite(a)] = None
    return obj.tolist()


# ----------------------------------------------------------------------------- running the model
@contextmanager
def extra_loop(model: Any) -> Iterator[None]:
    """Let the model run R + 1 loops with the same weights, so that loop R's fixed-point gap
    ||h(R) - f(h(R))|| can be measured (f = the loop block once more; the gate is shared by all loops
    >= 2, so loop R + 1 is well defined). R = 1 models have no loop block and are left alone. Also
    selects SDPA over flex_attention, whose block masks the probe cannot turn into probabilities.
    The config is restored even if the forward fails."""
    cfg = model.config
    R, impl = cfg.plt_num_loops, cfg._attn_implementation
    try:
        if R > 1:
            cfg.plt_num_loops = R + 1
        if impl == "flex_attention":
            cfg._attn_implementation = "sdpa"
        yield
    finally:
        cfg.plt_num_loops = R
        cfg._attn_implementation = impl


def diagnose(
    model: Any,
    sequences: Iterable[Sequence[int] | torch.Tensor],
    samples: int | None = None,
    *,
    name: str = "model",
    source: str = "",
    progress: bool = True,
) -> DiagnosticsResult:
    """Run every diagnostic of spec section 3 on up to `samples` token sequences (each one sample,
    at least 2 tokens) with `model` (a `PLTForCausalLM`, put in eval mode here). One forward of R + 1
    loops per sample with the probe attached; the model's own outputs are not changed."""
    if samples is not None and samples < 1:
        raise LoopcoderError(f"samples must be >= 1, got {samples}")
    model.eval()
    cfg = model.config
    device = next(model.parameters()).device
    probe = LoopProbe(model)
    seqs = list(itertools.islice(sequences, samples))  # samples None: all
    if not seqs:
        raise LoopcoderError("no samples to diagnose (every sequence was empty or shorter than 2 tokens)")
    rows: list[dict[str, np.ndarray]] = []
    tokens, t0 = 0, time.monotonic()
    bar = Progress(f"diagnose {name}", len(seqs), "samples", mode="lines" if progress else "off")
    for seq in seqs:
        ids = torch.as_tensor(seq, dtype=torch.long).reshape(1, -1)
        if ids.shape[1] < 2:
            raise LoopcoderError(f"sample {len(rows)} has {ids.shape[1]} token(s); need at least 2")
        top = int(ids.max())
        if top >= cfg.vocab_size or int(ids.min()) < 0:
            raise LoopcoderError(
                f"sample {len(rows)} has token id {top} outside the model's vocabulary "
                f"(vocab_size={cfg.vocab_size}): wrong tokenizer?"
            )
        ids = ids.to(device)
        probe.begin(ids)
        with torch.inference_mode(), extra_loop(model), model.model.probed(probe):
            model.model(input_ids=ids)
        rows.append(probe.end())
        tokens += ids.shape[1]
        bar.update(len(rows), info=f"{tokens} tokens")
    bar.finish(f"{tokens} tokens")
    per_sample = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    counts = np.maximum(probe.head_cos_count, 1)[..., None, None]
    info = {
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "window": cfg.window,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(device),
    }
    return DiagnosticsResult(
        name=name,
        source=source,
        num_loops=cfg.plt_num_loops,
        architecture=cfg.loop_architecture,
        model_info=info,
        per_sample=per_sample,
        head_cosine_matrix=probe.head_cos_sum / counts,
        gate_histogram=probe.gate_hist,
        num_tokens=tokens,
        seconds=time.monotonic() - t0,
    )


# ----------------------------------------------------------------------------- reading samples
def load_sequences(
    data: str | Path,
    tokenizer: Any,
    seq_len: int = 1024,
    samples: int | None = None,
) -> list[torch.Tensor]:
    """Samples of at most `seq_len` tokens from `data`:
    - a JSONL file (`.jsonl`/`.ndjson`): one sample per record, its "text" field, truncated;
    - any other file: plain text, tokenized as one stream and cut into consecutive windows;
    - a data directory from `loopcoder data build`: the rows of its validation split, cut to `seq_len`
      (`tokenizer` is not used: the rows are token ids already).
    Text samples start with the tokenizer's BOS token when it has one; samples under 2 tokens are
    skipped. Raises LoopcoderError for a missing or unreadable input."""
    if seq_len < 2:
        raise LoopcoderError(f"--seq-len must be >= 2, got {seq_len}")
    if samples is not None and samples < 1:
        raise LoopcoderError(f"--samples must be >= 1, got {samples}")
    path = Path(data)
    if path.is_dir():
        return _data_dir_sequences(path, seq_len, samples)
    if not path.is_file():
        raise LoopcoderError(f"data file {str(data)!r} does not exist")
    if tokenizer is None:
        raise LoopcoderError(
            f"{str(data)!r} is text: a tokenizer is needed (the model directory has none; pass --tokenizer DIR)"
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [bos] if bos is not None else []
    body = seq_len - len(prefix)

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    out: list[torch.Tensor] = []
    full = lambda: samples is not None and len(out) >= samples
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(_lines(path), 1):
            if full():
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoopcoderError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LoopcoderError(f'{path}:{n}: a JSONL record needs a string "text" field')
            ids = prefix + encode(record["text"])[:body]
            if len(ids) >= 2:
                out.append(torch.tensor(ids, dtype=torch.long))
        return out
    # plain text: tokenize in blocks of whole lines (bounded memory), cut the stream into windows
    stream: list[int] = []
    block: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if block:
            stream.extend(encode("".join(block)))
            block.clear()
            size = 0
        while len(stream) >= body and not full():
            out.append(torch.tensor(prefix + stream[:body], dtype=torch.long))
            del stream[:body]

    for line in _lines(path):
        block.append(line)
        size += len(line)
        if size >= 1 << 16:
            flush()
            if full():
                return out
    flush()
    if not full() and len(prefix) + len(stream) >= 2:
        out.append(torch.tensor(prefix + stream, dtype=torch.long))
    return out


def _lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f
    except OSError as e:
        raise LoopcoderError(f"cannot read {str(path)!r}: {e.strerror}") from None


def _data_dir_sequences(path: Path, seq_len: int, samples: int | None) -> list[torch.Tensor]:
    """The validation split of a `loopcoder data build` directory, through `loopcoder.data.shards`:
    its first rows in order, each cut to `seq_len` tokens. Rows are packed documents separated by
    end-of-text (no BOS), already tokenized with the data directory's tokenizer."""
    ds = ShardDataset(path, "validation")  # raises LoopcoderError for a non-data directory
    n = len(ds) if samples is None else min(samples, len(ds))
    return [torch.from_numpy(ds.rows([i])[0, :seq_len]) for i in range(n)]
