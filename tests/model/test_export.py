"""Remote-code export: generated from the package's modules, loadable by plain transformers without loopcoder.

The load runs in a subprocess whose import system refuses `loopcoder` (a meta-path blocker installed
before anything else), in isolated mode from a directory outside the repository; it reports what it
imported, and the test checks that no loopcoder module was among them and that the classes came from
transformers' dynamic-module cache.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers.dynamic_module_utils import get_imports

from loopcoder.data import tokenizer as T
from loopcoder.model.checkpoint import load_model, save_model
from loopcoder.model.export import AUTO_MAP, ExportError, collect, export, remote_code_files
from support.models import released_style_dir, tiny_model

LOADER = textwrap.dedent("""
    import importlib.abc, importlib.util, json, sys

    findable_before = importlib.util.find_spec("loopcoder") is not None  # the editable install is on the path


    class NoLoopcoder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "loopcoder" or name.startswith("loopcoder."):
                raise ModuleNotFoundError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, NoLoopcoder())
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir, ids = sys.argv[1], json.loads(sys.argv[2])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float64).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0]
        generated = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids):]
    try:
        import loopcoder  # noqa: F401
        importable = True
    except ModuleNotFoundError:
        importable = False
    print(json.dumps({
        "logits": logits.tolist(), "generated": generated.tolist(),
        "model_module": type(model).__module__, "config_module": type(model.config).__module__,
        "model_type": model.config.model_type, "loopcoder_importable": importable, "findable_before": findable_before,
        "loopcoder_modules": sorted(m for m in sys.modules if m == "loopcoder" or m.startswith("loopcoder.")),
    }))
""")


def load_without_loopcoder(model_dir, ids, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf-modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    proc = subprocess.run(
        [sys.executable, "-I", str(script), str(model_dir), json.dumps(ids)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_loaded_standalone(out: dict, model_dir, ids) -> None:
    # the package is installed where the subprocess runs (so the blocker is what keeps it out), and was never imported
    assert out["findable_before"] is True
    assert out["loopcoder_modules"] == [] and out["loopcoder_importable"] is False
    module = out["model_module"]
    assert module.startswith("transformers_modules.") and module.endswith("modeling_loopcoder")
    assert out["config_module"].endswith("configuration_loopcoder") and out["model_type"] == "iquestpltcoder"
    package = load_model(model_dir, dtype=torch.float64)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(
            torch.tensor(out["logits"], dtype=torch.float64), package(x).logits[0], rtol=1e-12, atol=1e-12
        )
        expected = package.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids) :]
    assert out["generated"] == expected.tolist()


def test_generated_files_are_the_package_modules_with_relative_imports():
    files = remote_code_files()
    names = {m.name for m in collect()}
    assert {"loopcoder.model.config", "loopcoder.model.modeling", "loopcoder.model.cache"} <= names
    assert {"configuration_loopcoder.py", "modeling_loopcoder.py", "loopcoder_model_cache.py"} <= set(files)
    for name, text in files.items():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("loopcoder"), f"{name}: {ast.unparse(node)}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("loopcoder") for a in node.names), f"{name}: {ast.unparse(node)}"
    # every module of the closure is exported and nothing else
    assert len(files) == len(names)


def test_what_transformers_will_require_is_only_torch_and_transformers(tmp_path):
    for name, text in remote_code_files().items():
        (tmp_path / name).write_text(text)
        required = set(get_imports(tmp_path / name)) - set(sys.stdlib_module_names) - {"__future__"}
        assert required <= {"torch", "transformers", "safetensors"}, (name, required)


def test_an_import_outside_the_allowed_set_fails_naming_module_and_line(tmp_path):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text("import torch\nfrom fakepkg.helpers import f\n")
    (pkg / "helpers.py").write_text("import json\n\n\ndef f():\n    import numpy\n    return numpy\n")
    with pytest.raises(ExportError, match=r"helpers.py:5 imports 'numpy'"):
        collect(("fakepkg.model",), package="fakepkg", package_dir=pkg)
    (pkg / "helpers.py").write_text("def f():\n    from fakepkg import g\n")
    with pytest.raises(ExportError, match="package root"):
        collect(("fakepkg.model",), package="fakepkg", package_dir=pkg)
    (pkg / "helpers.py").write_text("def f():\n    from . import other\n    from .other import g\n")
    (pkg / "other.py").write_text("import os\n\n\ndef g():\n    return os\n")
    assert [m.file for m in collect(("fakepkg.model",), package="fakepkg", package_dir=pkg)] == [
        "fakepkg_model",
        "fakepkg_helpers",
        "fakepkg_other",
    ]


@pytest.mark.slow
def test_exported_model_loads_and_generates_without_loopcoder(tmp_path):
    model = tiny_model(dtype=torch.float32, plt_num_loops=3)
    save_model(model, tmp_path / "model")
    out = export(tmp_path / "model", tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and "auto_map" not in json.loads((tmp_path / "model/config.json").read_text())
    ids = [3, 17, 5, 40, 22, 9, 31]
    check_loaded_standalone(load_without_loopcoder(out, ids, tmp_path), out, ids)


@pytest.mark.slow
def test_released_layout_with_only_weights_and_config_gets_a_standalone_path(tmp_path):
    released = tmp_path / "LoopCoder-V2"
    released.mkdir()
    released_style_dir(released)
    assert sorted(p.name for p in released.iterdir()) == ["config.json", "model.safetensors"]
    before = json.loads((released / "config.json").read_text())
    export(released, in_place=True)
    after = json.loads((released / "config.json").read_text())
    assert after.pop("auto_map") == AUTO_MAP and after == before  # the released fields are kept as they were
    ids = [1, 8, 60, 13, 2, 44]
    check_loaded_standalone(load_without_loopcoder(released, ids, tmp_path), released, ids)
    # exporting again replaces the generated files and nothing else
    export(released, in_place=True)
    assert sorted(p.name for p in released.glob("*.py")) == sorted(remote_code_files())


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"no \*\.safetensors"):
        export(tmp_path / "empty", tmp_path / "out")
    released_style_dir(tmp_path / "empty")
    with pytest.raises(ExportError, match="in_place"):
        export(tmp_path / "empty", tmp_path / "empty")
    cfg = json.loads((tmp_path / "empty/config.json").read_text())
    (tmp_path / "empty/config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ExportError, match="model_type 'llama'"):
        export(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_docs_snippet_runs_without_a_prompt_or_a_warning(tmp_path):
    """docs/export.md's Python block, as written, in a fresh interpreter without loopcoder and with stdin
    closed: the tokenizer load must neither ask `[y/N]` nor warn about "a model of type ``"."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "export.md").read_text()
    snippet = page.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'AutoTokenizer.from_pretrained("exported", trust_remote_code=True)' in snippet
    save_model(tiny_model(dtype=torch.float32, vocab_size=300), tmp_path / "model")
    T.save_tokenizer(T.train_tokenizer(["def fib(n):\n    return n\n"] * 20, 300), tmp_path / "model")
    export(tmp_path / "model", tmp_path / "exported")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf-modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = tmp_path / "snippet.py"
    script.write_text("import sys\nsys.modules['loopcoder'] = None  # not installed, as far as this knows\n" + snippet)
    proc = subprocess.run(
        [sys.executable, "-I", str(script)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[y/N]" not in proc.stdout + proc.stderr and "to instantiate a model of type" not in proc.stderr, proc.stderr
