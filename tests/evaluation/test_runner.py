"""`loopcoder eval`: the task pipeline end to end, scoring, resume, and bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from loopcoder.cli import main
from loopcoder.evaluation import humaneval, runner, tasks
from loopcoder.evaluation.tasks import EvalSettings, wilson_interval
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.progress import Progress
from support.data import tiny_model_dir


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("eval"), max_positions=1024)


def fake_complete(answer_of):
    """A stand-in for the engine that answers every prompt with `answer_of(prompt)` and counts calls."""
    calls = []

    def complete(engine, tokenizer, prompts, params, label="", quiet=False, progress=None):
        calls.append(len(prompts))
        return [{"text": answer_of(p), "tokens": 1, "finish_reason": "stop", "skipped": None} for p in prompts]

    complete.calls = calls
    return complete


def test_full_run_on_a_tiny_model(model_and_data, tmp_path):
    model_dir, data = model_and_data
    out = tmp_path / "results.json"
    s = EvalSettings(
        n_samples=2,
        ks=(1, 2),
        temperature=0.8,
        humaneval_limit=3,
        humaneval_max_new_tokens=16,
        reasoning_n=4,
        reasoning_steps=(1, 2),
        reasoning_styles=("cruxeval",),
        bpb_rows=4,
    )
    res = runner.evaluate(
        str(model_dir), ["humaneval", "reasoning", "bpb"], s, str(out), data_dir=str(data), allow_code_execution=True
    )
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["loops"] == 2 and saved["prompt_style"] == "completion"
    he = saved["tasks"]["humaneval"]
    assert he["problems_total"] == 3 and set(he["pass_at_k"]) == {"pass@1", "pass@2"}
    assert all(len(p["completions"]) == 2 and len(p["statuses"]) == 2 for p in he["problems"].values())
    assert {"network", "pid namespace", "interpreter"} <= set(he["sandbox"])
    rs = saved["tasks"]["reasoning"]["styles"]
    assert set(rs) == {"completion", "cruxeval"} and set(rs["completion"]["by_steps"]) == {"1", "2"}
    assert rs["completion"]["by_steps"]["1"]["n"] == 4
    assert saved["versions"]["torch"] == torch.__version__ and saved["identity"]["config_hash"]
    # bits per byte agrees with a direct computation on the same rows
    from loopcoder.data.shards import ShardDataset
    from loopcoder.model.loading import load_for_inference
    from loopcoder.model.modeling import causal_lm_loss

    model, _ = load_for_inference(str(model_dir))
    ds = ShardDataset(data, "validation")
    rows = ds.rows(range(4))
    with torch.no_grad():
        nll = float(causal_lm_loss(model(torch.from_numpy(rows)).logits, torch.from_numpy(rows), reduction="sum"))
    expected = nll / math.log(2) / int(ds.target_bytes(rows).sum())
    assert res["tasks"]["bpb"]["bits_per_byte"] == pytest.approx(expected, rel=1e-5)
    assert "humaneval: pass@1" in runner.summary_table(res)


def test_canonical_solutions_score_full_marks(model_and_data, tmp_path, monkeypatch):
    """The scoring path from completion to pass@k: canonical bodies pass, and pass@k is exact."""
    model_dir, _ = model_and_data
    problems = {p["prompt"]: p for p in humaneval.load_problems()[:4]}
    monkeypatch.setattr(tasks, "complete", fake_complete(lambda prompt: problems[prompt]["canonical_solution"]))
    s = EvalSettings(humaneval_limit=4)
    res = runner.evaluate(str(model_dir), ["humaneval"], s, str(tmp_path / "r.json"), allow_code_execution=True)
    assert res["tasks"]["humaneval"]["pass_at_k"]["pass@1"] == 1.0
    monkeypatch.setattr(tasks, "complete", fake_complete(lambda prompt: "    return None\n"))
    res = runner.evaluate(str(model_dir), ["humaneval"], s, str(tmp_path / "r2.json"), allow_code_execution=True)
    assert res["tasks"]["humaneval"]["pass_at_k"]["pass@1"] == 0.0


def test_reasoning_scores_exact_answers(model_and_data, tmp_path, monkeypatch):
    from loopcoder.data import reasoning

    model_dir, _ = model_and_data
    examples = reasoning.generate_examples(6, 3, seed=EvalSettings().reasoning_seed, split="eval")
    by_prompt = {reasoning.format_prompt(e, "completion"): e for e in examples}
    # right answers for the first half, a wrong one for the rest
    answers = {p: (e["answer"] if i < 3 else "wrong") for i, (p, e) in enumerate(by_prompt.items())}
    monkeypatch.setattr(tasks, "complete", fake_complete(lambda prompt: answers[prompt] + "\n"))
    s = EvalSettings(reasoning_n=6, reasoning_steps=(3,))
    res = runner.evaluate(str(model_dir), ["reasoning"], s, str(tmp_path / "r.json"))
    row = res["tasks"]["reasoning"]["styles"]["completion"]["by_steps"]["3"]
    assert (row["correct"], row["n"], row["accuracy"]) == (3, 6, 0.5)
    assert row["ci95"] == pytest.approx(list(wilson_interval(3, 6)))
    assert row["ci95"] == pytest.approx([0.187616, 0.812384], abs=1e-6)  # Wilson 95 % for 3/6, by hand


def test_interrupted_evaluation_resumes_without_redoing_problems(model_and_data, tmp_path, monkeypatch):
    model_dir, _ = model_and_data
    out = tmp_path / "r.json"
    s = EvalSettings(humaneval_limit=4, chunk=2)
    fake = fake_complete(lambda prompt: "    return None\n")
    monkeypatch.setattr(tasks, "complete", fake)
    real_evaluate = humaneval.evaluate

    def flaky(*a, **k):
        if len(fake.calls) == 2:
            raise KeyboardInterrupt  # killed while scoring the second chunk
        return real_evaluate(*a, **k)

    monkeypatch.setattr(humaneval, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(str(model_dir), ["humaneval"], s, str(out), allow_code_execution=True)
    assert len(json.loads(out.read_text())["tasks"]["humaneval"]["problems"]) == 2
    monkeypatch.setattr(humaneval, "evaluate", real_evaluate)
    fake.calls.clear()
    res = runner.evaluate(str(model_dir), ["humaneval"], s, str(out), allow_code_execution=True)
    assert fake.calls == [2]  # only the two unfinished problems were generated again
    assert res["tasks"]["humaneval"]["problems_total"] == 4 and res["complete"]


def test_resume_refuses_different_settings(model_and_data, tmp_path):
    model_dir, _ = model_and_data
    out = tmp_path / "r.json"
    runner.evaluate(str(model_dir), ["reasoning"], EvalSettings(reasoning_n=2, reasoning_steps=(1,)), str(out))
    with pytest.raises(Exception, match="temperature"):
        runner.evaluate(
            str(model_dir), ["reasoning"], EvalSettings(reasoning_n=2, reasoning_steps=(1,), temperature=0.5), str(out)
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "MISSING", "--tasks", "reasoning"], "does not exist"),
        (["--tasks", "humaneval,mbpp"], "unknown task 'mbpp'"),
        (["--tasks", "humaneval", "--allow-code-execution", "--n-samples", "2", "--k", "1,5"], "pass@5"),
        (["--tasks", "humaneval"], "--allow-code-execution"),
        (["--tasks", "bpb"], "--data"),
        (["--tasks", "reasoning", "--temperature", "-1"], "temperature"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_and_data, tmp_path, capsys, argv, message):
    model_dir, _ = model_and_data
    args = ["eval", "--model", str(model_dir), "--out", str(tmp_path / "r.json"), *argv]
    if "MISSING" in argv:
        args = [
            "eval",
            *[str(tmp_path / "nope") if a == "MISSING" else a for a in argv],
            "--out",
            str(tmp_path / "r.json"),
        ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_corrupt_results_file_is_a_clear_error(model_and_data, tmp_path, capsys):
    model_dir, _ = model_and_data
    out = tmp_path / "r.json"
    out.write_text("{not json")
    assert (
        main(["eval", "--model", str(model_dir), "--tasks", "reasoning", "--reasoning-n", "1", "--out", str(out)]) == 2
    )
    assert "cannot resume" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--model",
                str(model_dir),
                "--tasks",
                "reasoning",
                "--reasoning-n",
                "1",
                "--reasoning-steps",
                "1",
                "--out",
                str(out),
                "--fresh",
            ]
        )
        == 0
    )


def test_answer_nll_is_teacher_forced_and_independent_of_batching(model_and_data):
    from loopcoder.evaluation.generation import answer_nll, encode_prompt
    from loopcoder.model.loading import load_for_inference

    model_dir, _ = model_and_data
    model, tok = load_for_inference(str(model_dir))
    prompts = ["x = 1\nprint(x)\n# Output: ", "def f():\n    return 2\n"]
    answers = ["1", "    pass"]
    batched = answer_nll(model, tok, prompts, answers, batch_size=2)
    alone = [answer_nll(model, tok, [p], [a])[0] for p, a in zip(prompts, answers)]
    assert batched == pytest.approx(alone, rel=1e-4)
    p, a = encode_prompt(tok, prompts[0]), tok(answers[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([p + a])).logits[0].log_softmax(-1)
    manual = -sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(a))
    assert batched[0] == pytest.approx(manual, rel=1e-4)


def test_the_resume_error_names_each_setting_that_differs_old_to_new(model_and_data, tmp_path):
    model_dir, _ = model_and_data
    out = tmp_path / "r.json"
    s = dict(reasoning_n=2, reasoning_steps=(1,))
    runner.evaluate(str(model_dir), ["reasoning"], EvalSettings(**s), str(out))
    with pytest.raises(LoopcoderError) as e:
        runner.evaluate(str(model_dir), ["reasoning"], EvalSettings(**s, temperature=0.5, seed=3), str(out))
    message = str(e.value)
    assert "(seed 0 -> 3; temperature 0.0 -> 0.5)" in message and "--fresh" in message
    assert "\n" not in message and "{" not in message  # one line, no settings dicts


def test_bits_per_byte_shows_progress_and_is_kept_on_resume(model_and_data, tmp_path, monkeypatch, capsys):
    model_dir, data = model_and_data
    out = tmp_path / "r.json"
    s = EvalSettings(bpb_rows=4)
    first = runner.evaluate(str(model_dir), ["bpb"], s, str(out), data_dir=str(data))
    assert "  bits per byte: 4/4 rows" in capsys.readouterr().err  # its progress line
    seconds = first["timings"]["bpb"]

    def no_second_pass(*a, **k):
        raise AssertionError("bits per byte measured again")

    monkeypatch.setattr(runner, "bits_per_byte", no_second_pass)
    for _ in range(2):  # a finished evaluation run again, twice
        again = runner.evaluate(str(model_dir), ["bpb"], s, str(out), data_dir=str(data))
        assert again["tasks"]["bpb"] == first["tasks"]["bpb"]
        assert again["timings"]["bpb"] == seconds  # not added up across runs
    assert "bits per byte: " in capsys.readouterr().err
    # the same path rebuilt with other contents is measured again
    monkeypatch.undo()
    rebuilt = tmp_path / "data"
    shutil.copytree(data, rebuilt)
    runner.evaluate(str(model_dir), ["bpb"], s, str(tmp_path / "r2.json"), data_dir=str(rebuilt))
    index = json.loads((rebuilt / "index.json").read_text())
    (rebuilt / "index.json").write_text(json.dumps({**index, "note": "rebuilt"}))
    calls = []
    monkeypatch.setattr(runner, "bits_per_byte", lambda *a, **k: calls.append(1) or tasks.bits_per_byte(*a, **k))
    runner.evaluate(str(model_dir), ["bpb"], s, str(tmp_path / "r2.json"), data_dir=str(rebuilt))
    assert calls == [1]


def test_one_progress_line_covers_the_whole_task_across_chunks(model_and_data, tmp_path, monkeypatch):
    model_dir, _ = model_and_data
    seen = []
    real = Progress.update

    def spy(self, done, amount=None, **kw):
        seen.append((self.label, self.total, done))
        return real(self, done, amount, **kw)

    monkeypatch.setattr(Progress, "update", spy)
    s = EvalSettings(humaneval_limit=4, chunk=2, humaneval_max_new_tokens=4, n_samples=2)
    runner.evaluate(str(model_dir), ["humaneval"], s, str(tmp_path / "r.json"), allow_code_execution=True)
    lines = [x for x in seen if "humaneval" in x[0]]
    assert {label for label, _, _ in lines} == {"  humaneval"}
    assert {total for _, total, _ in lines} == {8}  # 4 problems x 2 samples: the ETA's total is the task's
    counts = [done for _, _, done in lines]
    assert counts == sorted(counts) and counts[-1] == 8 and 2 < counts[len(counts) // 2] < 8


def test_limit_is_the_one_limit_and_humaneval_limit_its_deprecated_name(model_and_data, tmp_path, monkeypatch, capsys):
    model_dir, _ = model_and_data
    monkeypatch.setattr(tasks, "complete", fake_complete(lambda prompt: "    return None\n"))
    base = ["eval", "--model", str(model_dir), "--tasks", "humaneval", "--allow-code-execution"]
    assert main([*base, "--limit", "2", "--out", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["tasks"]["humaneval"]["problems_total"] == 2
    assert "deprecated" not in capsys.readouterr().err
    assert main([*base, "--humaneval-limit", "3", "--out", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["tasks"]["humaneval"]["problems_total"] == 3
    assert "--humaneval-limit is deprecated: use --limit N" in capsys.readouterr().err
    assert main([*base, "--limit", "2", "--humaneval-limit", "3", "--out", str(tmp_path / "c.json")]) == 2
    assert "give --limit alone" in capsys.readouterr().err
    assert main([*base, "--limit", "0", "--out", str(tmp_path / "c.json")]) == 2
