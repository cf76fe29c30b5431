"""Parameter counts, FLOPs per token, memory plan, `loopcoder plan`, and `loopcoder bench train`."""

from __future__ import annotations

import json

import pytest
import torch

from loopcoder.cli import main
from loopcoder.commands.plan import parse_bytes
from loopcoder.model.config import released_config
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.training.flops import (
    activation_bytes_per_token,
    fit,
    mfu,
    param_counts,
    peak_flops,
    plan,
    train_flops_per_token,
)
from loopcoder.utils.errors import LoopcoderError
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


def test_parse_bytes_reads_units_and_refuses_a_bare_number():
    assert parse_bytes("80GiB") == parse_bytes("80G") == parse_bytes("80gi") == parse_bytes("80 GiB") == 80 * 2**30
    assert parse_bytes("80GB") == 80e9 and parse_bytes("141GB") == 141e9 and parse_bytes("1.5TB") == 1.5e12
    assert parse_bytes("512MiB") == parse_bytes("512M") == 512 * 2**20 and parse_bytes("24e9B") == 24e9
    for bare in ("80", "24e9", "0.5"):
        with pytest.raises(LoopcoderError, match=f"--memory '{bare}' has no unit: write {bare}GiB"):
            parse_bytes(bare)
    with pytest.raises(LoopcoderError, match="expected a size"):
        parse_bytes("80 gigs")


def test_plan_says_plainly_when_a_model_does_not_fit_and_what_would():
    cfg = released_config()  # 7.6B parameters: 113.5 GiB of fp32 weights, gradients and Adam moments
    one = fit(cfg, 4096, 80 * 2**30, gpus=1, checkpointing=True, micro_batch=1)
    assert not one["fits"] and one["verdict"].startswith(
        "does not fit on 1 GPU of 80.0 GiB: the model states take 113.5"
    )
    smallest = next(g for g in range(2, 64) if plan(cfg, 4096, 80 * 2**30, g)["max_micro_batch"] >= 1)
    assert smallest == 2 and one["advice"][0].startswith("with FSDP over 2 such GPUs (--gpus 2)")
    eight = fit(cfg, 4096, 80 * 2**30, gpus=8, checkpointing=True, micro_batch=1)
    assert eight["fits"] and eight["verdict"].startswith("fits on 8 GPUs") and eight["advice"] == []
    # a micro-batch larger than fits: say how large it may be
    big = fit(cfg, 4096, 80 * 2**30, gpus=8, checkpointing=True, micro_batch=64)
    most = plan(cfg, 4096, 80 * 2**30, 8)["max_micro_batch"]
    assert not big["fits"] and f"set train.micro_batch_size to at most {most}" in big["advice"][0]
    # fits only with activation checkpointing, which the config has off
    only_ck = fit(cfg, 4096, 80 * 2**30, gpus=2, checkpointing=False, micro_batch=1)
    assert plan(cfg, 4096, 80 * 2**30, 2, checkpointing=False)["max_micro_batch"] == 0
    assert "only with activation checkpointing" in only_ck["verdict"]
    assert "set train.activation_checkpointing=true" in only_ck["advice"][0]
    # a sequence too long for any number of GPUs' sharding alone: shorter sequences are the way
    long = fit(cfg, 1 << 20, 80 * 2**30, gpus=8, checkpointing=True)
    assert "one sequence of 1048576 tokens needs" in long["verdict"]
    assert any("--seq-len" in a for a in long["advice"]) or "use GPUs with more memory" in long["advice"][-1]


def test_plan_command(capsys):
    assert main(["plan", "--preset", "7b", "--memory", "80GiB", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "7,6" in out and "1.95x the R=1 model" in out and "largest micro-batch" in out
    assert "KV cache at T=4096" in out and "+1.6% over R=1" in out
    assert main(["plan", "--preset", "7b", "--json", "model.loops=1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpointing"]["flops_per_token"]["total"] == report["checkpointing"]["flops_per_token_r1"]
    assert main(["plan", "--preset", "7b", "--memory", "lots"]) == 2
    assert main(["plan", "--preset", "7b", "--memory", "80"]) == 2
    assert "has no unit" in capsys.readouterr().err
    assert main(["plan", "--preset", "7b", "--memory", "80GiB"]) == 0  # one GPU
    out = capsys.readouterr().out
    assert "largest micro-batch (sequences of 4096)       0 with checkpointing, 0 without" in out
    assert "verdict: does not fit on 1 GPU of 80.0 GiB" in out and "(--gpus 2)" in out
    assert main(["plan", "--preset", "7b", "--memory", "80GiB", "--gpus", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fit"]["fits"] is True


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
