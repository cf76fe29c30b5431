"""The module paths loopcoder had before its modules moved into `utils/`, `model/` and `inference/`.

`import loopcoder.engine` (or `from loopcoder.errors import LoopcoderError`) still works: a meta-path finder
answers each old path with the module that replaced it, and warns (`DeprecationWarning`) once per path.
Where one old module became two (`loopcoder.cache`, `loopcoder.runtime`), the old path is a small module
that looks names up in the new ones, in order. `loopcoder.model` is now the model's package; its
`__getattr__` hands out the old module's names (`PLTForCausalLM`, ...) from `loopcoder.model.modeling`
through `moved_attribute` below. Standard library only: `import loopcoder` stays light.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

# old module -> the module(s) that hold its names now, searched in order
MOVED: dict[str, tuple[str, ...]] = {
    "loopcoder.errors": ("loopcoder.utils.errors",),
    "loopcoder.atomic": ("loopcoder.utils.atomic",),
    "loopcoder.stats": ("loopcoder.utils.stats",),
    "loopcoder.progress": ("loopcoder.utils.progress",),
    "loopcoder.defaults": ("loopcoder.utils.defaults",),
    "loopcoder.runtime": ("loopcoder.utils.runtime", "loopcoder.model.loading"),
    "loopcoder.config": ("loopcoder.model.config",),
    "loopcoder.shape": ("loopcoder.model.shape",),
    "loopcoder.cache": ("loopcoder.model.cache", "loopcoder.inference.kv.store"),
    "loopcoder.fastlinear": ("loopcoder.model.fastlinear",),
    "loopcoder.flex": ("loopcoder.model.flex",),
    "loopcoder.checkpoint": ("loopcoder.model.checkpoint",),
    "loopcoder.export": ("loopcoder.model.export",),
    "loopcoder.identity": ("loopcoder.model.identity",),
    "loopcoder.lora": ("loopcoder.model.lora",),
    "loopcoder.engine": ("loopcoder.inference.engine",),
    "loopcoder.sampling": ("loopcoder.inference.sampling",),
    "loopcoder.constraints": ("loopcoder.inference.constraints",),
    "loopcoder.textstream": ("loopcoder.inference.textstream",),
    "loopcoder.blocks": ("loopcoder.inference.kv.block_pool",),
    "loopcoder.paged": ("loopcoder.inference.kv.paged",),
}
PACKAGE_MOVED = {"loopcoder.model": "loopcoder.model.modeling"}  # packages that replaced a module of their name


def _warn(old: str, new: str, skip: int = 0) -> None:
    level, frame = 1 + skip, sys._getframe(1 + skip)
    while frame is not None and (
        frame.f_code.co_filename.startswith("<frozen importlib") or frame.f_code.co_filename == __file__
    ):
        level, frame = level + 1, frame.f_back
    warnings.warn(f"{old} is deprecated: import {new}", DeprecationWarning, stacklevel=level)


def _alias(old: str) -> types.ModuleType:
    """The module an old path stands for: the new module itself, or one that searches several."""
    new = MOVED[old]
    _warn(old, " or ".join(new))
    if len(new) == 1:
        return importlib.import_module(new[0])
    modules = [importlib.import_module(name) for name in new]
    alias = types.ModuleType(old, f"Deprecated: the names of {', '.join(new)}.")

    def __getattr__(name: str) -> Any:
        for module in modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    alias.__getattr__ = __getattr__  # type: ignore[method-assign]
    return alias


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _alias(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # the module is already the new one (or the searching one)


class OldPathFinder(importlib.abc.MetaPathFinder):
    """Finds the old module paths (`MOVED`) and nothing else."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(name, _AliasLoader())


def moved_attribute(package: str, name: str) -> Any:
    """A name of the module `package` replaced (`from loopcoder.model import PLTForCausalLM`), with a warning."""
    module = PACKAGE_MOVED[package]
    if name.startswith("__"):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name, _MISSING)
    if value is _MISSING:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    _warn(f"{package}.{name}", f"{module}.{name}", skip=1)  # warn at the caller of the package's __getattr__
    return value


_MISSING = object()


def install() -> None:
    """Put the finder first on `sys.meta_path` (idempotent)."""
    if not any(isinstance(f, OldPathFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, OldPathFinder())
