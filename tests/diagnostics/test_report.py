"""Reports, plots, the recommendation and the CLI, on tiny checkpoints in the released layout."""

import json
import math

import numpy as np
import pytest
import torch

from loopcoder.cli import main
from loopcoder.diagnostics import DiagnosticsResult, diagnose, load_sequences, recommend, write_report
from loopcoder.diagnostics.report import recommendation_section
from loopcoder.model.checkpoint import load_model, save_model
from loopcoder.model.config import PLTConfig
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.utils.errors import LoopcoderError

CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
    "        self.items.append(x)\n",
    "import os\nprint(os.getcwd())\n# list the files\nfor name in os.listdir('.'):\n    print(name)\n",
]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CODE * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(R, arch="plt"):
    cfg = PLTConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        plt_num_loops=R,
        plt_window_size=[4, 0],
        max_position_embeddings=256,
        loop_architecture=arch,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(R)
    return PLTForCausalLM(cfg)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer):
    """Model directories R = 1..4 in the released layout (R = 2 sharded), with their tokenizer, and data."""
    root = tmp_path_factory.mktemp("diag")
    for R in (1, 2, 3, 4):
        shard = "40KB" if R == 2 else None  # model-0000i-of-0000n.safetensors + index, as released
        save_model(make_model(R), root / f"r{R}", max_shard_size=shard, tokenizer=tokenizer)
    save_model(make_model(2, "vanilla"), root / "vanilla2", tokenizer=tokenizer)
    save_model(make_model(2), root / "notok")  # no tokenizer
    with open(root / "val.jsonl", "w") as f:
        for text in CODE:
            f.write(json.dumps({"text": text, "lang": "python"}) + "\n")
    (root / "val.txt").write_text("".join(CODE * 3))
    return root


def run_cli(*argv):
    return main(["diagnose", *map(str, argv)])


# ----------------------------------------------------------------------------- end to end
def test_released_layout_checkpoints_load(workdir):
    config = json.loads((workdir / "r2" / "config.json").read_text())
    assert config["model_type"] == "iquestpltcoder"
    assert config["architectures"] == ["IQuestPLTCoderForCausalLM"]
    assert (workdir / "r2" / "model.safetensors.index.json").is_file()
    assert len(list((workdir / "r2").glob("model-*-of-*.safetensors"))) > 1
    model = load_model(workdir / "r2")
    assert model.config.plt_num_loops == 2


@pytest.mark.slow
def test_cli_compares_r1_to_r4_in_one_report(workdir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = run_cli(
        "--model",
        workdir / "r1",
        "--model",
        workdir / "r2",
        "--model",
        workdir / "r3",
        "--model",
        workdir / "r4",
        "--data",
        workdir / "val.jsonl",
        "--samples",
        3,
        "--out",
        out,
        "--seq-len",
        24,
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "samples/s" in captured.err and "ETA" in captured.err  # progress
    assert "recommendation: R = " in captured.out
    data = json.loads((out / "diagnostics.json").read_text())
    assert [m["num_loops"] for m in data["models"]] == [1, 2, 3, 4]
    assert [m["name"] for m in data["models"]] == ["r1", "r2", "r3", "r4"]
    r1, r4 = data["models"][0], data["models"][3]
    assert r1["samples"] == 3 and r1["tokens"] <= 3 * 24
    # R = 1: measures that need a second loop say so; loop-1 measures have values
    assert r1["measures"]["step_size"]["per_loop"] == [{"loop": 1, "na": "R = 1: no loop r ≥ 2 to compare"}]
    assert "no loop block" in r1["measures"]["fixed_point_gap"]["per_loop"][0]["na"]
    assert r1["measures"]["effective_rank"]["per_loop"][0]["mean"] > 1
    # R = 4: every applicable cell has a mean and a CI around it
    for key, m in r4["measures"].items():
        for cell in m["per_loop"]:
            if "na" not in cell:
                lo, hi = cell["ci95"]
                assert lo <= cell["mean"] <= hi, (key, cell)
    assert len(r4["per_sample"]["effective_rank"]) == 3 and len(r4["per_sample"]["effective_rank"][0]) == 4
    assert np.array(r4["head_cosine_matrix"]["values"]).shape == (2, 4, 4, 4)
    assert np.array(r4["gate_histogram"]["counts"]).shape[:2] == (2, 4)
    assert data["recommendation"]["loops"] in (1, 2, 3, 4)
    assert data["recommendation"]["loops"] == data["recommendation"]["per_model"]["r4"]  # the largest R decides
    assert set(data["recommendation"]["per_model"]) == {"r1", "r2", "r3", "r4"}
    md = (out / "report.md").read_text()
    assert "## Recommendation: R = " in md and "| measure | model | loop 1 | loop 2 | loop 3 | loop 4 |" in md
    assert "R = 1: no loop r ≥ 2 to compare" in md and "offset cost Ω(r)" in md
    plots = sorted(p.name for p in (out / "plots").iterdir())
    expected = [
        *[f"trajectories_{g}.png" for g in ("hidden", "attention", "output")],
        "scissors.png",
        "gates.png",
        *[f"head_similarity_r{R}.png" for R in (1, 2, 3, 4)],
    ]
    assert plots == sorted(expected)
    for name in plots:
        assert (out / "plots" / name).read_bytes()[:8] == PNG
        assert f"(plots/{name})" in md
    assert sorted(data["plots"]) == [f"plots/{name}" for name in plots]


@pytest.mark.parametrize("R", [1, 2, 3, 4])
@pytest.mark.slow
def test_single_model_report_builds_for_each_r(workdir, tmp_path, R):
    model = load_model(workdir / f"r{R}")
    from transformers import AutoTokenizer

    seqs = load_sequences(workdir / "val.txt", AutoTokenizer.from_pretrained(workdir / f"r{R}"), 16, 3)
    res = diagnose(model, seqs, 3, name=f"r{R}", progress=False)
    out = write_report([res], tmp_path / "out", plots=(R == 1))  # plots for R = 1: the most n/a branches
    md = (out / "report.md").read_text()
    assert f"| r{R} | {R} | plt |" in md
    assert "| measure | loop 1 |" in md  # one model: no model column
    data = json.loads((out / "diagnostics.json").read_text())
    assert data["models"][0]["num_loops"] == R
    if R == 1:
        assert data["recommendation"]["loops"] == 1 and "only R = 1" in data["recommendation"]["reasons"][0]
        assert (out / "plots" / "scissors.png").read_bytes()[:8] == PNG
    else:
        assert len(data["recommendation"]["assessments"][f"r{R}"]) == R - 1


def test_vanilla_model_and_text_data_without_plots(workdir, tmp_path, capsys):
    out = tmp_path / "v"
    rc = run_cli(
        "--model",
        workdir / "vanilla2",
        "--data",
        workdir / "val.txt",
        "--samples",
        2,
        "--out",
        out,
        "--seq-len",
        16,
        "--no-plots",
        "--no-per-sample",
        "--quiet",
    )
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "diagnostics.json").read_text())
    m = data["models"][0]
    assert m["architecture"] == "vanilla" and "per_sample" not in m
    assert m["measures"]["gate"]["per_loop"][1]["na"].startswith("vanilla")
    assert m["measures"]["attention_kl"]["per_loop"][1]["mean"] >= 0
    assert not (out / "plots").exists() and "## Plots" not in (out / "report.md").read_text()
    # a second run replaces the report in place
    rc = run_cli(
        "--model",
        workdir / "vanilla2",
        "--data",
        workdir / "val.txt",
        "--samples",
        1,
        "--out",
        out,
        "--seq-len",
        16,
        "--no-plots",
        "--quiet",
    )
    assert rc == 0 and json.loads((out / "diagnostics.json").read_text())["models"][0]["samples"] == 1


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "case", ["no-model", "no-data", "zero-samples", "bad-seq-len", "out-not-report", "no-tokenizer", "names"]
)
def test_cli_bad_input_exits_2_with_one_line(workdir, tmp_path, capsys, case):
    model, data, samples, out, extra = workdir / "r2", workdir / "val.jsonl", 2, tmp_path / "o", []
    if case == "no-model":
        model = tmp_path / "missing-model"
    elif case == "no-data":
        data = tmp_path / "missing.jsonl"
    elif case == "zero-samples":
        samples = 0
    elif case == "bad-seq-len":
        extra = ["--seq-len", 1]
    elif case == "out-not-report":
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    elif case == "no-tokenizer":
        model = workdir / "notok"
    elif case == "names":
        extra = ["--name", "a", "--name", "b"]
    rc = run_cli("--model", model, "--data", data, "--samples", samples, "--out", out, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("loopcoder diagnose: error: "), err
    if case == "out-not-report":
        assert (out / "precious.txt").read_text() == "keep me"


def test_load_sequences(workdir, tokenizer, tmp_path):
    seqs = load_sequences(workdir / "val.txt", tokenizer, seq_len=10, samples=4)
    assert len(seqs) == 4 and all(len(s) == 10 and s[0] == tokenizer.bos_token_id for s in seqs)
    stream = tokenizer("".join(CODE * 3), add_special_tokens=False)["input_ids"]
    assert seqs[1][1:].tolist() == stream[9:18]  # consecutive windows of the token stream
    recs = load_sequences(workdir / "val.jsonl", tokenizer, seq_len=1000)
    assert len(recs) == len(CODE)
    assert recs[0][1:].tolist() == tokenizer(CODE[0], add_special_tokens=False)["input_ids"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(LoopcoderError, match=r"bad.jsonl:2: .*\"text\""):
        load_sequences(bad, tokenizer)
    with pytest.raises(LoopcoderError, match="not a loopcoder data directory"):
        load_sequences(tmp_path, tokenizer)
    with pytest.raises(LoopcoderError, match="does not exist"):
        load_sequences(tmp_path / "nope.txt", tokenizer)


def test_data_directory_validation_split(workdir, tmp_path, capsys):
    shards = pytest.importorskip("loopcoder.data.shards")
    root = tmp_path / "data"
    index = {
        "format": shards.INDEX_FORMAT,
        "version": shards.INDEX_VERSION,
        "seq_len": 32,
        "dtype": "uint16",
        "vocab_size": 320,
        "eot_id": 2,
        "pad_id": 0,
        "splits": {},
    }
    for split, n in (("train", 2), ("validation", 5)):
        writer = shards.ShardWriter(root, split, 32, 320, eot_id=2)
        for d in range(n * 3):
            writer.add(np.arange(3, 3 + 10 + d) % 320)
        index["splits"][split] = writer.close()
    (root / "index.json").write_text(json.dumps(index))
    seqs = load_sequences(root, None, seq_len=20, samples=3)
    assert len(seqs) == 3 and all(len(s) == 20 for s in seqs)
    assert seqs[0].tolist() == shards.ShardDataset(root, "validation").rows([0])[0, :20].tolist()
    out = tmp_path / "report"
    assert (
        run_cli(
            "--model",
            workdir / "r2",
            "--data",
            root,
            "--samples",
            2,
            "--out",
            out,
            "--seq-len",
            16,
            "--no-plots",
            "--quiet",
        )
        == 0
    ), capsys.readouterr().err
    assert json.loads((out / "diagnostics.json").read_text())["models"][0]["tokens"] == 32


def test_diagnose_rejects_tokens_outside_the_vocabulary():
    with pytest.raises(LoopcoderError, match="vocabulary"):
        diagnose(make_model(2), [torch.tensor([1, 2, 999])], progress=False)


# ----------------------------------------------------------------------------- the rule
def synthetic(R, erank, delta_p=None, kl=None, cos=None, omega=None, n=12, name=None, nll=3.0, nll_noise=0.01):
    """A result whose per-loop means are the given lists (None = n/a), with small per-sample noise."""
    rng = np.random.default_rng(R)

    def col(values, scale):
        a = np.full((n, R), math.nan)
        for r, v in enumerate(values or []):
            if v is not None:
                a[:, r] = v + scale * rng.standard_normal(n)
        return a

    none1 = lambda xs: [None, *xs] if xs is not None else None
    per_sample = {
        "effective_rank": col(erank, 0.05),
        "delta_p": col(none1(delta_p), 0.01),
        "attention_kl": col(none1(kl), 0.01),
        "update_cosine": col(none1(cos), 0.01),
        "offset_cost": col(none1(omega), 0.01),
        "gold_nll": col([nll] * R, nll_noise),
    }
    return DiagnosticsResult(
        name or f"R{R}",
        R,
        "plt",
        {},
        per_sample,
        head_cosine_matrix=np.zeros((1, R, 1, 1)),
        gate_histogram=np.zeros((1, R, 2)),
    )


def test_rule_stops_where_erank_falls_and_names_the_signals():
    # the published R = 4 pattern (erank 174.6 / 172.5 / 158.2 at loops 2-4) with a rise from loop 1
    res = synthetic(
        4,
        erank=[160.0, 174.6, 172.5, 158.2],
        delta_p=[1.75, 0.5, 0.3],
        kl=[1.0, 0.3, 0.2],
        cos=[-0.72, -0.46, 0.04],
        omega=[10.0, 10.2, 10.1],
    )
    rec = recommend([res])
    assert rec.loops == 2
    text = "\n".join(rec.reasons)
    assert "loop 2: erank rises" in text and "loop 3: erank falls" in text
    assert "Δp collapses" in text and "attention KL collapses" in text and "Ω flat" in text
    assert "cos θ = -0.46 < 0" in text
    a3 = rec.assessments["R4"][1]
    assert a3.loop == 3 and not a3.worth_it and a3.stop_signals["omega_flat"] is True


def test_rule_keeps_loops_while_erank_rises_and_flat_erank_uses_the_stop_signals():
    rising = synthetic(
        3, erank=[100.0, 110.0, 120.0], delta_p=[1.0, 0.9], kl=[1.0, 0.9], cos=[0.2, 0.1], omega=[5.0, 7.0]
    )
    rec = recommend([rising])
    assert rec.loops == 3 and "still pays off" in rec.reasons[-1]
    flat_quiet = synthetic(
        3, erank=[100.0, 110.0, 110.0], delta_p=[1.0, 0.9], kl=[1.0, 0.9], cos=[0.2, 0.1], omega=[5.0, 7.0]
    )
    assert recommend([flat_quiet]).loops == 3  # flat erank, no stop signal: still worth it
    flat_loud = synthetic(
        3, erank=[100.0, 110.0, 110.0], delta_p=[1.0, 0.1], kl=[1.0, 0.1], cos=[0.2, -0.5], omega=[5.0, 5.1]
    )
    assert recommend([flat_loud]).loops == 2


def test_rule_across_models_lets_the_largest_r_decide():
    r1 = synthetic(1, erank=[100.0])
    r2 = synthetic(2, erank=[100.0, 110.0], delta_p=[1.0], kl=[1.0], cos=[-0.5])
    r3 = synthetic(
        3, erank=[100.0, 112.0, 105.0], delta_p=[1.0, 0.2], kl=[1.0, 0.2], cos=[-0.5, -0.3], omega=[5.0, 5.1]
    )
    rec = recommend([r1, r2, r3])
    assert rec.loops == 2 and rec.per_model == {"R1": 1, "R2": 2, "R3": 2}
    assert rec.reasons[0].startswith("R3 (R = 3) has the most loops")
    assert any("cross-check R2" in r and "agrees" in r for r in rec.reasons)
    assert "gold NLL" in rec.reasons[-2] and "held-out NLL" in rec.reasons[-1]
    only_r1 = recommend([r1])
    assert only_r1.loops == 1 and "only R = 1" in only_r1.reasons[0]


def test_headline_says_when_held_out_nll_disagrees_with_the_rule_and_which_to_believe():
    """The issue's case: the rule says R = 2 while R = 2's held-out NLL is worse than R = 1's (5.458 vs 5.022)."""
    rising = dict(erank=[100.0, 110.0], delta_p=[1.0], kl=[1.0], cos=[0.3])
    r1 = synthetic(1, erank=[100.0], nll=5.022)
    r2 = synthetic(2, **rising, nll=5.458)
    rec = recommend([r1, r2])
    assert rec.loops == 2 and rec.held_out.agrees is False and rec.held_out.best == "R1"
    assert (
        rec.headline
        == "R = 2 by the loop rule, but held-out NLL disagrees: R = 1 (R1) is better. Believe the held-out NLL"
    )
    assert "5.022 against 5.458 nats/token" in rec.held_out.message
    assert "(distinguishable from noise)" in rec.held_out.message
    assert rec.reasons[-1] == rec.held_out.message
    md = "\n".join(recommendation_section(rec))  # report.md's section
    assert "## Recommendation: R = 2 by the loop rule; held-out NLL favours R = 1" in md
    assert "**Warning: held-out NLL disagrees with the rule: R1 (R = 1) has a lower final-loop NLL" in md
    data = json.loads(json.dumps(rec.to_dict()))  # diagnostics.json's recommendation
    assert data["held_out"]["agrees"] is False and data["headline"] == rec.headline

    agrees = recommend([r1, synthetic(2, **rising, nll=4.5)])
    assert agrees.held_out.agrees is True and agrees.headline == "R = 2" and "agrees" in agrees.reasons[-1]
    noisy = recommend([synthetic(1, erank=[100.0], nll=5.0, nll_noise=1.0), synthetic(2, **rising, nll=5.05)])
    assert noisy.held_out.agrees is None and noisy.headline == "R = 2"
    assert "does not separate them" in noisy.held_out.message
    falls = dict(erank=[100.0, 112.0, 105.0], delta_p=[1.0, 0.2], kl=[1.0, 0.2], cos=[-0.5, -0.3], omega=[5.0, 5.1])
    unchecked = recommend([r1, synthetic(3, **falls, nll=4.0)])  # the rule says 2; no R = 2 model
    assert unchecked.loops == 2 and unchecked.held_out.agrees is None
    assert "cannot check R = 2: no such model was diagnosed" in unchecked.held_out.message
    assert recommend([r2]).held_out is None  # one model: nothing to compare


def test_the_held_out_check_of_one_sample_has_no_interval_and_the_json_stays_valid():
    rising = dict(erank=[100.0, 110.0], delta_p=[1.0], kl=[1.0], cos=[0.3])
    rec = recommend([synthetic(1, erank=[100.0], nll=5.0, n=1), synthetic(2, **rising, nll=5.5, n=1)])
    assert rec.held_out.agrees is None  # one sample cannot separate them
    data = json.loads(json.dumps(rec.to_dict(), allow_nan=False))
    assert data["held_out"]["difference"]["ci95"] == [None, None]
    assert "(one sample: no interval)" in rec.held_out.message and "nan" not in rec.held_out.message
