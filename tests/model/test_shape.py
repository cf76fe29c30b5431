"""One model shape, built in one place: `loopcoder init`, training and the benchmarks give the same
`PLTConfig` for the same shape, and the benchmark commands' defaults are their settings' defaults."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from loopcoder.bench.decode import DecodeBenchSettings
from loopcoder.bench.serve import ServeBenchSettings
from loopcoder.bench.train import TrainBenchSettings
from loopcoder.commands import bench as bench_command
from loopcoder.model.checkpoint import write_random_model
from loopcoder.model.config import PLTConfig
from loopcoder.model.shape import ModelShape, mlp_width
from loopcoder.training.config import load_config
from loopcoder.training.run import model_config
from loopcoder.utils.errors import LoopcoderError


def fields(cfg: PLTConfig) -> dict:
    """The model's own fields (the padding id is the tokenizer's business: training sets it, init cannot)."""
    return {k: getattr(cfg, k) for k in PLTConfig.__annotations__ if k != "pad_token_id"}


def test_mlp_width_is_8_3_hidden_rounded_up_to_32():
    assert [mlp_width(h) for h in (64, 96, 100, 128, 256, 1024)] == [192, 256, 288, 352, 704, 2752]
    assert all(mlp_width(h) % 32 == 0 and mlp_width(h) >= 8 * h / 3 > mlp_width(h) - 32 for h in range(8, 600))


@pytest.mark.parametrize("intermediate", [None, 320])
def test_init_training_and_benchmarks_build_the_same_config(tmp_path, intermediate):
    write_random_model(
        tmp_path,
        loops=2,
        hidden_size=128,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate_size=intermediate,
        vocab_size=512,
        window=16,
        max_positions=256,
    )
    init = PLTConfig.from_pretrained(tmp_path)
    train = model_config(
        load_config(
            None,
            {
                "model.loops": 2,
                "model.hidden_size": 128,
                "model.layers": 2,
                "model.heads": 4,
                "model.kv_heads": 2,
                "model.vocab_size": 512,
                "model.intermediate_size": intermediate,
                "model.window": 16,
                "model.max_position_embeddings": 256,
            },
        ),
        vocab_size=500,
        seq_len=64,
    )
    bench_train = TrainBenchSettings(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=intermediate,
        vocab_size=512,
        window=16,
        seq_len=256,
    ).model_config(2)
    decode = DecodeBenchSettings(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=intermediate or mlp_width(128),
        vocab_size=512,
        window=16,
    )
    decode.contexts = (256 - decode.steps_per_engine(),)  # the engine's cache length is the positions' limit
    want = fields(init)
    assert want["intermediate_size"] == (intermediate or 352) and want["rope_theta"] == 10000.0
    assert fields(train) == want
    assert fields(bench_train) == want
    assert fields(decode.model_config(2)) == want
    assert train.pad_token_id == 0 and init.pad_token_id is None


def test_the_tokenizer_sizes_the_vocabulary_unless_the_shape_does():
    assert ModelShape().plt_config(tokenizer_vocab=300).vocab_size == 320  # rounded up to 64
    assert ModelShape(vocab_size=512).plt_config(tokenizer_vocab=300).vocab_size == 512
    with pytest.raises(LoopcoderError, match="smaller than the tokenizer's 600"):
        ModelShape(vocab_size=512).plt_config(tokenizer_vocab=600)
    with pytest.raises(LoopcoderError, match="vocab_size is not set"):
        ModelShape().plt_config()


@pytest.mark.parametrize(
    ("which", "settings", "renamed"),
    [
        ("decode", DecodeBenchSettings, {"layers": "num_layers", "heads": "num_heads", "kv_heads": "num_kv_heads"}),
        ("train", TrainBenchSettings, {"layers": "num_layers", "heads": "num_heads", "kv_heads": "num_kv_heads"}),
        ("serve", ServeBenchSettings, {}),
    ],
)
def test_bench_command_defaults_are_the_settings_defaults(which, settings, renamed):
    parser = argparse.ArgumentParser()
    bench_command.add_arguments(parser)
    args = vars(parser.parse_args([which]))
    defaults = {f.name: f.default for f in dataclasses.fields(settings) if f.default is not dataclasses.MISSING}
    shared = {renamed.get(k, k): v for k, v in args.items() if renamed.get(k, k) in defaults}
    assert len(shared) >= 10
    assert shared == {k: defaults[k] for k in shared}
    if which == "decode":
        assert args["dtype"] == DecodeBenchSettings().dtype == "auto"
