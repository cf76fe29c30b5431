"""Processes and devices: torchrun's environment, FSDP2 / DDP wrapping, full state dicts, reductions.

One process is the degenerate case of everything here (no process group, no wrapper, reductions are
identities), so the trainer has one code path.

FSDP2: `fully_shard` on every decoder layer, then on the root (embeddings, final norm, lm_head).
A looped layer runs R times per step; with `reshard_after_forward=True` (our default) FSDP gathers
its weights at every use: 2R all-gathers per layer per step (R forward + R backward) instead of 2,
so communication grows with R exactly like compute does. `False` keeps every layer's gathered
weights from its first forward use to its first backward use: R all-gathers per layer per step, at
the cost of holding the whole unsharded model during the forward. docs/training.md has the numbers.

No rank outlives its run. torchrun starts every rank in a session of its own, so a launcher killed
with SIGKILL (an out-of-memory kill, a job scheduler, a test's timeout) cannot pass the signal on, and
its ranks used to train on, or block forever in a collective, as orphans. Each rank of a multi-process
run therefore asks the kernel for SIGKILL when its parent dies (`prctl(PR_SET_PDEATHSIG)`, Linux) and
watches its parent's pid from a daemon thread (other systems, and the moment before prctl took
effect). A dead peer is the process group's business: gloo and NCCL (with async error handling, turned
on here) fail the pending collective, at the latest after `distributed.timeout_s`, the rank raises, and
torchrun stops the others.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
import threading
import time
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

from loopcoder.training.config import TrainConfig
from loopcoder.utils.errors import LoopcoderError

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
        die_with_parent()
        backend = cfg.distributed.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        # NCCL honours the timeout only with async error handling (a hung collective then aborts the rank)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
        owns = True
    return DistEnv(rank, world, local, device, owns)


PR_SET_PDEATHSIG = 1  # linux/prctl.h
_watching: list[int] = []  # the parent pid a watchdog thread already watches (one per process)


def die_with_parent(poll_s: float = 1.0) -> None:
    """Make this process die (SIGKILL) when its parent does: the launcher of a multi-process run. Its
    checkpoints are written atomically, so an abrupt end loses only the steps since the last one."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl here: the watchdog below still works
            pass
    if os.getppid() != parent:  # the parent died between the two reads, before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
    if _watching:
        return
    _watching.append(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="loopcoder-parent-watchdog", daemon=True).start()


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
