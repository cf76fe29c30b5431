"""Test-wide set-up: two torch threads at most (the machine is shared), and the model fixture."""

from __future__ import annotations

import pytest
import torch

from support.models import tiny_model

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def make_model():
    return tiny_model
