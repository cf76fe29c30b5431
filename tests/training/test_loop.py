"""The training loop in one process: optimiser recipe, accumulation, validation bits per byte, SFT loss
masks, checkpoints in the released layout, keep-last-k, crash safety, non-finite loss."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from loopcoder.cli import main
from loopcoder.data.shards import BatchReader
from loopcoder.model.checkpoint import load_model
from loopcoder.model.modeling import causal_lm_loss
from loopcoder.training import NonFiniteLoss, load_config, pretrain, sft
from loopcoder.training import checkpoints as ckpt
from loopcoder.training.data import pretrain_source, sft_source
from loopcoder.training.optim import lr_factor, param_groups
from loopcoder.training.trainer import Trainer
from support.training import in_process_overrides as overrides
from support.training import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, one_thread):
    """One short pretraining run shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("pre") / "run"
    return pretrain(None, overrides(out, **{"train.steps": 8, "checkpoint.every": 3, "checkpoint.keep": 2}))


# ----------------------------------------------------------------------------- optimiser recipe
def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    total, warmup = 100, 5
    f = [lr_factor(s, total, warmup, "cosine", 0.1) for s in range(total)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[5] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1)
    assert f[52] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-2)  # half way through the decay
    assert all(a >= b for a, b in itertools.pairwise(f[5:]))
    assert lr_factor(50, total, warmup, "constant", 0.1) == 1.0
    assert lr_factor(99, total, warmup, "linear", 0.0) == pytest.approx(0.0)


def test_defaults_are_the_published_recipe():
    cfg = load_config()
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.eps == 1e-15 and cfg.optim.weight_decay == 0.1
    assert cfg.optim.grad_clip == 1.0 and cfg.optim.lr == 4e-4
    assert cfg.schedule.decay == "cosine" and cfg.schedule.warmup_fraction == 0.05
    assert load_config(None, ["train.steps=1000"]).warmup_steps() == 50


def test_weight_decay_applies_to_matrices_only():
    from support.models import tiny_model

    model = tiny_model(dtype=torch.float32)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- the run and its checkpoints
def test_pretraining_learns_and_writes_released_layout_checkpoints(pretrained, capsys):
    run = pretrained.run_dir
    losses = [m["loss"] for m in read_metrics(run)]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2
    assert [v["step"] for v in read_metrics(run, "val")] == [3, 6, 8]
    assert pretrained.val_loss == read_metrics(run, "val")[-1]["val_loss"]
    # every third step and the end, keep the last 2; `latest` names the newest
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [6, 8]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000008"
    final = pretrained.final_checkpoint
    assert final == run / "checkpoints" / "step-000008"
    names = {p.name for p in final.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.pt",
        "checkpoint.json",
    } <= names
    assert json.loads((final / "config.json").read_text())["architectures"] == ["IQuestPLTCoderForCausalLM"]
    assert json.loads((run / "summary.json").read_text())["step"] == 8
    assert load_config(str(run / "config.yaml")).model.loops == 2

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.plt_num_loops == 2
    capsys.readouterr()
    assert main(["generate", "--model", str(final), "--prompt", "def f(", "--max-new-tokens", "4"]) == 0
    assert "4 tokens" in capsys.readouterr().err


def test_gradient_accumulation_gives_the_same_steps_as_one_big_batch(tmp_path):
    a = pretrain(None, overrides(tmp_path / "a", **{"train.steps": 3, "eval.every": 0, "eval.at_end": False}))
    b = pretrain(
        None,
        overrides(
            tmp_path / "b", **{"train.steps": 3, "eval.every": 0, "eval.at_end": False, "train.micro_batch_size": 2}
        ),
    )
    for x, y in zip(read_metrics(a.run_dir), read_metrics(b.run_dir)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_flex_attention_training_needs_cuda_and_says_so(tmp_path, capsys):
    args = overrides(tmp_path / "f", **{"train.steps": 1, "train.device": "cpu", "train.attention": "flex_attention"})
    assert main(["train", "--preset", "tiny", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "train.attention=flex_attention needs a CUDA device (torch's flex_attention has no "
        "backward on CPU); use train.attention=sdpa"
    )


def test_validation_loss_and_bits_per_byte_are_nll_over_tokens_and_bytes(pretrained):
    cfg = load_config(str(pretrained.run_dir / "config.yaml"))
    source = pretrain_source(cfg)
    model = load_model(pretrained.final_checkpoint)
    nll, tokens, nbytes = 0.0, 0, 0
    data = source.validation
    with torch.no_grad():
        for start in range(0, min(len(data), 2 * 4), 4):  # eval.max_batches=2 of the micro-batch (4)
            batch = data.get(np.arange(start, min(start + 4, len(data))))
            nll += float(causal_lm_loss(model(batch["input_ids"]).logits, batch["labels"], reduction="sum"))
            tokens += batch["labels"][:, 1:].numel()
            nbytes += int(data.dataset.token_bytes[batch["labels"][:, 1:].numpy()].sum())
    val = read_metrics(pretrained.run_dir, "val")[-1]
    assert val["val_tokens"] == tokens and val["val_bytes"] == nbytes
    assert val["val_loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert val["val_bpb"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)


def test_sft_trains_on_assistant_tokens_only(pretrained, tmp_path):
    out = tmp_path / "sft"
    result = sft(None, init=pretrained.run_dir, overrides=overrides(out, **{"train.steps": 2, "eval.every": 0}))
    cfg = load_config(str(out / "config.yaml"), stage="sft")
    assert cfg.init == str(pretrained.run_dir)
    source = sft_source(cfg, pretrained.final_checkpoint)
    batch = BatchReader(source.train, 4, cfg.seed).next_batch()
    labels = batch["labels"]
    assert (labels == -100).any() and (labels != -100).any()
    assert bool((labels[batch["attention_mask"] == 0] == -100).all())
    # the first step's loss is the init model's masked loss (attention mask and all) on the first batch
    model = load_model(pretrained.final_checkpoint)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert read_metrics(out)[0]["loss"] == pytest.approx(float(causal_lm_loss(logits, labels)), rel=1e-5)
    assert result.final_checkpoint.name == "step-000002" and result.val_loss is not None


# ----------------------------------------------------------------------------- failures
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    forward = Trainer._forward_loss

    def poisoned(self, batch):
        loss = forward(self, batch)
        return loss * float("nan") if self.step >= 3 and self.model.training else loss

    monkeypatch.setattr(Trainer, "_forward_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match=r"step 4 .*last good checkpoint is .*step-000003"):
        pretrain(None, overrides(out, **{"train.steps": 6}))
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3]
    assert load_model(ckpt.latest_checkpoint(out)) is not None
    assert read_metrics(out, "error")[0]["step"] == 4
    # the CLI says it in one line, exit status 2
    capsys.readouterr()
    assert main(["train", *overrides(tmp_path / "nan-cli", **{"train.steps": 6})]) == 2
    err = capsys.readouterr().err
    assert "error: non-finite training loss at step 4" in err and "Traceback" not in err


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_valid(pretrained, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrained.run_dir, run)
    before = ckpt.latest_checkpoint(run)
    state = ckpt.load_state(before)
    model = load_model(before)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.write_checkpoint(run, 9, model.config, model.state_dict(), state, None, 0, "5GB", {})
    assert ckpt.latest_checkpoint(run) == before
    assert not (run / "checkpoints" / "step-000009").exists()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    # a step directory without its completion marker is never taken for a checkpoint
    fake = run / "checkpoints" / "step-000099"
    shutil.copytree(before, fake)
    (fake / ckpt.MARKER).unlink()
    assert ckpt.latest_checkpoint(run) == before
    assert ckpt.remove_partial(run) == [fake] and not fake.exists()
