"""`ModelShape`: the one place a model of our own is shaped. Training (`model.*` keys), `loopcoder init`,
`loopcoder plan` and the benchmarks all build their `PLTConfig` through `ModelShape.plt_config`, so
their defaults (MLP width, vocabulary rounding, RoPE base, CLP scales) cannot drift apart.

Apart from `loopcoder.model.config` (which subclasses transformers' config, and so imports torch): the
command line builds its parsers and shows these defaults without importing torch, and `plt_config`
imports `PLTConfig` only when it is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loopcoder.utils.errors import LoopcoderError

if TYPE_CHECKING:
    from loopcoder.model.config import PLTConfig


def mlp_width(hidden_size: int) -> int:
    """SwiGLU's default width: 8/3 of the hidden size, rounded up to a multiple of 32."""
    return -(-int(8 * hidden_size / 3) // 32) * 32


@dataclass
class ModelShape:
    """The shape of a model we build (training's `model.*` keys): short names for `PLTConfig` fields.
    `None` fields are derived in `plt_config`."""

    loops: int = 1  # plt_num_loops, R
    hidden_size: int = 128
    layers: int = 4  # num_hidden_layers
    heads: int = 4  # num_attention_heads
    kv_heads: int | None = None  # num_key_value_heads (None: = heads)
    head_dim: int | None = None  # None: hidden_size / heads
    intermediate_size: int | None = None  # None: `mlp_width(hidden_size)`, 8/3 hidden rounded up to 32
    window: int = 64  # plt_window_size[0], G-SWA's local window
    architecture: str = "plt"  # loop_architecture: plt | vanilla
    loop_offset: bool = True  # plt_loop_offset: False is the ablation without CLP's one-position shift
    vocab_size: int | None = None  # None: the tokenizer's, rounded up to a multiple of 64
    max_position_embeddings: int | None = None  # None: max(sequence length, 4096)
    rope_theta: float = 10000.0
    emb_scale: float | None = 0.707  # plt_emb_scale a
    hidden_scale: float | None = 0.053  # plt_hidden_scale b
    normalize_per_loop: bool = True
    gate_from_hidden: bool = True  # plt_gate_use_hidden_states
    tie_embeddings: bool = False
    init_std: float = 0.02  # initializer_range

    def plt_config(
        self,
        tokenizer_vocab: int | None = None,
        seq_len: int = 0,
        *,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
    ) -> PLTConfig:
        """The `PLTConfig` of this shape. `tokenizer_vocab` sizes the vocabulary when `vocab_size` is None
        (and must fit in it otherwise); `seq_len` is the longest sequence trained on."""
        from loopcoder.model.config import PLTConfig  # here: importing it imports torch and transformers

        if self.vocab_size is None and tokenizer_vocab is None:
            raise LoopcoderError("model.vocab_size is not set and there is no tokenizer to take it from")
        vocab = self.vocab_size or -(-tokenizer_vocab // 64) * 64
        if tokenizer_vocab is not None and vocab < tokenizer_vocab:
            raise LoopcoderError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}")
        return PLTConfig(
            vocab_size=vocab,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size or mlp_width(self.hidden_size),
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads or self.heads,
            head_dim=self.head_dim or self.hidden_size // self.heads,
            max_position_embeddings=self.max_position_embeddings or max(seq_len, 4096),
            rope_theta=self.rope_theta,
            initializer_range=self.init_std,
            tie_word_embeddings=self.tie_embeddings,
            plt_num_loops=self.loops,
            plt_window_size=[self.window, 0],
            plt_emb_scale=self.emb_scale,
            plt_hidden_scale=self.hidden_scale,
            plt_normalize_per_loop=self.normalize_per_loop,
            plt_gate_use_hidden_states=self.gate_from_hidden,
            loop_architecture=self.architecture,
            plt_loop_offset=self.loop_offset,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
