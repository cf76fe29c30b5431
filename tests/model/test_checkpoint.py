"""The released LoopCoder-V2 layout: save/load round trips, Auto classes, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import loopcoder  # noqa: F401  (registers the Auto classes)
from loopcoder.cli import main
from loopcoder.model.checkpoint import CheckpointError, load_model
from loopcoder.model.config import ConfigError, PLTConfig
from loopcoder.model.modeling import PLTForCausalLM
from support.models import released_style_dir, tiny_config, tiny_model

RELEASED_PER_LAYER = {
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.plt_gate.weight",
    "self_attn.plt_gate.bias",
    "self_attn.plt_gate.gate_norm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
}


def test_released_layout_loads_with_no_renaming(tmp_path):
    ref = released_style_dir(tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{n}" for i in range(2) for n in RELEASED_PER_LAYER
    }
    assert names == expected
    for loader in (AutoModelForCausalLM.from_pretrained, PLTForCausalLM.from_pretrained):
        model = loader(str(tmp_path), dtype=torch.float32)
        assert isinstance(model, PLTForCausalLM) and model.config.plt_num_loops == 2
        ids = torch.randint(0, 61, (1, 8))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert AutoConfig.from_pretrained(str(tmp_path)).model_type == "iquestpltcoder"


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_save_pretrained_round_trip_in_released_layout(tmp_path, shard):
    model = tiny_model(dtype=torch.float32, plt_num_loops=3)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path, **kwargs)
    files = sorted(p.name for p in tmp_path.iterdir())
    if shard is None:
        assert "model.safetensors" in files
    else:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["IQuestPLTCoderForCausalLM"] and saved["model_type"] == "iquestpltcoder"
    for key in (
        "plt_num_loops",
        "plt_window_size",
        "plt_emb_scale",
        "plt_hidden_scale",
        "plt_normalize_per_loop",
        "plt_gate_use_hidden_states",
        "rope_theta",
        "num_key_value_heads",
        "head_dim",
    ):
        assert key in saved, key
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_load_model_rejects_missing_and_misshaped_tensors(tmp_path):
    released_style_dir(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.self_attn.plt_gate.bias"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.plt_gate\.bias"):
        load_model(tmp_path)

    weights["model.layers.1.self_attn.plt_gate.bias"] = torch.zeros(4)
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 32)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        load_model(tmp_path)


def test_load_model_rejects_unknown_tensors(tmp_path):
    released_style_dir(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.extra\.weight"):
        load_model(tmp_path)


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (dict(plt_num_loops=0), "plt_num_loops"),
        (dict(plt_num_loops=1.5), "plt_num_loops"),
        (dict(plt_window_size=[-1, 0]), "plt_window_size"),
        (dict(plt_window_size=[64, 4]), "plt_window_size"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(loop_architecture="ring"), "loop_architecture"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(plt_num_loop=2), "plt_num_loop"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    ],
)
def test_invalid_config_names_the_field(fields, named):
    with pytest.raises(ConfigError, match=named):
        tiny_config(**fields)


def test_config_json_with_bad_value_is_a_clear_error(tmp_path):
    released_style_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["plt_num_loops"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="plt_num_loops=0: must be an integer >= 1"):
        load_model(tmp_path)


def test_released_7b_config_defaults():
    cfg = PLTConfig()
    assert (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
    ) == (5120, 14, 40, 8, 128, 27648, 76800)
    assert (cfg.plt_num_loops, cfg.plt_window_size, cfg.plt_emb_scale, cfg.plt_hidden_scale) == (
        2,
        [64, 0],
        0.707,
        0.053,
    )
    assert cfg.rope_theta == 500000 and cfg.bos_token_id == 1 and cfg.eos_token_id == 2


def test_cli_init_writes_a_loadable_model_and_errors_exit_2(tmp_path, capsys):
    out = tmp_path / "m"
    assert (
        main(
            [
                "init",
                "--out",
                str(out),
                "--loops",
                "3",
                "--hidden-size",
                "64",
                "--layers",
                "2",
                "--heads",
                "4",
                "--vocab-size",
                "300",
            ]
        )
        == 0
    )
    model = load_model(out)
    assert model.config.plt_num_loops == 3
    capsys.readouterr()
    assert main(["init", "--out", str(tmp_path / "bad"), "--loops", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--loops must be >= 1, got 0" in err[0]  # named by its flag
