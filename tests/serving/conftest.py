"""The serving tests' shared fixtures: a tiny model directory per module, and that model loaded (for scripted
servers). A module that needs another context defines its own `model_dir`."""

from __future__ import annotations

import pytest

from loopcoder.model.loading import load_for_inference
from support.serving import build_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    """(model, tokenizer) of `model_dir`."""
    return load_for_inference(str(model_dir))
