"""Sizes, FLOPs and memory of training a PLT model: what `loopcoder plan` prints and MFU uses.

FLOPs per trained token (forward + backward = 3 x forward, each multiply-add 2 FLOPs):

    6 * (R * P_layers + (R - 1) * P_gate_matmul + P_lm_head)      the matmuls
  + 12 * L * H * head_dim * (T + (R - 1) * (T + min(w + 1, T)))    attention scores and values (PLT)
  + 12 * L * H * head_dim * R * T                                   (vanilla looped transformer)

P_layers: the decoder layers' matmul weights (q, k, v, o, gate/up/down), applied once per loop;
P_gate_matmul: G-SWA's gate projection, used by loops >= 2 only; P_lm_head: once per token; the
embedding lookup costs no FLOPs. Attention follows PaLM's convention (the full T x T product, what
MFU figures usually quote): loop 1 attends over T keys; a PLT loop >= 2 over T (global branch, loop
1's K/V) plus w + 1 (local window). This is about R times the R = 1 model, as the paper says.

Memory (bytes) is an estimate for planning, see `activation_bytes_per_token`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from loopcoder.model.config import PLTConfig

# Dense bf16 tensor-core peaks (FLOP/s) by device name fragment, from the vendors' data sheets.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
}


def peak_flops(device_name: str) -> float | None:
    """Known dense bf16 peak of a GPU from its name (`torch.cuda.get_device_name`), else None."""
    for key, value in GPU_PEAK_BF16.items():  # ordered: specific names before their prefixes
        if key in device_name:
            return value
    return None


@dataclass
class ParamCounts:
    embedding: int  # embed_tokens
    lm_head: int  # 0 when tied
    per_layer: int  # everything in one decoder layer (norms, gate included)
    layers: int  # per_layer * L
    layer_matmul: int  # q, k, v, o, mlp weights of all layers (run every loop)
    gate_matmul: int  # G-SWA gate projections of all layers (loops >= 2 only)
    final_norm: int
    total: int
    non_embedding: int  # total - embedding - lm_head

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def param_counts(cfg: PLTConfig) -> ParamCounts:
    d, L, V, m = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = d * hd * (hq + 2 * hkv) + hq * hd * d + (hd * (hq + 2 * hkv) + d if cfg.attention_bias else 0)
    mlp = 3 * d * m + (2 * m + d if cfg.mlp_bias else 0)
    gate_in = d if cfg.plt_gate_use_hidden_states else hd
    has_gate = cfg.plt_num_loops > 1 and not cfg.is_vanilla
    gate = (hq * gate_in + hq + (d if cfg.plt_gate_use_hidden_states else 0)) if has_gate else 0
    per_layer = attn + mlp + 2 * d + gate
    emb = V * d
    head = 0 if cfg.tie_word_embeddings else V * d
    total = emb + head + L * per_layer + d
    return ParamCounts(
        emb,
        head,
        per_layer,
        L * per_layer,
        L * (d * hd * (2 * hq + 2 * hkv) + 3 * d * m),
        L * hq * gate_in if has_gate else 0,
        d,
        total,
        total - emb - head,
    )


def attention_keys_per_token(cfg: PLTConfig, seq_len: int) -> int:
    """Keys each query attends to, summed over loops (the attention FLOPs' context term)."""
    # the cached K/V positions, plus the global branch of each PLT loop >= 2 (loop 1's T keys again)
    return cfg.kv_cache_entries(seq_len) + (0 if cfg.is_vanilla else (cfg.plt_num_loops - 1) * seq_len)


def train_flops_per_token(cfg: PLTConfig, seq_len: int) -> dict[str, float]:
    p = param_counts(cfg)
    R, V, d = cfg.plt_num_loops, cfg.vocab_size, cfg.hidden_size
    matmul = 6 * (R * p.layer_matmul + (R - 1) * p.gate_matmul + V * d)
    attention = (
        12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * attention_keys_per_token(cfg, seq_len)
    )
    return {"matmul": float(matmul), "attention": float(attention), "total": float(matmul + attention)}


def activation_bytes_per_token(cfg: PLTConfig, checkpointing: bool, dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes of activations kept for the backward pass, per token of a micro-batch (an estimate).

    Per layer and loop, without checkpointing, what autograd saves in this implementation: the layer
    input and two norm outputs (3d, plus the fp32 copies the norms save, 2 x 4d), q, k, v and the
    attention output (2 H hd + 2 kv hd), the attention's fp32 log-sum-exp (4 H), the residual (d),
    and the SwiGLU's gate, up, silu(gate) and product (4m). A PLT loop >= 2 adds its second branch
    (q is shared: H hd output, 4 H log-sum-exp), the gate's norm (d + 4d) and g and the mixed output
    (H + H hd). With per-layer checkpointing only each layer's input (d) and loop 1's K/V (kept for
    the global branch of later loops, 2 kv hd) stay, plus one layer's full set during its recompute.
    The loss keeps the logits (V, plus V in fp32 for the log-softmax). Memory for attention scores is
    not counted: SDPA's fused kernels do not store them.
    """
    d, m, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hkv, hd, L, R = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.num_hidden_layers,
        cfg.plt_num_loops,
    )
    b = dtype_bytes
    loop1 = b * (3 * d + 2 * hq * hd + 2 * hkv * hd + d + 4 * m) + 4 * 2 * d + 4 * hq
    extra = b * (hq * hd + d + hq + hq * hd) + 4 * d + 4 * hq if (R > 1 and not cfg.is_vanilla) else 0
    per_layer_all_loops = loop1 + (R - 1) * (loop1 + extra)
    logits = b * V + 4 * V
    if checkpointing:
        kept = L * (R * b * d + b * 2 * hkv * hd)
        layers = kept + loop1 + extra
    else:
        layers = L * per_layer_all_loops
    return {"layers": float(layers), "logits": float(logits), "total": float(layers + logits)}


def plan(
    cfg: PLTConfig,
    seq_len: int,
    memory_bytes: float,
    gpus: int = 1,
    checkpointing: bool = True,
    reshard_after_forward: bool = True,
    overhead_bytes: float = 2 * 2**30,
) -> dict[str, Any]:
    """Parameters, FLOPs per token, memory and the largest micro-batch per GPU that fits `memory_bytes`.

    Model states: fp32 weights, fp32 gradients and Adam's two fp32 moments, 16 bytes per parameter,
    sharded over `gpus` by FSDP. Gathered weights (bf16): two layers in flight with
    `reshard_after_forward=True`; every layer with False. `overhead_bytes` covers the CUDA context,
    kernels' workspaces and fragmentation.
    """
    p = param_counts(cfg)
    states = 16 * p.total / gpus
    gathered = 0.0
    if gpus > 1:
        gathered = 2 * (
            p.per_layer * (2 if reshard_after_forward else cfg.num_hidden_layers)
            + p.embedding
            + p.lm_head
            + p.final_norm
        )
    act = {ck: activation_bytes_per_token(cfg, ck) for ck in (False, True)}
    chosen = act[checkpointing]["total"]
    free = memory_bytes - states - gathered - overhead_bytes
    max_tokens = max(0.0, free) / chosen
    micro = int(max_tokens // seq_len)
    flops = train_flops_per_token(cfg, seq_len)
    ag_per_layer = 2 * cfg.plt_num_loops if reshard_after_forward else cfg.plt_num_loops
    return {
        "params": p.to_dict(),
        "flops_per_token": flops,
        "flops_per_token_r1": train_flops_per_token(_with_loops(cfg, 1), seq_len)["total"],
        "seq_len": seq_len,
        "gpus": gpus,
        "memory_bytes": memory_bytes,
        "model_state_bytes_per_gpu": states,
        "gathered_weight_bytes": gathered,
        "overhead_bytes": overhead_bytes,
        "activation_bytes_per_token": {"no_checkpointing": act[False], "checkpointing": act[True]},
        "activation_checkpointing": checkpointing,
        "max_micro_batch": micro,
        "max_tokens_per_gpu": int(max_tokens),
        "fsdp_all_gathers_per_layer_per_step": ag_per_layer if gpus > 1 else 0,
        "fsdp_all_gather_bytes_per_step": (2 * p.layers * ag_per_layer * (gpus - 1) / gpus) if gpus > 1 else 0,
        "kv_cache_bytes": {
            "plt": cfg.kv_cache_bytes(seq_len),
            "vanilla": _with_loops(cfg, cfg.plt_num_loops, "vanilla").kv_cache_bytes(seq_len),
            "r1": _with_loops(cfg, 1).kv_cache_bytes(seq_len),
        },
    }


MAX_GPUS_SEARCHED = 4096


def fit(
    cfg: PLTConfig,
    seq_len: int,
    memory_bytes: float,
    gpus: int = 1,
    reshard_after_forward: bool = True,
    checkpointing: bool = False,
    micro_batch: int | None = None,
) -> dict[str, Any]:
    """Whether training fits `gpus` GPUs of `memory_bytes` each, and, in words, what would make it fit: more
    GPUs sharding the model states (FSDP), activation checkpointing, a smaller micro-batch, a shorter sequence.
    `checkpointing`, `micro_batch`: what the config asks for (per GPU). Returns {"fits", "verdict", "advice"}."""

    def largest(g: int, ck: bool, t: int = seq_len) -> int:
        return plan(cfg, t, memory_bytes, g, ck, reshard_after_forward)["max_micro_batch"]

    def fits_at(t: int) -> bool:
        return largest(gpus, True, t) >= 1

    here = f"{gpus} GPU{'s' if gpus > 1 else ''} of {memory_bytes / 2**30:,.1f} GiB"
    p = plan(cfg, seq_len, memory_bytes, gpus, True, reshard_after_forward)
    with_ck, without = p["max_micro_batch"], largest(gpus, False)
    advice: list[str] = []
    if with_ck == 0:
        states, overhead = p["model_state_bytes_per_gpu"] + p["gathered_weight_bytes"], p["overhead_bytes"]
        sequence = p["activation_bytes_per_token"]["checkpointing"]["total"] * seq_len
        left = memory_bytes - states - overhead
        why = (
            f"the model states take {states / 2**30:,.1f} GiB per GPU and the runtime {overhead / 2**30:,.1f} GiB"
            if left <= 0
            else f"one sequence of {seq_len} tokens needs {sequence / 2**30:,.2f} GiB of activations with "
            f"checkpointing, and {left / 2**30:,.2f} GiB are left after the model states"
        )
        verdict = f"does not fit on {here}: {why}"
        enough = _fewest_gpus(lambda g: largest(g, True) >= 1, gpus + 1)
        if enough is not None:
            advice.append(
                f"with FSDP over {enough} such GPUs (--gpus {enough}) the model states are sharded and "
                f"{largest(enough, True)} sequence(s) of {seq_len} tokens fit per GPU with activation checkpointing "
                f"(train.activation_checkpointing=true), {largest(enough, False)} without"
            )
        shorter = next((t for t in (seq_len // 2, seq_len // 4, seq_len // 8) if t >= 1 and fits_at(t)), None)
        if shorter is not None:
            advice.append(f"or shorter sequences: {shorter} tokens fit here with checkpointing (--seq-len {shorter})")
        if enough is None and shorter is None:
            advice.append(
                "neither more GPUs nor shorter sequences make it fit (the runtime overhead is assumed to be "
                f"{overhead / 2**30:,.1f} GiB per GPU): use GPUs with more memory"
            )
        return {"fits": False, "verdict": verdict, "advice": advice}
    usable = with_ck if checkpointing or without == 0 else without
    if without == 0:
        verdict = (
            f"fits on {here} only with activation checkpointing: up to {with_ck} sequence(s) of {seq_len} "
            "tokens per GPU"
        )
        if not checkpointing:
            advice.append("the config has it off: set train.activation_checkpointing=true")
    else:
        verdict = (
            f"fits on {here}: up to {with_ck} sequence(s) of {seq_len} tokens per GPU with activation "
            f"checkpointing, {without} without"
        )
    if micro_batch is not None and micro_batch > usable:
        advice.append(
            f"the config's micro-batch of {micro_batch} sequence(s) per GPU is too large "
            f"({'with' if checkpointing or without == 0 else 'without'} checkpointing at most {usable}): set "
            f"train.micro_batch_size to at most {usable} (gradient accumulation keeps the global batch)"
        )
    return {"fits": not advice, "verdict": verdict, "advice": advice}


def _fewest_gpus(fits: Any, low: int) -> int | None:
    """The smallest GPU count >= `low` (up to MAX_GPUS_SEARCHED) for which `fits(g)`, a condition that more GPUs
    never break (each holds less of the model states), or None."""
    high = MAX_GPUS_SEARCHED
    if low > high or not fits(high):
        return None
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid + 1, high)
    return low


def _with_loops(cfg: PLTConfig, loops: int, arch: str | None = None) -> PLTConfig:
    d = cfg.to_dict()
    d["plt_num_loops"] = loops
    if arch is not None:
        d["loop_architecture"] = arch
    for k in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
        d.pop(k, None)
    return PLTConfig(**d)


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, devices: int = 1) -> float | None:
    if not peak or not math.isfinite(tokens_per_s):
        return None
    return flops_per_token * tokens_per_s / (peak * devices)
