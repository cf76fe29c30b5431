"""Processes and devices: torchrun's environment, FSDP2 / DDP wrapping, full state dicts, reductions.

One process is the degenerate case of everything here (no process group, no wrapper, reductions are
identities), so the trainer has one code path.

FSDP2: `fully_shard` on every decoder layer, then on the root (embeddings, final norm, lm_head).
A looped layer runs R times per step; with `reshard_after_forward=True` (our default) FSDP gathers
its weights at every use: 2R all-gathers per layer per step (R forward + R backward) instead of 2,
so communication grows with R exactly like compute does. `False` keeps every layer's gathered
weights from its first forward use to its first backward use: R all-gathers per layer per step, at
the cost of holding the whole unsharded model during the forward. docs/training.md has the numbers.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from loopcoder.errors import LoopcoderError
from loopcoder.training.config import TrainConfig

# FSDP2 warns that a layer returns a view (its K/V, after a transpose); the model never writes into it.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(cfg: TrainConfig) -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, pick the device, join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LoopcoderError(f"train.device={cfg.train.device}: CUDA is not available on this machine")
        device = torch.device(want if ":" in want else f"cuda:{local}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = cfg.distributed.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
        owns = True
    return DistEnv(rank, world, local, device, owns)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def strategy(cfg: TrainConfig, env: DistEnv) -> str:
    """none (one process), fsdp or ddp."""
    if not env.distributed:
        return "none"
    return "fsdp" if cfg.distributed.strategy == "auto" else cfg.distributed.strategy


def wrap(model: nn.Module, cfg: TrainConfig, env: DistEnv, bf16: bool) -> nn.Module:
    """The model to call in training: FSDP2-sharded (in place), DDP-wrapped, or as it is."""
    how = strategy(cfg, env)
    if how == "fsdp":
        # bf16 weights in compute and all-gathers, fp32 master weights and gradient reduction.
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        for layer in model.model.layers:
            fully_shard(layer, reshard_after_forward=cfg.distributed.reshard_after_forward, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if how == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


# ----------------------------------------------------------------------------- state dicts
def full_model_state(module: nn.Module, env: DistEnv, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Consolidated weights on CPU (on rank 0; other ranks may get an empty dict). Collective.
    `trainable_only`: only the parameters that train (a LoRA run's adapter), not the frozen base."""
    if not env.distributed:
        state = (
            {k: v for k, v in module.named_parameters() if v.requires_grad} if trainable_only else module.state_dict()
        )
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(module, options=options)


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, unsharded, on CPU: loads at any world size. Collective."""
    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], env: DistEnv
) -> None:
    """Load a name-keyed full optimizer state (each rank keeps its shard under FSDP)."""
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=env.distributed))


# ----------------------------------------------------------------------------- collectives
def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
