"""Training configs: typed sections, presets, YAML files, dotted overrides and their errors."""

from __future__ import annotations

import pytest
import yaml

from loopcoder.cli import main
from loopcoder.model.config import released_config
from loopcoder.training.config import ConfigKeyError, TrainConfig, load_config, preset_names, valid_keys
from loopcoder.training.run import model_config


def test_overrides_are_typed_and_dotted():
    cfg = load_config(
        "tiny",
        [
            "optim.lr=3e-4",
            "model.loops=3",
            "optim.betas=[0.8, 0.9]",
            "model.kv_heads=null",
            "train.compile=true",
            "out=runs/x",
            "data.sft_train=a.jsonl",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.model.loops == 3 and cfg.optim.betas == [0.8, 0.9] and cfg.model.kv_heads is None
    assert cfg.train.compile is True and cfg.out == "runs/x" and cfg.data.sft_train == ["a.jsonl"]
    assert load_config(None, {"train.steps": 7.0}).train.steps == 7
    # YAML 1.1 reads a bare off/yes as bools: a word field keeps the word, a bool field takes it
    words = load_config(None, ["logging.progress=off", "train.compile=yes", "logging.tensorboard=off"])
    assert words.logging.progress == "off" and words.train.compile is True and words.logging.tensorboard is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean optim.lr? valid keys of optim: optim.lr, optim.betas"),
        ("optimizer.lr=1", "unknown section 'optimizer' in 'optimizer.lr'; did you mean optim.lr?"),
        ("steps=3", "unknown key 'steps'; did you mean train.steps? top-level keys: out, seed"),
        ("model.layerz=3", "unknown key 'model.layerz'; did you mean model.layers?"),
        ("loops=2", "unknown key 'loops'; did you mean model.loops?"),
        ("optim=1", "'optim' is a section"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
        ("train.steps=1.5", "train.steps: expected int, got 1.5"),
        ("train.compile=maybe", "train.compile: expected bool"),
        ("model.loops=0", "model.loops=0: must be >= 1"),
        ("train.precision=fp8", "choose from auto, fp32, bf16"),
        ("train.attention=flash", "choose from sdpa, flex_attention"),
        ("schedule.decay=step", "choose from cosine, linear, constant"),
        ("optim.betas=[0.9]", "optim.betas=[0.9]: must be two numbers"),
        ("nonsense", "is not KEY=VALUE"),
    ],
)
def test_bad_overrides_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigKeyError) as e:
        load_config("tiny", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_key_is_listed_and_settable():
    keys = valid_keys()
    assert "optim.lr" in keys and "distributed.reshard_after_forward" in keys and "model.loops" in keys
    assert len(keys) == len(set(keys))


def test_presets_load_and_the_7b_preset_is_the_released_shape():
    assert {"tiny", "small", "7b"} <= set(preset_names())
    for name in preset_names():
        load_config(name)
        load_config(name, stage="sft", extra={"init": "x"})
    mc = model_config(load_config("7b"), vocab_size=76800, seq_len=4096)
    released = released_config()
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
        "tie_word_embeddings",
        "plt_num_loops",
        "plt_window_size",
        "plt_emb_scale",
        "plt_hidden_scale",
        "plt_normalize_per_loop",
        "plt_gate_use_hidden_states",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(mc, field) == getattr(released, field), field


def test_the_sft_block_applies_to_sft_only_and_sft_needs_init():
    pre, tuned = load_config("tiny"), load_config("tiny", stage="sft", extra={"init": "runs/tiny"})
    assert pre.out == "runs/tiny" and tuned.out == "runs/tiny-sft"
    assert tuned.train.steps < pre.train.steps and tuned.optim.lr < pre.optim.lr
    assert tuned.stage == "sft" and tuned.init == "runs/tiny"
    with pytest.raises(ConfigKeyError, match="--init"):
        load_config("tiny", stage="sft")


def test_yaml_files_inherit_a_preset_and_unknown_keys_name_the_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: tiny\nmodel:\n  loops: 3\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(str(f), ["train.steps=9"])
    assert (cfg.model.loops, cfg.optim.lr, cfg.train.steps, cfg.model.hidden_size) == (3, 1e-3, 9, 128)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  layerz: 3\n")
    expected = r"bad.yaml: unknown key 'model.layerz'; did you mean model.layers\? valid keys of model"
    with pytest.raises(ConfigKeyError, match=expected):
        load_config(str(bad))
    with pytest.raises(ConfigKeyError, match="neither a file nor a preset"):
        load_config(str(tmp_path / "missing.yaml"))


def test_accumulation_splits_the_global_batch_over_ranks_and_micro_batches():
    cfg = load_config(None, ["train.global_batch_size=16", "train.micro_batch_size=2"])
    assert cfg.accumulation(1) == (2, 8) and cfg.accumulation(4) == (2, 2)
    assert load_config(None, ["train.global_batch_size=16"]).accumulation(2) == (8, 1)
    with pytest.raises(ConfigKeyError, match="not divisible by the 3 ranks"):
        cfg.accumulation(3)
    with pytest.raises(ConfigKeyError, match="must divide"):
        load_config(None, ["train.global_batch_size=16", "train.micro_batch_size=3"])


def test_the_cli_prints_the_resolved_config_and_rejects_unknown_keys(capsys):
    assert main(["train", "--config", "tiny", "--print-config", "model.loops=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["loops"] == 2
    assert load_config(printed).to_dict() == load_config("tiny", ["model.loops=2"]).to_dict()
    assert main(["train", "--config", "tiny", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loopcoder train: error: override: unknown key 'optim.lrr'")
    assert main(["sft", "--config", "tiny"]) == 2
    assert "--init" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", "data.dir=/nonexistent"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_default_config_round_trips_through_yaml():
    cfg = TrainConfig()
    assert load_config(yaml.safe_load(cfg.to_yaml())).to_dict() == cfg.to_dict()
