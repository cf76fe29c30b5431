"""`EngineConfig`: the engine's cache and scheduling options, validated in one place.

`Engine(model, tokenizer, EngineConfig(max_batch=8, ...))`, or as before `Engine(model, tokenizer,
max_batch=8, ...)`: the keywords build an `EngineConfig`. The command line checks its flags with
`EngineConfig.validate` too (`commands/serve.py`), so an option the engine cannot run with is one line there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

from loopcoder.utils.defaults import DEFAULT_BLOCK_SIZE, DEFAULT_STEP_TOKENS
from loopcoder.utils.errors import LoopcoderError

Mode = Literal["parallel", "sequential"]
MODES: tuple[Mode, ...] = ("parallel", "sequential")


@dataclass(frozen=True)
class EngineConfig:
    """What the engine runs with (checked when made: a `LoopcoderError` names the first bad option).

    - `max_batch`: slots, i.e. sequences decoded together; `max_seq_len`: positions per sequence (default and
      upper bound: the model's `max_position_embeddings`).
    - `mode`: "parallel" decodes all loops of a token in one pass (spec 1.3), "sequential" one pass per loop.
    - `fuse`: fused, prepacked projections (`prepare_for_inference`); `static_shapes`, `compile`, `cuda_graphs`:
      the decode step on fixed shapes, compiled with `torch.compile` or captured as a CUDA graph.
    - the cache: `paged=True` keeps the full stores in blocks of `block_size` positions from one pool of
      `kv_cache_tokens` positions (default: `max_batch * max_seq_len`), with prefix caching (`prefix_caching`,
      on by default when paged); `paged=False` preallocates `max_seq_len` positions per slot.
    - `max_step_tokens`: the per-step token budget (decoding tokens plus prefill chunks); None prefills every
      prompt in one piece.
    """

    max_batch: int = 8
    max_seq_len: int | None = None
    mode: Mode = "parallel"
    fuse: bool = True
    static_shapes: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    paged: bool = True
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_tokens: int | None = None
    prefix_caching: bool | None = None
    max_step_tokens: int | None = DEFAULT_STEP_TOKENS

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line `LoopcoderError` for options the engine cannot run with."""
        if self.mode not in MODES:
            raise LoopcoderError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_batch < 1:
            raise LoopcoderError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_step_tokens is not None and self.max_step_tokens <= self.max_batch:
            raise LoopcoderError(
                f"max_step_tokens must exceed max_batch ({self.max_batch}): decoding sequences take one "
                f"token each and prefill needs the rest; got {self.max_step_tokens}"
            )
        if self.prefix_caching and not self.paged:
            raise LoopcoderError("prefix caching needs the paged cache (paged=True)")
        if self.block_size < 1:
            raise LoopcoderError(f"block_size must be >= 1, got {self.block_size}")
        if self.paged and self.kv_cache_tokens is not None and -(-self.kv_cache_tokens // self.block_size) < 2:
            raise LoopcoderError(
                f"kv_cache_tokens must hold at least two blocks of {self.block_size}, got {self.kv_cache_tokens}"
            )

    @property
    def static(self) -> bool:
        """The decode step runs on fixed shapes (every slot, the whole store): asked for, or needed by
        CUDA graphs and compiled steps."""
        return self.static_shapes or self.cuda_graphs or self.compile

    @classmethod
    def from_options(cls, config: EngineConfig | None = None, **options: object) -> EngineConfig:
        """`config` (default: the defaults) with `options` replacing its fields; an unknown option is an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(
                f"unknown engine option(s) {', '.join(unknown)}: EngineConfig has {', '.join(sorted(names))}"
            )
        return replace(config or cls(), **options)
