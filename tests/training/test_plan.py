"""Parameter counts, FLOPs per token, memory plan, `loopcoder plan`, and `loopcoder bench train`."""

from __future__ import annotations

import json

import pytest
import torch

from loopcoder.cli import main
from loopcoder.commands.plan import parse_bytes
from loopcoder.config import released_config
from loopcoder.model import PLTForCausalLM
from loopcoder.training.flops import (
    activation_bytes_per_token,
    mfu,
    param_counts,
    peak_flops,
    plan,
    train_flops_per_token,
)
from support.models import tiny_config


@pytest.mark.parametrize(
    "overrides",
    [
        {"plt_num_loops": 1},
        {"plt_num_loops": 3},
        {"plt_gate_use_hidden_states": False},
        {"loop_architecture": "vanilla", "plt_num_loops": 2},
        {"tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True},
    ],
)
def test_parameter_counts_match_the_model(overrides):
    cfg = tiny_config(**overrides)
    model = PLTForCausalLM(cfg)
    p = param_counts(cfg)
    assert p.total == sum(t.numel() for t in model.parameters())
    assert p.non_embedding == p.total - p.embedding - p.lm_head
    assert p.per_layer == sum(t.numel() for t in model.model.layers[0].parameters())


def test_released_shape_is_about_7_6b_parameters_and_r_loops_cost_about_r_times():
    cfg = released_config()
    assert param_counts(cfg).total == pytest.approx(7.62e9, rel=0.01)
    f1 = train_flops_per_token(released_config(plt_num_loops=1), 4096)
    f2 = train_flops_per_token(cfg, 4096)
    p = param_counts(cfg)
    assert f2["matmul"] == 6 * (2 * p.layer_matmul + p.gate_matmul + 76800 * 5120)
    assert f2["attention"] == 12 * 14 * 40 * 128 * (4096 + 4096 + 65)  # loop 1: T; loop 2: T + (w + 1)
    assert 1.9 < f2["total"] / f1["total"] < 2.0


def test_memory_plan_for_the_released_shape():
    cfg = released_config()
    one = plan(cfg, 4096, 80 * 2**30, gpus=1)
    eight = plan(cfg, 4096, 80 * 2**30, gpus=8)
    assert one["model_state_bytes_per_gpu"] == 16 * param_counts(cfg).total  # fp32 weights, grads, Adam m, v
    assert one["max_micro_batch"] == 0  # 122 GB of states do not fit one 80 GiB GPU
    assert eight["model_state_bytes_per_gpu"] == one["model_state_bytes_per_gpu"] / 8
    assert eight["max_micro_batch"] >= 1
    more = plan(cfg, 4096, 141 * 2**30, gpus=8)
    assert more["max_micro_batch"] > eight["max_micro_batch"]
    ck = activation_bytes_per_token(cfg, True)["total"]
    assert ck < activation_bytes_per_token(cfg, False)["total"] / 5
    assert eight["fsdp_all_gathers_per_layer_per_step"] == 4  # 2R with reshard_after_forward
    assert plan(cfg, 4096, 80 * 2**30, gpus=8, reshard_after_forward=False)["fsdp_all_gathers_per_layer_per_step"] == 2
    assert eight["kv_cache_bytes"]["plt"] == cfg.kv_cache_bytes(4096)
    assert eight["kv_cache_bytes"]["vanilla"] == 2 * eight["kv_cache_bytes"]["r1"]


def test_mfu_and_peaks():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA L40") == 181e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Some GPU") is None
    assert mfu(1e9, 100.0, 1e12) == pytest.approx(0.1)
    assert mfu(1e9, 100.0, None) is None


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("141GB") == 141e9 and parse_bytes("24e9") == 24e9


def test_plan_command(capsys):
    assert main(["plan", "--preset", "7b", "--memory", "80GiB", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "7,6" in out and "1.95x the R=1 model" in out and "largest micro-batch" in out
    assert "KV cache at T=4096" in out and "+1.6% over R=1" in out
    assert main(["plan", "--preset", "7b", "--json", "model.loops=1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpointing"]["flops_per_token"]["total"] == report["checkpointing"]["flops_per_token_r1"]
    assert main(["plan", "--preset", "7b", "--memory", "lots"]) == 2


def test_bench_train_measures_every_loop_count_and_transformers(tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "train.json"
    assert (
        main(
            [
                "bench",
                "train",
                "--hidden-size",
                "32",
                "--layers",
                "2",
                "--heads",
                "4",
                "--kv-heads",
                "2",
                "--intermediate-size",
                "64",
                "--vocab-size",
                "128",
                "--window",
                "4",
                "--batch",
                "2",
                "--seq-len",
                "16",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--rounds",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["config"] for r in report["results"]] == ["PLT R=1", "PLT R=2", "PLT R=3", "llama (transformers)"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in report["results"])
    assert set(report["ratios"]) == {"R1/R1", "R2/R1", "R3/R1", "R1/llama"}
    assert "ratios (tokens/s)" in printed and "llama (transformers)" in printed
