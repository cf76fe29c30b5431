"""`import loopcoder` registers the model with transformers' Auto classes, whatever the order of imports,
although the package itself imports neither torch nor transformers (so that `loopcoder --help` is fast).
Each case runs in a fresh interpreter: the import order is the point."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHECK = """
import sys
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.for_model(
    "iquestpltcoder", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
model = AutoModelForCausalLM.from_config(config)
import loopcoder
assert type(config) is loopcoder.PLTConfig and type(model) is loopcoder.PLTForCausalLM, (type(config), type(model))
print("registered")
"""


@pytest.mark.parametrize(
    "first",
    [
        "import loopcoder",  # the README's order: the package, then transformers
        "import transformers\nimport loopcoder",  # transformers first: registered at once
        "from transformers import AutoModelForCausalLM\nimport loopcoder",
        "from loopcoder.model.config import PLTConfig",  # a submodule that imports transformers half-way through itself
        "from loopcoder.model.modeling import PLTForCausalLM",
        "from loopcoder.model.cache import PLTCache",
        "from loopcoder.model.loading import load_tokenizer",
        "import loopcoder.cli\nimport transformers",  # the CLI's parsers, then a library that imports transformers
    ],
)
def test_the_auto_classes_know_the_model_whatever_was_imported_first(first):
    code = textwrap.dedent(first) + "\n" + CHECK
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("registered"), r.stderr[-3000:]


def test_the_package_imports_neither_torch_nor_transformers_and_exports_lazily():
    code = """
import sys
import loopcoder
assert "torch" not in sys.modules and "transformers" not in sys.modules, "imported too much"
assert sorted(loopcoder.__all__) == sorted(
    ["ConfigError", "IQuestPLTCoderForCausalLM", "PLTCache", "PLTConfig", "PLTForCausalLM", "PLTModel"])
assert "PLTForCausalLM" in dir(loopcoder)
from loopcoder import PLTForCausalLM  # now torch
assert "torch" in sys.modules and PLTForCausalLM.__module__ == "loopcoder.model.modeling"
try:
    loopcoder.NoSuchThing
except AttributeError as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no attribute 'NoSuchThing'" in r.stdout
