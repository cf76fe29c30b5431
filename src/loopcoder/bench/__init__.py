"""Benchmarks (`loopcoder bench decode|train|serve`) and what they share: timing, the machine, the report."""

from __future__ import annotations

import json
import platform
import time
from typing import Any

import torch


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
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device), "date": now()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = cpu_name()
    return info


def write_json(report: dict[str, Any], path: str) -> None:
    from loopcoder.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(report, indent=2))
