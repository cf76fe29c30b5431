"""LoRA fine-tuning through PEFT: training only the adapter, checkpoints and exact resume of an adapter run,
merge-on-load for every inference command, `export --merge`, serving the merged model, and LoRA beside
full fine-tuning on the same data."""

from __future__ import annotations

import json
import shutil
import signal
import warnings

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from loopcoder.cli import main
from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.model import lora
from loopcoder.model.checkpoint import load_model, save_model, write_merged
from loopcoder.model.loading import load_for_inference
from loopcoder.serving.server import load_app
from loopcoder.training import pretrain, sft
from loopcoder.training.checkpoints import latest_checkpoint, load_state
from loopcoder.training.config import ConfigKeyError, load_config, lora_overrides
from loopcoder.training.trainer import KILL_ENV
from loopcoder.utils.errors import LoopcoderError
from support.models import full_recompute_greedy, tiny_model
from support.serving import LiveServer
from support.training import data_dir, read_metrics, run_cli, tiny_overrides
from support.training import in_process_overrides as overrides

LORA = {"lora.r": 8, "lora.dropout": 0.0, "optim.lr": 2e-2, "schedule.warmup_steps": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    # large initial weights: a LoRA update acts through the base's activations, which a barely trained model from
    # the usual 0.02 init keeps tiny (docs/training.md)
    out = tmp_path_factory.mktemp("pre") / "run"
    return pretrain(None, overrides(out, **{"train.steps": 4, "model.init_std": 0.3}))


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory):
    """A LoRA run of 12 steps on the instruction set, validated every 4."""
    out = tmp_path_factory.mktemp("lora") / "run"
    return sft(None, init=base.run_dir, overrides=overrides(out, **LORA, **{"train.steps": 12, "eval.every": 4}))


# ----------------------------------------------------------------------------- settings
def test_lora_spec_becomes_lora_keys_and_bad_specs_are_one_line_errors():
    assert lora_overrides("r=16,alpha=32,dropout=0.05,targets=q_proj,v_proj") == [
        "lora.r=16",
        "lora.alpha=32",
        "lora.dropout=0.05",
        "lora.targets=[q_proj, v_proj]",
    ]
    assert lora_overrides("8") == ["lora.r=8"]
    assert lora_overrides("targets=all-linear") == ["lora.targets=[all-linear]", "lora.r=16"]
    cfg = load_config(None, [*lora_overrides("r=4,targets=q_proj,o_proj"), "init=x"], stage="sft")
    assert (cfg.lora.r, cfg.lora.targets, cfg.lora.alpha) == (4, ["q_proj", "o_proj"], None)
    for bad, words in [
        ("rank=4", "unknown setting 'rank'"),
        ("r=4,r=8", "given twice"),
        ("r=4,q_proj", "not KEY=VALUE"),
    ]:
        with pytest.raises(ConfigKeyError, match=words):
            lora_overrides(bad)
    with pytest.raises(ConfigKeyError, match=r"lora\.r.*sft --init"):
        load_config(None, ["lora.r=4"])  # pretraining has no model to adapt
    with pytest.raises(ConfigKeyError, match=r"lora\.dropout"):
        load_config(None, ["lora.r=4", "lora.dropout=1.5", "init=x"], stage="sft")
    with pytest.raises(LoopcoderError, match="'qkv' is not a linear layer"):
        lora.lora_config(4, 8, 0.0, ["qkv"])


# ----------------------------------------------------------------------------- training
def test_lora_trains_only_the_adapter_shared_by_every_loop_and_lowers_the_loss(tuned, base):
    val = read_metrics(tuned.run_dir, "val")
    assert [v["step"] for v in val] == [4, 8, 12]
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 0.05  # learns the instruction set's answers
    train = [m["loss"] for m in read_metrics(tuned.run_dir)]
    assert sum(train[-4:]) / 4 < sum(train[:4]) / 4

    ckpt = tuned.final_checkpoint
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= {p.name for p in ckpt.iterdir()}
    assert not (ckpt / "config.json").exists() and not (ckpt / "model.safetensors").exists()
    tensors = load_file(str(ckpt / "adapter_model.safetensors"))
    layers, targets = 2, 2  # one A and one B per target layer: the loops share them, as they share the base
    assert len(tensors) == 2 * layers * targets
    assert all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)  # PEFT's own key layout
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(base.final_checkpoint.resolve())
    moments = load_state(ckpt)["optimizer"]["state"]  # the optimizer holds the adapter's moments only
    assert len(moments) == len(tensors) and all(".lora_" in str(k) for k in moments)


def test_lora_header_says_what_trains(base, tmp_path, capsys):
    out = tmp_path / "run"
    sft(None, init=base.run_dir, overrides=overrides(out, **LORA, **{"train.steps": 1, "eval.every": 0}))
    err = capsys.readouterr().err
    assert "LoRA: r=8, alpha=16, dropout=0 on q_proj, v_proj (shared by all loops)" in err
    assert "trainable of" in err


@pytest.mark.slow  # end-to-end: seconds
def test_resume_of_a_lora_run_equals_the_uninterrupted_run(base, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    settings = {
        **LORA,
        "lora.dropout": 0.1,  # dropout draws random numbers: the RNG state is part of the resume
        "train.steps": 6,
        "checkpoint.every": 2,
        "eval.every": 3,
        "train.deterministic": True,
    }
    args = ["sft", "--init", str(base.run_dir)]
    r = run_cli([*args, *tiny_overrides(data_dir(), full, **settings)])
    assert r.returncode == 0, r.stderr
    r = run_cli([*args, *tiny_overrides(data_dir(), killed, **settings)], env={KILL_ENV: "3"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert latest_checkpoint(killed).name == "step-000002"
    r = run_cli(["sft", "--resume", f"out={killed}"])
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr and "LoRA: r=8" in r.stderr
    exact = ("step", "loss", "grad_norm", "lr")
    assert [{k: m[k] for k in exact} for m in read_metrics(killed)] == [
        {k: m[k] for k in exact} for m in read_metrics(full)
    ]
    assert read_metrics(killed, "val") == read_metrics(full, "val")
    a = load_file(str(latest_checkpoint(full) / "adapter_model.safetensors"))
    b = load_file(str(latest_checkpoint(killed) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another adapter shape cannot continue this run
    r = run_cli(["sft", "--resume", f"out={killed}", "lora.r=4"])
    assert r.returncode == 2 and "cannot resume: lora.r is 8 in the checkpoint and 4 now" in r.stderr


@pytest.mark.slow  # end-to-end: seconds
def test_lora_near_full_rank_and_full_fine_tuning_both_learn_the_same_data(base, tmp_path):
    """The comparison docs/training.md describes: a rank-32 adapter on every linear layer of a 32-wide model
    (a full-rank update of each) against tuning every weight, same data, steps and LR."""
    common = {"train.steps": 12, "eval.every": 12, "optim.lr": 1e-2, "schedule.warmup_steps": 0}
    full = sft(None, init=base.run_dir, overrides=overrides(tmp_path / "full", **common))
    adapter = sft(
        None,
        init=base.run_dir,
        overrides=overrides(
            tmp_path / "lora", **common, **{"lora.r": 32, "lora.dropout": 0.0, "lora.targets": "[all-linear]"}
        ),
    )
    start = sft(None, init=base.run_dir, overrides=overrides(tmp_path / "none", **{**common, "train.steps": 1}))
    first = read_metrics(start.run_dir)[0]["loss"]  # the base model's loss on the first batch
    for run in (full, adapter):
        losses = [m["loss"] for m in read_metrics(run.run_dir)]
        assert losses[0] == pytest.approx(first, rel=1e-6)  # both start from the same model (B = 0)
        assert sum(losses[-3:]) / 3 < first - 0.3
        assert run.val_loss < first
    # full fine-tuning also moves the embeddings and norms, which the adapter leaves alone: it fits the
    # training data at least about as well
    assert full.train_loss < adapter.train_loss + 0.5


# ----------------------------------------------------------------------------- inference: merge on load
def _adapted(tmp_path, loops=3, seed=0):
    """A float64 base saved to disk and an adapter on it with random (non-zero) B, in memory."""
    model = tiny_model(dtype=torch.float64, plt_num_loops=loops, seed=seed)
    base_dir = save_model(model, tmp_path / "base")
    adapted = lora.attach(model, lora.lora_config(4, 8, 0.0, ["q_proj", "v_proj", "down_proj"], base_dir))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return adapted.eval(), base_dir


def _write_adapter(adapted, out):
    out.mkdir()
    lora.save_adapter(out, adapted.state_dict(), adapted.peft_config["default"])
    return out


def test_merged_model_gives_the_adapter_model_logits_in_every_loop(tmp_path):
    adapted, base_dir = _adapted(tmp_path)
    adapter_dir = _write_adapter(adapted, tmp_path / "adapter")
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = adapted(ids).logits
        base_logits = load_model(base_dir)(ids).logits
        merged = load_model(adapter_dir)  # merge on load: what generate, eval, serve and diagnose get
        got = merged(ids).logits
        with warnings.catch_warnings():  # PEFT asks transformers a deprecated question about checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            peft_own = PeftModel.from_pretrained(load_model(base_dir), str(adapter_dir)).eval()(ids).logits
    assert not hasattr(merged, "peft_config") and type(merged).__name__ == "PLTForCausalLM"
    assert (want - base_logits).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(peft_own, want, rtol=0, atol=1e-10)  # PEFT reads our adapter directory as its own


def test_engine_decoding_of_the_merged_model_equals_its_forward(tmp_path):
    adapted, _ = _adapted(tmp_path, loops=2)
    merged = write_merged(_write_adapter(adapted, tmp_path / "adapter"), tmp_path / "merged")
    model = load_model(merged, dtype=torch.float32)
    model.config.eos_token_id = None
    prompts = [[5, 9, 11, 3, 7], [4, 6, 10]]
    out = Engine(model, max_batch=2).generate(prompts, SamplingParams(max_new_tokens=8))
    for prompt, completion in zip(prompts, out):
        assert completion.token_ids == full_recompute_greedy(model, prompt, 8)


def test_a_moved_or_changed_base_and_a_broken_adapter_are_one_line_errors(tmp_path):
    adapted, base_dir = _adapted(tmp_path)
    adapter_dir = _write_adapter(adapted, tmp_path / "adapter")
    other = tiny_model(dtype=torch.float64, plt_num_loops=3, seed=5, intermediate_size=64)
    save_model(other, tmp_path / "other")
    shutil.move(base_dir, tmp_path / "moved")
    with pytest.raises(LoopcoderError, match=r"a LoRA adapter of .*which no longer exists"):
        load_model(adapter_dir)
    shutil.copytree(tmp_path / "other", base_dir)  # a different model where the base was
    with pytest.raises(LoopcoderError, match="has changed since"):
        load_model(adapter_dir)
    shutil.rmtree(base_dir)
    shutil.move(tmp_path / "moved", base_dir)
    load_model(adapter_dir)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    kept = {k: v for k, v in tensors.items() if "layers.0." not in k}
    save_file(kept, str(adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(LoopcoderError, match=r"misses .*layers\.0"):
        load_model(adapter_dir)
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(LoopcoderError, match="truncated or corrupted"):
        load_model(adapter_dir)


# ----------------------------------------------------------------------------- commands
def test_generate_and_eval_take_the_adapter_run_and_export_merge_writes_a_plain_model(tuned, tmp_path, capsys):
    prompt = ["--prompt", "def add(a, b):", "--max-new-tokens", "6", "--threads", "1"]
    assert main(["generate", "--model", str(tuned.run_dir), *prompt]) == 0
    from_adapter = capsys.readouterr().out

    out = tmp_path / "merged"
    assert main(["export", "--model", str(tuned.run_dir), "--out", str(out)]) == 2
    assert "is a LoRA adapter" in capsys.readouterr().err and not out.exists()
    assert main(["export", "--model", str(tuned.run_dir), "--merge", "--out", str(out)]) == 0
    capsys.readouterr()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "modeling_loopcoder.py"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"}
    assert not any(p.name.startswith(".merge-") for p in tmp_path.iterdir())  # the merged copy is cleaned up
    assert main(["generate", "--model", str(out), *prompt]) == 0
    assert capsys.readouterr().out == from_adapter

    results = tmp_path / "results.json"
    args = ["eval", "--model", str(tuned.run_dir), "--tasks", "bpb", "--data", str(data_dir()), "--bpb-rows", "2"]
    assert main([*args, "--out", str(results), "--threads", "1"]) == 0
    bpb = json.loads(results.read_text())["tasks"]["bpb"]["bits_per_byte"]
    assert main([*args[:2], str(out), *args[3:], "--out", str(tmp_path / "merged.json"), "--threads", "1"]) == 0
    assert json.loads((tmp_path / "merged.json").read_text())["tasks"]["bpb"]["bits_per_byte"] == pytest.approx(
        bpb, rel=1e-6
    )


@pytest.mark.slow  # end-to-end: seconds
def test_serving_the_merged_model(tuned, tmp_path):
    merged = write_merged(tuned.final_checkpoint, tmp_path / "merged")
    model, tokenizer = load_for_inference(str(merged))
    ids = [5, 9, 11, 3, 7, 8]
    want = Engine(model, tokenizer, max_batch=1).generate([ids], SamplingParams(max_new_tokens=5))[0]
    assert want.text
    app, scheduler = load_app(str(merged), max_batch=2, model_name="merged")
    with LiveServer(app, scheduler) as server:
        r = httpx.post(
            server.url + "/v1/completions",
            json={"model": "merged", "prompt": ids, "max_tokens": 5, "temperature": 0},
            timeout=60,
        )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want.text
