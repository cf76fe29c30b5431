"""The model and everything about it that needs no request: its config (`config`) and shape (`shape`), the
modeling module (`modeling`: both schedules of the spec), the sequence cache and the protocols through which
the engine's cache is seen (`cache`), fast kernels (`fastlinear`, `flex`), saving and loading (`checkpoint`,
`loading`), the remote-code layout (`export`), a directory's identity (`identity`) and LoRA (`lora`).

Nothing here imports from `loopcoder.inference`: an exported checkpoint ships this package alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loopcoder import _compat


def __getattr__(name: str) -> Any:
    # `from loopcoder.model.modeling import PLTForCausalLM`: this package replaced the module `loopcoder.model.modeling`
    if (Path(__file__).parent / f"{name}.py").is_file():
        raise AttributeError(name)  # a submodule not imported yet: the import system loads it
    return _compat.moved_attribute(__name__, name)
