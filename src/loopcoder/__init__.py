"""loopcoder: Parallel Loop Transformer (LoopCoder-v2) code models.

Importing the package registers the model with transformers' Auto classes, for our model type and
the released one ("iquestpltcoder"), so `AutoModelForCausalLM.from_pretrained(dir)` loads a
LoopCoder-V2 directory as it is.

The package itself imports neither torch nor transformers (about 3 s), so that `loopcoder --help`,
`loopcoder CMD --help` and `--version` answer at once. The registration is therefore made when it can
matter: at once if transformers is already imported, else as soon as transformers is (the first import
of `transformers` runs `register_auto_classes` after it, or after the loopcoder module that imported it,
whichever finishes last). `PLTConfig`, `PLTForCausalLM`, ... are imported on first use.
"""

from __future__ import annotations

import importlib
import sys
import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from loopcoder import _compat

try:
    __version__ = version("loopcoder")
except PackageNotFoundError:  # the source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"

_EXPORTS = {
    "ConfigError": "loopcoder.utils.errors",
    "PLTCache": "loopcoder.model.cache",
    "PLTConfig": "loopcoder.model.config",
    "PLTForCausalLM": "loopcoder.model.modeling",
    "IQuestPLTCoderForCausalLM": "loopcoder.model.modeling",
    "PLTModel": "loopcoder.model.modeling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loopcoder' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def register_auto_classes() -> None:
    """Register `PLTConfig` and `PLTForCausalLM` with transformers' `AutoConfig` and
    `AutoModelForCausalLM` (idempotent). Imports torch and transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loopcoder.model.config import MODEL_TYPE, PLTConfig
    from loopcoder.model.modeling import PLTForCausalLM

    AutoConfig.register(MODEL_TYPE, PLTConfig, exist_ok=True)
    AutoModelForCausalLM.register(PLTConfig, PLTForCausalLM, exist_ok=True)
    _hook.done = True


class _RegisterWhenTransformersLoads:
    """A meta-path finder that wraps the loaders of `transformers` and of loopcoder's modules: when one
    of them has finished executing, transformers is imported and no loopcoder module is half-way
    through its own import (so that `loopcoder.model.modeling` can be imported), it registers the Auto classes.
    It finds nothing itself: it asks the finders after it, as the import system would."""

    def __init__(self) -> None:
        self.done = False
        self.local = threading.local()  # per thread: how many wrapped modules are executing

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if self.done or not (name == "transformers" or name.startswith("loopcoder.")):
            return None
        finders = sys.meta_path[sys.meta_path.index(self) + 1 :] if self in sys.meta_path else []
        for finder in finders:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, self)
                return spec
        return None

    def finished(self) -> None:
        if not self.done and not getattr(self.local, "depth", 0) and "transformers" in sys.modules:
            self.done = True
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register_auto_classes()


class _Loader:
    """Runs the real loader, then lets the finder register; the module keeps the real loader."""

    def __init__(self, loader: Any, hook: _RegisterWhenTransformersLoads) -> None:
        self.loader, self.hook = loader, hook

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        local = self.hook.local
        local.depth = getattr(local, "depth", 0) + 1
        try:
            self.loader.exec_module(module)
        finally:
            local.depth -= 1
        self.hook.finished()


_hook = _RegisterWhenTransformersLoads()
if "transformers" in sys.modules:  # the user imported it first: register now
    register_auto_classes()
else:
    sys.meta_path.insert(0, _hook)
_compat.install()  # before the hook: the old module paths (`loopcoder.engine`, ...), see _compat.py
