"""The Parallel Loop Transformer (LoopCoder-V2), exactly as `docs/spec` section 1 describes it.

A Llama-style decoder whose L layers run R times ("loops") with shared weights. Where the spec's
pieces live:

- CLP, the cross-loop position offset (1.1): `PLTModel.loop_input` (`a * E_t + b * P(r-1)_{t-1}`) and
  `PLTModel.loop_predecessor` (which state is P(r-1)_{t-1}: the one-position shift; position 0 has
  no predecessor). `PLTModel.loop_state` is P(r).
- G-SWA, shared-KV gated sliding-window attention (1.2): `PLTAttention`. Loops >= 2 mix a global
  branch over loop 1's K/V with a local branch over their own K/V in a window of w previous tokens
  plus the token itself, through `PLTGate` (per head and token, zero-initialised). Both schedules
  below use the same blocks: `project` (q/k/v, RoPE), `attend`, `mix` (the gate), `output`, and
  `PLTDecoderLayer.residual_mlp`.
- The two schedules of 1.3, side by side:
  - `PLTModel.forward`: a chunk of positions, loop by loop, each loop through all layers (training,
    prefill, `generate`'s cached decoding); K/V in a growing `PLTCache`.
  - `PLTModel.decode_step`: one new token per sequence. With CLP's offset all R loops of the token go
    through every layer together as R rows (single pass, the reason PLT exists), or one loop per pass
    (`parallel=False`, the authors' vLLM schedule); without it (vanilla looped model, the
    `plt_loop_offset=False` ablation) loop r needs loop r-1 of the same token: R dependent passes.
    K/V in the engine's preallocated `SlotCache`, through its methods.
- The vanilla looped transformer used as the efficiency baseline (`loop_architecture="vanilla"`):
  loop r reads loop r-1 at the same position and attends over its own full causal K/V; no gate.

Tensor names are the released ones (`model.layers.{i}.self_attn.plt_gate.*` and so on), so
`from_pretrained` loads a LoopCoder-V2 directory as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from loopcoder.model.cache import KV, DecodeCache, DecodeStep, PLTCache, SequenceCache
from loopcoder.model.config import PLTConfig
from loopcoder.model.fastlinear import FastLinear, active, can_pack
from loopcoder.model.flex import block_masks, flex_attention
from loopcoder.utils.errors import check_loading_info


class Masks(NamedTuple):
    """Which keys each query may see. `causal` is for loop 1 / the global branch / vanilla loops,
    `window` for the local branch of PLT loops >= 2. `None` means plain causal over keys == queries."""

    causal: Any
    window: Any


# ----------------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in fp32, scale by the weight in the input dtype."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32) if dtype != torch.float64 else x
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple:
    """cos/sin (…, positions, head_dim) of RoPE at the true positions; fp32 like Llama (fp64 for fp64)."""
    fdtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=fdtype) / head_dim))
    freqs = positions.to(fdtype)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, S, head_dim) by cos/sin of shape (B, S, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def position_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean (B, 1, S, T) mask from query positions (B, S) and key positions (B, T); -1 marks padding
    or an empty slot. A key is visible when `q - window <= k <= q`. A query that sees nothing (a
    padding row) is let see everything so attention stays finite; its output is never used."""
    q, k = qpos[:, :, None], kpos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= k >= q - window
    mask |= ~mask.any(-1, keepdim=True)
    return mask[:, None]


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in fp32 with GQA; `mask=None` is causal. (B, heads, S, T)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is None:
        s, t = scores.shape[-2:]
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def attend(q: torch.Tensor, kv: KV, mask: Any, impl: str = "sdpa") -> torch.Tensor:
    """Attention of queries (B, H, S, hd) over `kv` under `mask` (None: causal with keys == queries,
    a boolean tensor, or a flex BlockMask). GQA: kv heads are shared by H / kv_heads query heads."""
    gqa = q.shape[1] != kv.k.shape[1]
    if impl == "eager":
        probs = attention_probs(q, kv.k, mask).to(q.dtype)
        return probs @ kv.v.repeat_interleave(q.shape[1] // kv.v.shape[1], dim=1)
    if impl == "flex_attention" and not isinstance(mask, torch.Tensor) and mask is not None:
        return flex_attention(q, kv.k, kv.v, block_mask=mask, enable_gqa=gqa)
    if gqa and isinstance(mask, torch.Tensor) and mask.shape[-2] == 1:
        # decoding: every query sees the same keys, so fold the heads sharing a kv head into the query
        # axis and read each kv head once (SDPA's own GQA path is ~2x slower here)
        b, h, s, d = q.shape
        hkv = kv.k.shape[1]
        y = F.scaled_dot_product_attention(q.reshape(b, hkv, h // hkv * s, d), kv.k, kv.v, attn_mask=mask)
        return y.reshape(b, h, s, d)  # reshape: CUDA kernels may return a (b, s, h, d) layout
    return F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: PLTConfig) -> None:
        super().__init__()
        d, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, m, bias=bias)
        self.up_proj = nn.Linear(d, m, bias=bias)
        self.down_proj = nn.Linear(m, d, bias=bias)

    fast_gate_up: FastLinear | None = None
    fast_down: FastLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if active(self.fast_gate_up):  # decoding: one fused (and on CPU prepacked) matmul, see fastlinear.py
            gate, up = self.fast_gate_up.split(x)
            return self.fast_down(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def prepare_for_inference(self, pack: bool) -> None:
        self.fast_gate_up = FastLinear([self.gate_proj, self.up_proj], pack)
        self.fast_down = FastLinear([self.down_proj], pack)


class PLTGate(nn.Module):
    """G-SWA's per-head, per-token gate g in (0, 1): `y = g * y_global + (1 - g) * y_local`.

    Released mode (`plt_gate_use_hidden_states`): g = sigmoid(W_g . RMSNorm_g(x) + b_g) from the layer
    input x, W_g [heads, hidden]. Other mode: g_h = sigmoid(<q_h, w_h> + b_h) from the post-RoPE query,
    W_g [heads, head_dim]. Zero-initialised, so g starts at 0.5.
    """

    def __init__(self, config: PLTConfig) -> None:
        super().__init__()
        self.use_hidden_states = config.plt_gate_use_hidden_states
        heads = config.num_attention_heads
        in_dim = config.hidden_size if self.use_hidden_states else config.head_dim
        self.weight = nn.Parameter(torch.zeros(heads, in_dim))
        self.bias = nn.Parameter(torch.zeros(heads))
        if self.use_hidden_states:
            self.gate_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """x: layer input (B, S, hidden); q: post-RoPE query (B, H, S, hd). Returns g as (B, H, S, 1)."""
        if self.use_hidden_states:
            logits = F.linear(self.gate_norm(x), self.weight, self.bias).transpose(1, 2)
        else:
            logits = torch.einsum("bhsd,hd->bhs", q, self.weight) + self.bias[:, None]
        return torch.sigmoid(logits).unsqueeze(-1)


class PLTAttention(nn.Module):
    """Causal self-attention for loop 1; G-SWA (gated global + local window) for PLT loops >= 2;
    plain causal attention over the loop's own K/V for vanilla loops."""

    def __init__(self, config: PLTConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=bias)
        has_gate = config.loop_architecture == "plt" and config.plt_num_loops > 1
        self.plt_gate = PLTGate(config) if has_gate else None
        self.probe = None  # diagnostics hook, see `PLTModel.probed`

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        """q (B, H, S, hd) and K/V (B, kv_heads, S, hd) of normalised input x (B, S, hidden), after RoPE, and
        the gate logits (B, S, H) when the decoding path computes them in the same matmul (else None)."""
        b, s, _ = x.shape
        gate_logits = None
        if active(self.fast_qkv):  # decoding: one fused (and on CPU prepacked) matmul, see fastlinear.py
            q, k, v, *rest = self.fast_qkv.split(x)
            gate_logits = rest[0] if rest else None
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), KV(apply_rope(k, cos, sin), v), gate_logits

    fast_qkv: FastLinear | None = None
    fast_o: FastLinear | None = None

    def prepare_for_inference(self, pack: bool, input_norm: torch.Tensor | None = None) -> None:
        """Fused q/k/v (and o) matmuls. The released gate reads RMSNorm_g(x) = (w_g / w_ln) * input_layernorm(x)
        (both normalise x by the same RMS), so its logits are a linear map of the q/k/v input and join the
        same matmul, unless the layer norm has weights too close to 0 to divide by."""
        gate = self.plt_gate
        extra = None
        if (
            gate is not None
            and gate.use_hidden_states
            and input_norm is not None
            and float(input_norm.detach().abs().min()) > 1e-3
        ):
            extra = gate.weight.detach() * (gate.gate_norm.weight.detach() / input_norm.detach())[None, :]
        self.fast_qkv = FastLinear([self.q_proj, self.k_proj, self.v_proj], pack, extra)
        self.fast_o = FastLinear([self.o_proj], pack)

    def mix(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        y_global: torch.Tensor,
        y_local: torch.Tensor,
        gate_logits: torch.Tensor | None = None,
    ) -> tuple:
        """G-SWA's gated sum of the two branches; returns (y, g). `gate_logits` (B, S, H): precomputed
        W_g . RMSNorm_g(x) from the fused projection."""
        if gate_logits is None:
            g = self.plt_gate(x, q)
        else:
            g = torch.sigmoid(gate_logits + self.plt_gate.bias).transpose(1, 2).unsqueeze(-1)
        return torch.lerp(y_local, y_global, g.to(y_local.dtype)), g  # g * y_global + (1 - g) * y_local

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, S, hd) -> o_proj -> (B, S, hidden)."""
        b, _, s, _ = y.shape
        y = y.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.fast_o(y) if active(self.fast_o) else self.o_proj(y)

    def forward(
        self,
        x: torch.Tensor,
        xn: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        loop: int,
        past: KV | None,
        shared: KV | None,
        masks: Masks,
    ) -> tuple:
        """One loop's attention over a chunk of S positions.

        x is the layer input (for the gate), xn its `input_layernorm`. `past` holds the K/V this loop
        already cached (None without a cache); `shared` is loop 1's K/V of this layer, up to and
        including this chunk (loops >= 2 of PLT only). Returns (output, own K/V incl. this chunk).
        """
        impl = self.config._attn_implementation or "sdpa"
        q, new, gate_logits = self.project(xn, cos, sin)
        own = new if past is None else KV(torch.cat([past.k, new.k], 2), torch.cat([past.v, new.v], 2))
        if shared is None:  # loop 1, or a vanilla loop: causal attention over its own K/V
            y = attend(q, own, masks.causal, impl)
            self._observe(loop, "causal", q, own, masks.causal)
        else:  # G-SWA: global branch over loop 1's K/V, local branch over own K/V in the window
            y_global = attend(q, shared, masks.causal, impl)
            y_local = attend(q, own, masks.window, impl)
            y, g = self.mix(x, q, y_global, y_local, gate_logits)
            self._observe(loop, "global", q, shared, masks.causal)
            self._observe(loop, "local", q, own, masks.window, gate=g)
        return self.output(y), own

    def decode(
        self,
        x: torch.Tensor,
        xn: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        loops: range,
        step: DecodeStep,
        cache: DecodeCache,
    ) -> torch.Tensor:
        """One new token per sequence, rows x (n, len(loops), hidden) for loops `loops` (0 = loop 1).

        What `forward` does for one position, with the K/V in `cache`: the loop-1 row (or a vanilla loop's)
        writes its K/V to the full store and loops >= 2 to their rings, first, so that every row sees
        position t. Then every row attends causally over the full store (loop 1's K/V: the global branch
        of G-SWA, in one call for all rows; a vanilla loop's own K/V), rows of loops >= 2 also over their
        rings (the local branch, one call), and the gate mixes the two.
        """
        i = self.layer_idx
        n, rows = x.shape[:2]
        # q (n, H, rows, hd), K/V (n, kv_heads, rows, hd); gate logits (n, rows, H) from the same matmul when fused
        q, new, gate_logits = self.project(xn, cos, sin)
        ring = range(max(loops.start, 1), loops.stop) if self.plt_gate is not None else range(0)
        g = rows - len(ring)  # rows before the first ring row: the loop-1 row, or one vanilla/R=1 loop
        if g:
            cache.write_full(i, loops.start, step, KV(new.k[:, :, :1], new.v[:, :, :1]))
        if ring:
            cache.write_ring(i, ring, step, KV(new.k[:, :, g:], new.v[:, :, g:]))
        y = attend(q, cache.full_kv(i, loops.start, step), step.full_mask)
        if ring:  # G-SWA's local branch over each loop's ring, then the gate
            kv, mask = cache.ring_kv(i, ring, step)
            q_local = q[:, :, g:].transpose(1, 2).flatten(0, 1).unsqueeze(2)  # (n * rings, H, 1, hd)
            y_local = attend(q_local, kv, mask).reshape(n, len(ring), self.num_heads, -1).transpose(1, 2)
            logits = None if gate_logits is None else gate_logits[:, g:]
            y[:, :, g:] = self.mix(x[:, g:], q[:, :, g:], y[:, :, g:], y_local, logits)[0]
        return self.output(y)

    def _observe(self, loop: int, branch: str, q, kv: KV, mask, gate=None) -> None:
        if self.probe is not None:
            dense = mask if isinstance(mask, torch.Tensor) or mask is None else None
            self.probe.attention(self.layer_idx, loop, branch, attention_probs(q, kv.k, dense), gate)


class PLTDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). Pure in its inputs, so it can be
    activation-checkpointed even though the same layer runs R times per step."""

    def __init__(self, config: PLTConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = PLTAttention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        loop: int,
        past: KV | None,
        shared: KV | None,
        masks: Masks,
    ) -> tuple:
        """One loop over a chunk of positions (`PLTModel.forward`); returns (output, own K/V)."""
        attn, own = self.self_attn(x, self.input_layernorm(x), cos, sin, loop, past, shared, masks)
        return self.residual_mlp(x, attn), own

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, loops: range, step: DecodeStep, cache: DecodeCache
    ) -> torch.Tensor:
        """Loop rows of one new token per sequence (`PLTModel.decode_step`)."""
        return self.residual_mlp(x, self.self_attn.decode(x, self.input_layernorm(x), cos, sin, loops, step, cache))

    def residual_mlp(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of the block after attention: x + attn, then + mlp(norm(.))."""
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- the model
class PLTPreTrainedModel(PreTrainedModel):
    config: PLTConfig
    config_class = PLTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PLTDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = False
    _can_compile_fullgraph = False
    _is_stateful = True  # the cache holds per-loop states: it cannot be cropped for assisted decoding

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PLTGate):  # g = 0.5 at initialisation (spec 1.2)
            init.zeros_(module.weight)
            init.zeros_(module.bias)


@dataclass
class PLTModelOutput:
    last_hidden_state: torch.Tensor  # h(R), before the final norm
    cache: PLTCache | None = None
    loop_hidden_states: tuple[torch.Tensor, ...] | None = None  # h(1) .. h(R) when asked for


class PLTModel(PLTPreTrainedModel):
    def __init__(self, config: PLTConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(PLTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.loop_probe = None
        self.post_init()

    # -- CLP ------------------------------------------------------------------------------------
    def loop_state(self, h: torch.Tensor) -> torch.Tensor:
        """P(r): what loop r hands to loop r+1, the shared final norm of h(r) when configured."""
        return self.norm(h) if self.config.plt_normalize_per_loop else h

    def loop_input(self, emb: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """CLP input of loop r >= 2: B(r)_t = a * E_t + b * P(r-1)_{t-1}, `pred` being P(r-1)_{t-1}."""
        return self.config.emb_scale * emb + self.config.hidden_scale * pred

    def loop_predecessor(
        self, prev: torch.Tensor, first: torch.Tensor | None, positions: torch.Tensor | None
    ) -> torch.Tensor:
        """P(r-1)_{t-1} for every position t of a chunk: `prev` is P(r-1) over the chunk, `first` the saved
        P(r-1) of the position before it (None at the start of a sequence).

        Shifting by one position is the whole trick: loop r at t needs loop r-1 only at t-1, so all loops
        of a new token can run at once when decoding (`decode_step`). Without the offset (the ablation,
        `plt_loop_offset=False`) the predecessor is P(r-1)_t itself.
        """
        if not self.config.plt_loop_offset:
            return prev
        first = prev.new_zeros(prev[:, :1].shape) if first is None else first[:, None].to(prev.dtype)
        pred = torch.cat([first, prev[:, :-1]], dim=1)
        return pred.masked_fill((positions <= 0)[..., None], 0.0)  # position 0 has no predecessor

    # -- the loop schedule -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: PLTCache | SequenceCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_loop_states: bool = False,
        **kwargs: Any,
    ) -> PLTModelOutput:
        """h(R) over a chunk of positions, loop by loop. With a `cache` the chunk continues the cached sequences:
        a `PLTCache` (training-free decoding with `generate`, prefill), or one slot of the engine's cache
        (`SlotCache.chunk`: a chunked prefill straight into the engine's K/V, see `PLTForCausalLM.prefill_chunk`)."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        emb = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = PLTCache(cfg)
        positions = self._positions(emb, attention_mask, position_ids, cache)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, emb.dtype)
        masks = self._masks(positions, cache, attention_mask)

        R, plt = cfg.plt_num_loops, not cfg.is_vanilla
        saved = list(cache.states) if cache is not None else [None] * (R - 1)  # read before overwritten
        shared: list[KV | None] = [None] * len(self.layers)
        loop_states, h = [], None
        for r in range(R):
            if r == 0:
                x = emb
            elif plt:
                x = self.loop_input(emb, self.loop_predecessor(self.loop_state(h), saved[r - 1], positions))
            else:  # vanilla looped transformer: same position, previous loop
                x = h
            for i, layer in enumerate(self.layers):
                past = cache.past(i, r) if cache is not None else None
                x, own = layer(x, cos, sin, r, past, shared[i] if (plt and r > 0) else None, masks)
                if r == 0:
                    shared[i] = own
                if cache is not None:
                    cache.store(i, r, own)
            h = x
            if self.loop_probe is not None:
                self.loop_probe.loop_output(r, h)
            if output_loop_states:
                loop_states.append(h)
            if cache is not None and plt and r < R - 1:
                cache.save_loop_states(r, self.loop_state(h))
        if cache is not None:
            cache.advance(positions)
        return PLTModelOutput(h, cache, tuple(loop_states) if output_loop_states else None)

    # -- the decode schedule (spec 1.3) ----------------------------------------------------------------
    def decode_step(
        self, tokens: torch.Tensor, cache: DecodeCache, step: DecodeStep, parallel: bool = True
    ) -> torch.Tensor:
        """h(R) (n, hidden) of one new token per sequence: `tokens` (n,) at `step.positions`, in slots 0..n-1
        of `cache` (opened by `cache.begin_step`; this closes it). Advances the cache by one position.

        With CLP's offset (`config.single_pass`) every loop of the new token depends only on the previous
        step, so its R loops form R rows: row 1 is E_t, row r is `a * E_t + b * P(r-1)_{t-1}` from the
        saved state. `parallel`: all rows through every layer together, each weight read once for all
        loops; else one loop per pass (the authors' vLLM schedule; the same numbers, R weight reads).
        Without the offset (vanilla, or the ablation) loop r reads loop r-1 of the same token, so the
        loops are R dependent passes.
        """
        cfg = self.config
        R = cfg.plt_num_loops
        emb = self.embed_tokens(tokens)[:, None]  # (n, 1, hidden)
        cos, sin = rope_cos_sin(step.positions[:, None], cfg.head_dim, cfg.rope_theta, emb.dtype)
        if cfg.single_pass:
            x = emb if R == 1 else torch.cat([emb, self.loop_input(emb, cache.saved_states(step))], 1)
            if parallel:
                h = self._decode_layers(x, range(R), cos, sin, step, cache)
            else:
                h = torch.cat(
                    [self._decode_layers(x[:, r : r + 1], range(r, r + 1), cos, sin, step, cache) for r in range(R)], 1
                )
            if R > 1:
                cache.save_states(step, self.loop_state(h[:, :-1]))
        else:  # loop r reads loop r-1 of the same token (as `forward` does): R dependent passes
            h = self._decode_layers(emb, range(1), cos, sin, step, cache)
            for r in range(1, R):
                x = h if cfg.is_vanilla else self.loop_input(emb, self.loop_predecessor(self.loop_state(h), None, None))
                h = self._decode_layers(x, range(r, r + 1), cos, sin, step, cache)
        cache.end_step(step)
        return h[:, -1]

    def _decode_layers(
        self, x: torch.Tensor, loops: range, cos: torch.Tensor, sin: torch.Tensor, step: DecodeStep, cache: DecodeCache
    ) -> torch.Tensor:
        """Rows x (n, len(loops), hidden) of loops `loops` of the new tokens through every layer."""
        n, rows = x.shape[:2]
        cos, sin = cos.expand(n, rows, -1), sin.expand(n, rows, -1)
        for layer in self.layers:
            x = layer.decode(x, cos, sin, loops, step, cache)
        return x

    def _positions(
        self, emb: torch.Tensor, attention_mask, position_ids, cache: PLTCache | SequenceCache | None
    ) -> torch.Tensor:
        """True positions (B, S) of the new tokens; -1 marks padding (attention_mask == 0), whatever
        position `generate` made up for it, so that padded slots are never attended to."""
        b, s = emb.shape[:2]
        has_mask = attention_mask is not None and attention_mask.dim() == 2
        if position_ids is not None:
            pos = position_ids.expand(b, s)
        elif has_mask:
            pos = (attention_mask.to(torch.long).cumsum(-1) - 1)[:, -s:]
        else:
            start = cache.next_positions(b, emb.device) if cache is not None else emb.new_zeros(b, dtype=torch.long)
            pos = start.view(b, 1) + torch.arange(s, device=emb.device)
        if has_mask:
            pos = pos.masked_fill(attention_mask[:, -s:] == 0, -1)
        return pos.to(torch.long)

    def _masks(self, positions: torch.Tensor, cache: PLTCache | SequenceCache | None, attention_mask) -> Masks:
        cfg = self.config
        w = cfg.window if (cfg.plt_num_loops > 1 and not cfg.is_vanilla) else None
        fresh = cache is None or cache.get_seq_length() == 0
        padded = bool((positions < 0).any())
        if fresh and not padded:  # the common training case: keys are the queries
            # flex block masks, unless a probe needs the dense masks to compute attention probabilities
            if (cfg._attn_implementation or "sdpa") == "flex_attention" and self.loop_probe is None:
                return Masks(*block_masks(positions.shape[1], w, positions.device))
            window = None if w is None else position_mask(positions[:1], positions[:1], w)
            return Masks(None, window)
        kpos_global = positions if fresh else torch.cat([cache.global_positions, positions], 1)
        causal = position_mask(positions, kpos_global)
        window = None
        if w is not None:
            kpos_local = positions if fresh else torch.cat([cache.window_positions, positions], 1)
            window = position_mask(positions, kpos_local, w)
        return Masks(causal, window)

    def prepare_for_inference(self, pack: bool = True) -> None:
        """Fused q/k/v and gate/up matmuls, oneDNN-prepacked weights on CPU (`fastlinear.py`), used
        whenever gradients are off. Call once the model is on its device with its final weights."""
        for layer in self.layers:
            layer.self_attn.prepare_for_inference(pack, layer.input_layernorm.weight)
            layer.mlp.prepare_for_inference(pack)

    @contextmanager
    def probed(self, probe: Any) -> Iterator[Any]:
        """Route per-loop hidden states, attention probabilities and gates to `probe` (diagnostics).
        The probe only reads; the model's outputs do not change."""
        self.loop_probe = probe
        for layer in self.layers:
            layer.self_attn.probe = probe
        try:
            yield probe
        finally:
            self.loop_probe = None
            for layer in self.layers:
                layer.self_attn.probe = None


@dataclass
class PLTCausalLMOutput(CausalLMOutputWithPast):
    loop_hidden_states: tuple[torch.Tensor, ...] | None = None


class PLTForCausalLM(PLTPreTrainedModel, GenerationMixin):
    """`logits = lm_head(N(h(R)))`; loss is next-token cross-entropy on the last loop only."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PLTConfig) -> None:
        super().__init__(config)
        self.model = PLTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: PLTCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_loop_states: bool = False,
        past_key_values: PLTCache | None = None,
        **kwargs: Any,
    ) -> PLTCausalLMOutput:
        cache = cache if cache is not None else past_key_values
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            cache,
            inputs_embeds,
            use_cache,
            output_loop_states=output_loop_states,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.logits(h)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return PLTCausalLMOutput(loss=loss, logits=logits, cache=out.cache, loop_hidden_states=out.loop_hidden_states)

    def decode_step(
        self, tokens: torch.Tensor, cache: DecodeCache, step: DecodeStep, parallel: bool = True
    ) -> torch.Tensor:
        """Next-token logits (n, vocab) of one new token per sequence; see `PLTModel.decode_step`."""
        return self.logits(self.model.decode_step(tokens, cache, step, parallel))

    def prefill_chunk(self, tokens: torch.Tensor, cache: SequenceCache, every_position: bool = False) -> torch.Tensor:
        """Next-token logits (vocab,) after a chunk of one sequence's prompt, `tokens` (S,), that continues the
        positions `cache` holds (`SlotCache.chunk(slot)`: the engine's cache, paged or not; its K/V, rings and
        CLP states are read and written in place). The sequence schedule (`PLTModel.forward`) over S positions:
        any split of a prompt into chunks gives the numbers of one forward over the whole prompt.
        `every_position`: the logits after each of the S tokens, (S, vocab) (a prompt's own log-probabilities)."""
        h = self.model(tokens[None], cache=cache).last_hidden_state
        return self.logits(h[0] if every_position else h[0, -1])

    fast_head: FastLinear | None = None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head(N(h)) of final hidden states h (the last loop's output)."""
        h = self.model.norm(h)
        return self.fast_head(h) if active(self.fast_head) else self.lm_head(h)

    def prepare_for_inference(self, pack: bool = True) -> None:
        """Fused and (on CPU) prepacked matmuls for decoding; see `fastlinear.py`."""
        if self.fast_head is None or (self.fast_head.packed is not None) != (pack and can_pack(self.lm_head.weight)):
            self.model.prepare_for_inference(pack)
            self.fast_head = FastLinear([self.lm_head], pack)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """`generate` gets a PLT cache (transformers would otherwise make a DynamicCache)."""
        if (
            model_kwargs.get("cache") is None
            and model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
        ):
            model_kwargs["cache"] = PLTCache(self.config)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, but strict: a missing, unexpected or mis-shaped tensor is an
        error that names it, instead of a warning and silently random weights."""
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("ignore_mismatched_sizes", True)  # collected in `info`, then refused by name below
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        check_loading_info(info, args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return (model, info) if want_info else model


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t+1]; -100 is ignored. Computed in fp32."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction=reduction)


class IQuestPLTCoderForCausalLM(PLTForCausalLM):
    """The released architecture name, so `architectures: ["IQuestPLTCoderForCausalLM"]` resolves too."""
