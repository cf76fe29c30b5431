"""The lm-evaluation-harness backend, end to end on local tasks written here (offline).

Log-likelihoods are checked against the model's own next-token log-probabilities computed here, one
unpadded sequence at a time; greedy and seeded generations against `loopcoder generate`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from importlib.metadata import entry_points

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from loopcoder.cli import main  # noqa: E402
from loopcoder.evaluation.lm_eval_backend import LoopcoderLM  # noqa: E402
from loopcoder.model.loading import load_for_inference  # noqa: E402
from loopcoder.utils.errors import LoopcoderError  # noqa: E402
from support.data import tiny_model_dir  # noqa: E402

GEN_DOCS = [
    {"prompt": "def add(a, b):", "target": "    return a + b"},
    {"prompt": "class Thing:\n    def __init__(self, size):", "target": "        self.size = size"},
    {"prompt": "import os\n\n\ndef total(items):", "target": "    return sum(items)"},
    {"prompt": "x = 1", "target": ""},
]
MC_DOCS = [
    {"question": "def count(items):\n    return", "choices": ["len(items)", "items", "None"], "label": 0},
    {"question": "for i in", "choices": ["range(10):", "x", "print"], "label": 0},
    {"question": "import", "choices": ["os", "sys", "re", "json"], "label": 1},
]
PPL_DOCS = [
    {"text": "def alpha_beta(alpha, beta=None):\n    beta = beta or 3\n    return alpha + beta\n"},
    {"text": 'class Thing1:\n    """A thing number 1."""\n'},
]


def write_tasks(root, cache):
    root.mkdir(parents=True, exist_ok=True)
    common = {"dataset_path": "json", "test_split": "train"}

    def task(name, docs, **fields):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        spec = {
            "task": name,
            **common,
            "dataset_kwargs": {"data_files": str(root / f"{name}.jsonl"), "cache_dir": str(cache)},
            **fields,
        }
        (root / f"{name}.yaml").write_text(json.dumps(spec))  # JSON is YAML

    task(
        "lc_gen",
        GEN_DOCS,
        output_type="generate_until",
        doc_to_text="{{prompt}}",
        doc_to_target="{{target}}",
        generation_kwargs={"until": ["\n\n"], "max_gen_toks": 10, "do_sample": False},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    )
    task(
        "lc_sample",
        GEN_DOCS[:1],
        output_type="generate_until",
        doc_to_text="{{prompt}}",
        doc_to_target="{{target}}",
        generation_kwargs={
            "until": ["\nclass"],
            "max_gen_toks": 10,
            "do_sample": True,
            "temperature": 0.8,
            "top_p": 0.9,
            "seed": 5,
        },
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    )
    task(
        "lc_mc",
        MC_DOCS,
        output_type="multiple_choice",
        doc_to_text="{{question}}",
        doc_to_choice="{{choices}}",
        doc_to_target="{{label}}",
        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    )
    task(
        "lc_ppl",
        PPL_DOCS,
        output_type="loglikelihood_rolling",
        doc_to_text="",
        doc_to_target="{{text}}",
        metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
    )
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmeval")
    model_dir, _ = tiny_model_dir(tmp, max_positions=96)
    tasks = write_tasks(tmp / "tasks", tmp / "hf-cache")
    return model_dir, tasks, tmp


@pytest.fixture(scope="module")
def reference(setup):
    model, tok = load_for_inference(str(setup[0]), dtype="float32")
    return model, tok


def next_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) for every t, from one unpadded forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def evaluate(setup, tasks, **model_args):
    model_dir, task_dir, _ = setup
    args = {"pretrained": str(model_dir), "dtype": "float32", "batch_size": 2, **model_args}
    return lm_eval.simple_evaluate(
        model="loopcoder",
        model_args=args,
        tasks=tasks,
        log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )


@pytest.fixture(scope="module")
def results(setup):
    """One lm-eval run of every local task (the harness's own start-up is the slow part)."""
    return evaluate(setup, ["lc_gen", "lc_sample", "lc_mc", "lc_ppl"])


def test_registered_for_lm_eval_by_decorator_and_entry_point():
    assert get_model("loopcoder") is LoopcoderLM
    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "loopcoder"]
    assert ep.load() is LoopcoderLM


@pytest.mark.slow
def test_loglikelihoods_are_the_models_own_next_token_logprobs(results, reference):
    model, tok = reference
    out = results
    samples = out["samples"]["lc_mc"]
    assert len(samples) == len(MC_DOCS)
    correct = 0
    for s in samples:
        lls = []
        for (context, continuation), ((ll, greedy),) in zip(s["arguments"], s["resps"]):
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            lp = next_token_logprobs(model, whole)[len(ctx) - 1 :]
            assert ll == pytest.approx(float(lp.sum()), abs=1e-4)
            with torch.no_grad():
                argmax = model(torch.tensor([whole])).logits[0, len(ctx) - 1 : -1].argmax(-1)
            assert greedy == bool((argmax == torch.tensor(whole[len(ctx) :])).all())
            lls.append(float(lp.sum()))
        correct += max(range(len(lls)), key=lls.__getitem__) == s["doc"]["label"]
    assert out["results"]["lc_mc"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))


@pytest.mark.slow
@pytest.mark.parametrize("max_length", [None, 16])
def test_rolling_loglikelihood_sums_each_token_once(setup, results, reference, max_length):
    model, tok = reference
    out = results if max_length is None else evaluate(setup, ["lc_ppl"], max_length=max_length)
    for s in out["samples"]["lc_ppl"]:
        (total,) = s["resps"][0]
        ids = tok(s["doc"]["text"], add_special_tokens=False)["input_ids"]
        if max_length is None:  # one window: the whole text after the BOS prefix
            expected = float(next_token_logprobs(model, [tok.bos_token_id, *ids]).sum())
        else:  # disjoint windows, each an unpadded forward here
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tok.bos_token_id, 16, 1)]
            assert sum(len(cont) for _, cont in windows) == len(ids) and len(windows) > 1
            expected = sum(float(next_token_logprobs(model, ctx + cont)[-len(cont) :].sum()) for ctx, cont in windows)
        assert total == pytest.approx(expected, abs=1e-4)


def generate_cli(model_dir, prompt, *extra) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert main(["generate", "--model", str(model_dir), "--prompt", prompt, "--dtype", "float32", *extra]) == 0
    return buf.getvalue()[:-1]  # print's newline


@pytest.mark.slow
def test_greedy_and_seeded_generations_equal_loopcoder_generate(setup, results):
    model_dir = setup[0]
    out = results
    gen = sorted(out["samples"]["lc_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in gen] == [
        generate_cli(model_dir, d["prompt"], "--max-new-tokens", "10", "--stop", "\n\n") for d in GEN_DOCS
    ]
    (sample,) = out["samples"]["lc_sample"]
    expected = generate_cli(
        model_dir,
        GEN_DOCS[0]["prompt"],
        "--max-new-tokens",
        "10",
        "--stop",
        "\nclass",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "5",
    )
    assert sample["resps"][0][0] == expected
    assert expected != generate_cli(model_dir, GEN_DOCS[0]["prompt"], "--max-new-tokens", "10", "--stop", "\nclass")
    em = sum(s["resps"][0][0].strip() == d["target"].strip() for s, d in zip(gen, GEN_DOCS)) / len(GEN_DOCS)
    assert out["results"]["lc_gen"]["exact_match,none"] == pytest.approx(em)


@pytest.mark.slow
def test_the_loopcoder_lm_eval_command_runs_lm_evals_cli(setup, capsys):
    model_dir, task_dir, tmp = setup
    code = main(
        [
            "lm-eval",
            "run",
            "--model",
            "loopcoder",
            "--model_args",
            f"pretrained={model_dir}",
            "--batch_size",
            "3",
            "--tasks",
            "lc_mc",
            "--include_path",
            str(task_dir),
            "--output_path",
            str(tmp / "out"),
        ]
    )
    assert code == 0
    (result,) = list((tmp / "out").rglob("results_*.json"))
    assert "acc,none" in json.loads(result.read_text())["results"]["lc_mc"]


def test_bad_model_args_are_clear_errors(setup):
    with pytest.raises(LoopcoderError, match="does not exist"):
        LoopcoderLM(pretrained=str(setup[2] / "missing"))
    with pytest.raises(LoopcoderError, match="unknown lm-eval model arg"):
        LoopcoderLM(pretrained=str(setup[0]), temprature=1)
    lm = LoopcoderLM(pretrained=str(setup[0]), dtype="float32", max_length=32)
    with pytest.raises(LoopcoderError, match="does not know: nucleus"):
        lm.sampling_params({"until": [], "nucleus": 0.5}, 0)
    assert lm.sampling_params({"max_new_tokens": 5, "temperature": 0.5}, 3).seed == 1234 + 3
    assert lm.sampling_params({"temperature": 0.5, "do_sample": False}, 0).temperature == 0.0


def test_a_tokenizer_of_other_ids_is_refused_unless_the_model_args_allow_it(setup, tmp_path):
    from loopcoder.data import tokenizer as T
    from loopcoder.model.identity import TokenizerMismatch
    from support.training import SRC

    vocab = T.load_raw_tokenizer(setup[0]).get_vocab_size()
    texts = [f.read_text() for f in sorted((SRC / "loopcoder").rglob("*.py"))[:20]]
    T.save_tokenizer(T.train_tokenizer(texts, vocab), tmp_path / "other")  # as many tokens, other ids
    with pytest.raises(TokenizerMismatch, match="the model arg allow_tokenizer_mismatch=true"):
        LoopcoderLM(pretrained=str(setup[0]), tokenizer=str(tmp_path / "other"), dtype="float32")
    lm = LoopcoderLM(
        pretrained=str(setup[0]), tokenizer=str(tmp_path / "other"), dtype="float32", allow_tokenizer_mismatch="true"
    )
    assert lm.tokenizer.get_vocab() == T.load_tokenizer(tmp_path / "other").get_vocab()
