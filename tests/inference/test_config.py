"""`EngineConfig` (the engine's options, validated in one place; keywords still build it), the request states
and the runner the engine is given (it calls the model through `runner.prefill` and `runner.decode` only)."""

from __future__ import annotations

import pytest
import torch

from loopcoder.inference.config import EngineConfig
from loopcoder.inference.engine import Engine
from loopcoder.inference.request import RequestState
from loopcoder.inference.sampling import SamplingParams
from loopcoder.utils.errors import LoopcoderError
from support.models import tiny_model


def test_keywords_build_the_same_config_as_an_engine_config():
    m = tiny_model(dtype=torch.float32)
    by_keywords = Engine(m, max_batch=3, paged=False, max_seq_len=32, max_step_tokens=None)
    assert by_keywords.engine_config == EngineConfig(max_batch=3, paged=False, max_seq_len=32, max_step_tokens=None)
    merged = Engine(m, None, EngineConfig(max_batch=2, paged=False), max_seq_len=16)
    assert merged.engine_config == EngineConfig(max_batch=2, paged=False, max_seq_len=16)
    assert merged.max_batch == 2 and merged.max_seq_len == 16 and merged.cache.paged is False


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_batch": 0}, "max_batch must be >= 1, got 0"),
        ({"mode": "diagonal"}, "mode must be one of"),
        ({"max_batch": 8, "max_step_tokens": 8}, "max_step_tokens must exceed max_batch (8)"),
        ({"paged": False, "prefix_caching": True}, "prefix caching needs the paged cache"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"block_size": 16, "kv_cache_tokens": 16}, "kv_cache_tokens must hold at least two blocks of 16"),
    ],
)
def test_bad_options_are_one_line_errors_from_the_config_and_the_engine(options, message):
    with pytest.raises(LoopcoderError, match=None) as e:
        EngineConfig(**options)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LoopcoderError) as e:
        Engine(tiny_model(dtype=torch.float32), **options)
    assert message in str(e.value)


def test_an_unknown_option_is_named():
    with pytest.raises(TypeError, match="max_batchh"):
        Engine(tiny_model(dtype=torch.float32), max_batchh=4)


def test_mode_can_change_between_steps_and_is_checked():
    engine = Engine(tiny_model(dtype=torch.float32), max_batch=2)
    engine.mode = "sequential"
    assert engine.runner.mode == "sequential"
    with pytest.raises(LoopcoderError, match="mode must be one of"):
        engine.mode = "diagonal"


class CountingRunner:
    """No model: token 7 after a prefill, then one more than the last token; counts its calls."""

    def __init__(self, model, cache, config):
        self.model, self.mode, self.vocab = model, config.mode, model.config.vocab_size
        self.calls = {"prefill": 0, "decode": 0}

    def row(self, token: int) -> torch.Tensor:
        logits = torch.full((self.vocab,), -1e9)
        logits[token % self.vocab] = 0.0
        return logits

    def prefill(self, req, n):
        self.calls["prefill"] += 1
        return self.row(7)

    def decode(self, reqs):
        self.calls["decode"] += 1
        return torch.stack([self.row(r.output_ids[-1] + 1) for r in reqs])


def test_the_engine_runs_the_model_only_through_its_runner():
    engine = Engine(tiny_model(dtype=torch.float32, eos_token_id=None), max_batch=2, runner=CountingRunner)
    reqs = [engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=4)), engine.add_request([4], SamplingParams())]
    assert [r.state for r in reqs] == [RequestState.WAITING] * 2 and reqs[0].state == "waiting"
    engine.step()
    assert all(r.state is RequestState.DECODE for r in reqs)
    got = engine.generate([[5, 6]], SamplingParams(max_new_tokens=3))
    assert got[0].token_ids == [7, 8, 9] and got[0].finish_reason == "length"
    assert reqs[0].output_ids == [7, 8, 9, 10] and reqs[0].finish_reason == "length"
    assert engine.runner.calls["prefill"] == 3 and engine.runner.calls["decode"] >= 3
