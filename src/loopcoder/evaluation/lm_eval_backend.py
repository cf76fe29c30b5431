"""lm-evaluation-harness backend: `--model loopcoder`, backed by the parallel-loop engine.

- `generate_until`: every request of a call is queued on one `Engine`, which keeps `batch_size`
  sequences decoding together (continuous batching, all loops of a token in one pass). `until`,
  `max_gen_toks` (and its aliases), `do_sample`, `temperature`, `top_p`, `top_k` and `seed` are honoured;
  a sampled request without its own seed gets `seed + its index`, so a run is reproducible.
- `loglikelihood` / `loglikelihood_rolling`: the model's own forward over right-padded batches of
  `batch_size` sequences, log-softmax in fp32 (lm-eval's usual context/continuation split and
  rolling windows, as for its `hf` backend).

Model args: `pretrained` (a model directory or a training run directory), `tokenizer`, `device`,
`dtype`, `batch_size`, `max_length`, `max_gen_toks`, `mode` (parallel or sequential decoding),
`seed`, `add_bos_token`, `allow_tokenizer_mismatch` (use a `tokenizer` other than the one the model
was made with: its fingerprint differs). The chat template is lm-eval's own switch (`--apply_chat_template`).

lm-eval is an optional extra (`pip install loopcoder[lm-eval]`); this module is the only one that
imports it. lm-eval finds the backend through the `lm_eval.models` entry point where it reads them;
elsewhere `loopcoder lm-eval ...` registers it first (docs/evaluation.md).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.model.loading import chat_stop_ids, load_for_inference
from loopcoder.training.checkpoints import resolve_model_dir
from loopcoder.utils.errors import LoopcoderError

try:
    from lm_eval.__main__ import cli_evaluate  # noqa: F401  (for `loopcoder lm-eval`)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise LoopcoderError("the lm-eval backend needs lm-evaluation-harness: pip install 'loopcoder[lm-eval]'") from e

MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def _as_int(name: str, value: Any) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise LoopcoderError(f"lm-eval model arg {name}={value!r}: not a whole number") from None
    if out < 1:
        raise LoopcoderError(f"lm-eval model arg {name}={value!r}: must be >= 1")
    return out


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


@register_model("loopcoder")
class LoopcoderLM(TemplateLM):
    """A loopcoder checkpoint as an lm-eval `LM` (see the module docstring)."""

    backend = "causal"

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 8,
        max_batch_size: int | str | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        mode: str = "parallel",
        seed: int | str = 1234,
        add_bos_token: bool | str = False,
        allow_tokenizer_mismatch: bool | str = False,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            raise LoopcoderError(f"unknown lm-eval model arg(s) for loopcoder: {', '.join(sorted(unused))}")
        model_dir = str(resolve_model_dir(pretrained))
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes cuda:0 unless told otherwise; like its hf backend, run where we can
            logging.getLogger(__name__).warning("device %s: CUDA is not available, running on the CPU", device)
            device = None
        self.model, self.tokenizer = load_for_inference(
            model_dir,
            tokenizer,
            device or "auto",
            dtype,
            _as_bool(allow_tokenizer_mismatch),
            override="the model arg allow_tokenizer_mismatch=true",
        )
        self.model_dir = model_dir
        self._device = next(self.model.parameters()).device
        if str(batch_size).startswith("auto"):  # no probing: the engine's batch is a slot count, not a guess
            batch_size = max_batch_size or 8
        self.batch_size = _as_int("batch_size", batch_size)
        config_max = self.model.config.max_position_embeddings
        self._max_length = min(_as_int("max_length", max_length), config_max) if max_length else config_max
        self._max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self.seed = int(seed)
        self.add_bos_token = _as_bool(add_bos_token)
        self.chat = False  # set when lm-eval applies the chat template (then replies also end at <|im_end|>)
        self.engine = Engine(
            self.model, self.tokenizer, max_batch=self.batch_size, max_seq_len=self._max_length, mode=mode
        )

    # ------------------------------------------------------------------ what lm-eval asks about the model
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
            eos = eos[0] if isinstance(eos, list) else eos
        return eos

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS if the tokenizer has one, else end-of-text."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path or self.model_dir).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens and self.add_bos_token
        return [bos, *ids] if add_bos and bos is not None and ids[:1] != [bos] else ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise LoopcoderError("--apply_chat_template: this model's tokenizer has no chat template")
        self.chat = True
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def get_model_info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "model_dir": self.model_dir,
            "loops": cfg.plt_num_loops,
            "architecture": cfg.loop_architecture,
            "dtype": str(next(self.model.parameters()).dtype),
            "mode": self.engine.mode,
        }

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding reproduces the continuation)."""
        rows = []
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation or len(continuation) > self.max_length:
                raise LoopcoderError(
                    f"a continuation of {len(continuation)} tokens cannot be scored with max_length={self.max_length}"
                )
            ids = (context + continuation)[-(self.max_length + 1) :][:-1]  # the last token is only predicted
            rows.append((i, ids, continuation))
        rows.sort(key=lambda r: -len(r[1]))  # similar lengths share a batch: less padding
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = len(chunk[0][1])
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, (_, seq, _) in enumerate(chunk):
                ids[j, : len(seq)] = torch.tensor(seq)
                mask[j, : len(seq)] = 1
            logits = self.model(ids.to(self._device), attention_mask=mask.to(self._device)).logits
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for j, (i, seq, continuation) in enumerate(chunk):
                n = len(continuation)
                rows_lp = logprobs[j, len(seq) - n : len(seq)]  # the positions that predict the continuation
                target = torch.tensor(continuation, device=rows_lp.device)
                total = float(rows_lp.gather(-1, target[:, None]).sum())
                greedy = bool((rows_lp.argmax(-1) == target).all())
                results[i] = (total, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each string's full log-likelihood, in disjoint windows of at most `max_length` predicted tokens."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def sampling_params(self, gen_kwargs: dict[str, Any], index: int) -> SamplingParams:
        """lm-eval generation kwargs as engine sampling parameters."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = next((kw.pop(k) for k in MAX_TOKEN_KEYS if kw.get(k) is not None), self.max_gen_toks)
        for k in MAX_TOKEN_KEYS:
            kw.pop(k, None)
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        do_sample = kw.pop("do_sample", None)
        if do_sample is None:
            do_sample = temperature > 0
        seed = kw.pop("seed", None)
        params = SamplingParams(
            max_new_tokens=_as_int("max_gen_toks", max_new),
            temperature=temperature if _as_bool(do_sample) else 0.0,
            top_p=float(kw.pop("top_p", 1.0) or 1.0),
            top_k=int(kw.pop("top_k", 0) or 0),
            seed=int(seed) if seed is not None else self.seed + index,
            stop=[s for s in until if s],
        )
        kw.pop("max_length", None)  # lm-eval's legacy total length: the engine stops at max_length anyway
        if kw:
            raise LoopcoderError(f"generation kwarg(s) the loopcoder backend does not know: {', '.join(sorted(kw))}")
        if self.chat:
            params.stop_token_ids = chat_stop_ids(self.engine.eos_ids, self.tokenizer)
        return params.validate()

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Every request queued on the engine at once; it decodes `batch_size` of them together."""
        prompts, params = [], []
        for index, (context, gen_kwargs) in enumerate(req.args for req in requests):
            p = self.sampling_params(gen_kwargs, index)
            room = self.max_length - p.max_new_tokens
            if room < 1:
                raise LoopcoderError(
                    f"max_gen_toks={p.max_new_tokens} leaves no room for a prompt in max_length={self.max_length}"
                )
            ids = self.tok_encode(context)[-room:] or [self.prefix_token_id]  # left-truncated, like lm-eval's hf
            prompts.append(ids)
            params.append(p)
        outs = [c.text for c in self.engine.generate(prompts, params)]
        for req, text in zip(requests, outs):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outs
