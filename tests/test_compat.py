"""The module paths loopcoder had before its folders (`loopcoder.engine`, `loopcoder.cache`, ...) still import,
to the new modules, with a DeprecationWarning; `import loopcoder` stays light."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types
import warnings

import pytest

from loopcoder import _compat


@pytest.mark.parametrize("old", sorted(_compat.MOVED))
def test_every_old_path_imports_the_names_of_its_new_modules(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)
    seen: set[str] = set()
    for new in _compat.MOVED[old]:  # searched in order: a name of the first module that has it
        target = importlib.import_module(new)
        public = {n for n, v in vars(target).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
        assert public - seen, new
        for name in public - seen:
            assert getattr(module, name) is getattr(target, name), f"{old}.{name}"
        seen |= public
    with pytest.raises(AttributeError):
        module.NoSuchName  # noqa: B018


def test_old_names_of_the_model_module_come_from_the_modeling_module():
    from loopcoder.model import modeling

    with pytest.warns(DeprecationWarning, match="loopcoder.model.PLTForCausalLM"):
        from loopcoder.model import PLTForCausalLM
    assert PLTForCausalLM is modeling.PLTForCausalLM
    with pytest.raises(ImportError):
        from loopcoder.model import NoSuchName  # noqa: F401


def test_old_paths_resolve_in_a_fresh_interpreter_without_importing_torch_early():
    code = """
import sys, warnings
warnings.simplefilter("error", DeprecationWarning)
import loopcoder
assert "torch" not in sys.modules, "import loopcoder imported torch"
try:
    import loopcoder.errors
except DeprecationWarning as e:
    print(e)
warnings.simplefilter("ignore", DeprecationWarning)
from loopcoder.errors import LoopcoderError
from loopcoder.utils.errors import LoopcoderError as New
assert LoopcoderError is New and "torch" not in sys.modules
from loopcoder.engine import Engine
from loopcoder.inference.engine import Engine as NewEngine
assert Engine is NewEngine
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "loopcoder.errors is deprecated: import loopcoder.utils.errors"
