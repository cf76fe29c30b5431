"""`PLTConfig`: the released LoopCoder-V2 `config.json`, field for field, validated on construction.

Field names are exactly the released ones (spec section 1.4), so a released `config.json` loads as it
is and `save_pretrained` writes it back in the same layout. One field is ours: `loop_architecture`
selects the vanilla looped transformer that PLT's efficiency claims are measured against, and
`plt_loop_offset` turns CLP's one-position shift off for the offset ablation.

Our own models are shaped by `loopcoder.model.shape.ModelShape`, which builds its `PLTConfig` here.
`ConfigError` lives in `loopcoder.utils.errors` (importable without transformers) and is re-exported here.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from loopcoder.utils.errors import ConfigError

MODEL_TYPE = "iquestpltcoder"  # the released `model_type`
RELEASED_ARCHITECTURE = "IQuestPLTCoderForCausalLM"  # the released `architectures[0]`
LOOP_ARCHITECTURES = ("plt", "vanilla")

# Keys a transformers-written config.json carries besides the model's own fields.
_BASE_KEYS = {
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "model_type",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "is_encoder_decoder",
    "tokenizer_class",
    "name_or_path",
    "_name_or_path",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "pretraining_tp",
    "attention_dropout",
    "initializer_range",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "task_specific_params",
    "finetuning_task",
    "prefix",
    "tie_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "torchscript",
    "rope_scaling",
    "rope_parameters",
    "auto_map",
    "quantization_config",
}


class PLTConfig(PreTrainedConfig):
    r"""Configuration of a Parallel Loop Transformer (LoopCoder-V2's `iquestpltcoder`).

    Llama-family fields plus the PLT ones:
    - `plt_num_loops` R >= 1 (R = 1 is an ordinary Llama-style decoder);
    - `plt_window_size` [w, 0]: the local branch of loops >= 2 sees the w previous tokens and itself;
    - `plt_emb_scale` a and `plt_hidden_scale` b of the CLP input `a * E_t + b * P(r-1)_{t-1}`
      (None means 1.0);
    - `plt_normalize_per_loop`: P(r) = model.norm(h(r)) instead of the raw h(r);
    - `plt_gate_use_hidden_states`: gate from RMSNorm_g(layer input) (released) or from the query;
    - `loop_architecture`: "plt" (CLP + G-SWA) or "vanilla" (loop r reads loop r-1 at the same
      position and keeps its own full KV cache; no gate);
    - `plt_loop_offset` (ours, PLT only): CLP's one-position shift. False is the ablation in which loop
      r reads loop r-1 at the *same* position (re-injected embedding, G-SWA and gate unchanged); such a
      model cannot decode all loops in one pass, so it decodes one loop after another.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 76800
    hidden_size: int = 5120
    intermediate_size: int = 27648
    num_hidden_layers: int = 14
    num_attention_heads: int = 40
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    plt_num_loops: int = 2
    plt_window_size: list[int] | tuple[int, int] = (64, 0)
    plt_emb_scale: float | None = 0.707
    plt_hidden_scale: float | None = 0.053
    plt_normalize_per_loop: bool = True
    plt_gate_use_hidden_states: bool = True
    loop_architecture: str = "plt"
    plt_loop_offset: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        unknown = sorted(k for k in kwargs if k not in _BASE_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown config field(s) {', '.join(map(repr, unknown))} for {MODEL_TYPE}; "
                f"valid fields: {', '.join(sorted(PLTConfig.__annotations__))}"
            )
        rope_scaling = kwargs.pop("rope_scaling", None)
        rope_parameters = kwargs.pop("rope_parameters", None)
        if rope_scaling or (rope_parameters and rope_parameters.get("rope_type", "default") != "default"):
            raise ConfigError("rope_scaling: only the default RoPE (rope_theta) is supported")
        if rope_parameters and "rope_theta" in rope_parameters:
            self.rope_theta = float(rope_parameters["rope_theta"])
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.plt_window_size = list(self.plt_window_size)
        super().__post_init__(**kwargs)
        self.validate_plt()

    # ------------------------------------------------------------------ validation
    def validate_plt(self) -> None:
        """Raise `ConfigError` naming the first invalid field."""

        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{field}={getattr(self, field)!r}: {why}")

        for f in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            need(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, f, "must be an integer >= 1")
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"must divide num_attention_heads={self.num_attention_heads}",
        )
        need(self.head_dim % 2 == 0, "head_dim", "must be even (RoPE rotates pairs)")
        need(self.hidden_act in ("silu", "swish"), "hidden_act", "only SwiGLU ('silu') is supported")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(
            isinstance(self.plt_num_loops, int)
            and not isinstance(self.plt_num_loops, bool)
            and self.plt_num_loops >= 1,
            "plt_num_loops",
            "must be an integer >= 1",
        )
        ws = self.plt_window_size
        need(len(ws) == 2 and all(isinstance(x, int) for x in ws), "plt_window_size", "must be [left, right] integers")
        need(ws[0] >= 0, "plt_window_size", "left window must be >= 0")
        need(ws[1] == 0, "plt_window_size", "right window must be 0 (attention is causal)")
        for f in ("plt_emb_scale", "plt_hidden_scale"):
            v = getattr(self, f)
            need(v is None or (isinstance(v, (int, float)) and v == v), f, "must be a number or null")
        need(self.loop_architecture in LOOP_ARCHITECTURES, "loop_architecture", f"must be one of {LOOP_ARCHITECTURES}")
        need(isinstance(self.plt_loop_offset, bool), "plt_loop_offset", "must be true or false")
        for f in ("bos_token_id", "pad_token_id"):
            v = getattr(self, f)
            need(v is None or 0 <= v < self.vocab_size, f, f"must be in [0, vocab_size={self.vocab_size})")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        need(
            all(e is None or 0 <= e < self.vocab_size for e in eos),
            "eos_token_id",
            f"must be in [0, vocab_size={self.vocab_size})",
        )

    # ------------------------------------------------------------------ derived values
    @property
    def num_loops(self) -> int:
        return self.plt_num_loops

    @property
    def window(self) -> int:
        """w: how many previous tokens the local branch of loops >= 2 sees (plus the token itself)."""
        return self.plt_window_size[0]

    @property
    def emb_scale(self) -> float:
        return 1.0 if self.plt_emb_scale is None else float(self.plt_emb_scale)

    @property
    def hidden_scale(self) -> float:
        return 1.0 if self.plt_hidden_scale is None else float(self.plt_hidden_scale)

    @property
    def is_vanilla(self) -> bool:
        return self.loop_architecture == "vanilla"

    @property
    def single_pass(self) -> bool:
        """Whether all loops of a new token can run in one pass (PLT with CLP's offset, or R = 1)."""
        return self.plt_num_loops == 1 or (not self.is_vanilla and self.plt_loop_offset)

    def kv_cache_entries(self, seq_len: int) -> int:
        """K/V positions cached per layer for `seq_len` tokens (spec 1.2): T + (R-1)(w+1) for PLT."""
        if self.is_vanilla:
            return self.plt_num_loops * seq_len
        return seq_len + (self.plt_num_loops - 1) * min(self.window + 1, seq_len)

    def kv_cache_bytes(self, seq_len: int, batch_size: int = 1, dtype_bytes: int = 2) -> int:
        """2 * L * n_kv * head_dim * entries * bytes, the spec's KV-memory formula."""
        per_entry = 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes
        return batch_size * per_entry * self.kv_cache_entries(seq_len)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        # Checkpoints carry the released architecture name so other LoopCoder-V2 tooling recognises them.
        if d.get("architectures"):
            d["architectures"] = [RELEASED_ARCHITECTURE if a.startswith("PLT") else a for a in d["architectures"]]
        d.pop("rope_parameters", None)
        return d


def released_config(**overrides: Any) -> PLTConfig:
    """The published LoopCoder-V2 7B shape (spec 1.4), optionally with fields replaced."""
    fields: dict[str, Any] = {"dtype": "bfloat16"}
    fields.update(overrides)
    return PLTConfig(**fields)
