"""What the benchmarks share: timing, the machine, the report, transformers' Llama at a PLT shape."""

from __future__ import annotations

import json
import platform
import time
from typing import Any

import torch
from transformers import LlamaConfig

from loopcoder.model.config import PLTConfig
from loopcoder.utils.atomic import atomic_write_text


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def now() -> str:
    """The report's date: local time to the minute."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime())


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "date": now(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = cpu_name()
    return info


def write_json(report: dict[str, Any], path: str) -> None:
    atomic_write_text(path, json.dumps(report, indent=2))


def llama_config(cfg: PLTConfig) -> LlamaConfig:
    """transformers' Llama at the shape of `cfg` (what PLT with R = 1 equals), with SDPA attention."""
    llama = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    llama._attn_implementation = "sdpa"
    return llama
