"""Running a command or a job: where and in what precision (the same code on CPU in fp32 and on GPU in
bf16), how many threads, quiet third-party output. Loading a model for inference is `model.loading`'s."""

from __future__ import annotations

import os

import torch
from transformers.utils import logging as hf_logging

from loopcoder.utils.errors import LoopcoderError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoopcoderError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise LoopcoderError(f"--device {name!r} is not a device ({e})") from None


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp32 on CPU (fast and exact there) and bf16 on GPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise LoopcoderError(f"--dtype {name!r}: choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def free_cpus() -> int:
    """CPUs this process may use that the 1-minute load average does not show as busy (at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:  # no load average on this platform: assume an idle machine
        busy = 0.0
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def apply_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads and return the number: `threads`, else $OMP_NUM_THREADS if set, else
    `free_cpus()`. torch's own default (every core) collapses when other processes share the cores:
    its worker threads spin-wait for one another, and one of them is always waiting for a CPU."""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else free_cpus()
    if threads < 1:
        raise LoopcoderError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def quiet_libraries() -> None:
    """Our commands report their own progress; transformers' per-load bars and reports are noise here."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
