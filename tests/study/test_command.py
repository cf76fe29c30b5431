"""`loopcoder study` / `loopcoder demo` options applied to a preset, without running the study."""

from __future__ import annotations

import torch

from loopcoder.commands.study import apply_study_threads
from loopcoder.study import get_preset


def test_threads_reach_the_code_models_training_and_this_process():
    preset, untouched = get_preset("smoke"), get_preset("smoke")
    saved = torch.get_num_threads()
    try:
        apply_study_threads(preset, 2)
        assert torch.get_num_threads() == 2
        apply_study_threads(untouched, None)
    finally:
        torch.set_num_threads(saved)
    assert preset.pretrain.train.threads == preset.sft.train.threads == 2
    assert preset.pretrain.validate() is preset.pretrain  # still a valid TrainConfig
    assert untouched.pretrain.train.threads == untouched.sft.train.threads == 1  # without --threads: the preset's
