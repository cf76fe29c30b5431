"""`loopcoder generate`: the completion, streaming, stdin, chat, and one-line errors with exit code 2."""

from __future__ import annotations

import io
import sys

import pytest

from loopcoder.cli import main
from loopcoder.data import tokenizer as T
from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.model.loading import load_for_inference
from support.data import tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("gen"), max_positions=48)[0]


def run_cli(argv, capsys, stdin: str | None = None):
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(argv)
    finally:
        sys.stdin = sys.__stdin__
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_prints_the_engine_completion_and_tokens_per_second(model_dir, capsys):
    code, out, err = run_cli(
        ["generate", "--model", str(model_dir), "--prompt", "def add(a, b):", "--max-new-tokens", "8"], capsys
    )
    assert code == 0 and "tokens/s" in err
    model, tok = load_for_inference(str(model_dir))
    ids = tok("def add(a, b):", add_special_tokens=False)["input_ids"]
    expected = Engine(model, tok).generate([ids], SamplingParams(max_new_tokens=8))[0].text
    assert out == expected + "\n"
    # streaming and stdin give the same text
    code, streamed, _ = run_cli(
        ["generate", "--model", str(model_dir), "--max-new-tokens", "8", "--stream"], capsys, stdin="def add(a, b):"
    )
    assert code == 0 and streamed == expected + "\n"


def test_seeded_sampling_is_reproducible_from_the_cli(model_dir, capsys):
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "x = 1",
        "--max-new-tokens",
        "10",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "3",
    ]
    first, second = run_cli(args, capsys)[1], run_cli(args, capsys)[1]
    assert first == second


def test_chat_wraps_the_prompt_in_the_template_and_stops_at_the_turn_end(model_dir, capsys):
    code, out, _ = run_cli(
        ["generate", "--model", str(model_dir), "--prompt", "hello", "--chat", "--max-new-tokens", "6"], capsys
    )
    model, tok = load_for_inference(str(model_dir))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids[-3:] == tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]
    params = SamplingParams(max_new_tokens=6, stop_token_ids=[T.EOS_ID, T.IM_END_ID])
    expected = Engine(model, tok).generate([list(ids)], params)[0].text
    assert code == 0 and out == expected + "\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "MISSING", "--prompt", "x"], "does not exist"),
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--prompt", "x", "--top-p", "0"], "top_p"),
        (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
        (["--prompt", "x = 1\n" * 40], "maximum is 48"),
        (["--prompt", ""], "prompt is empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "nope") if a == "MISSING" else a for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(model_dir), *argv]
    code, _, err = run_cli(["generate", *argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def test_json_schema_and_regex_constrain_the_output(model_dir, tmp_path, capsys):
    import json

    import jsonschema

    from loopcoder.inference.constraints import Constraint

    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    model, tok = load_for_inference(str(model_dir))
    ids = tok("x = ", add_special_tokens=False)["input_ids"]
    for seed in range(4):
        code, out, _ = run_cli(
            [
                "generate",
                "--model",
                str(model_dir),
                "--prompt",
                "x = ",
                "--json-schema",
                str(path),
                "--max-new-tokens",
                "30",
                "--temperature",
                "1",
                "--seed",
                str(seed),
            ],
            capsys,
        )
        assert code == 0
        jsonschema.validate(json.loads(out), SCHEMA)
        params = SamplingParams(
            max_new_tokens=30, temperature=1.0, seed=seed, constraint=Constraint.json_schema(SCHEMA)
        )
        assert out == Engine(model, tok).generate([ids], params)[0].text + "\n"
    code, out, _ = run_cli(
        [
            "generate",
            "--model",
            str(model_dir),
            "--prompt",
            "x = ",
            "--regex",
            "(yes|no)-[0-9]",
            "--max-new-tokens",
            "10",
        ],
        capsys,
    )
    assert code == 0 and out.strip() in {f"{w}-{d}" for w in ("yes", "no") for d in range(10)}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "--json-schema"),  # no such file
        ("{not json", "not valid JSON"),
        ('{"type": "foo"}', "Invalid type: foo"),
        ('{"type": "integer", "minimum": 5, "maximum": 2}', "minimum"),
    ],
)
def test_a_bad_schema_file_is_one_line_and_exit_2(model_dir, tmp_path, capsys, content, message):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    code, out, err = run_cli(
        ["generate", "--model", str(model_dir), "--prompt", "x", "--json-schema", str(path)], capsys
    )
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and message in lines[0], err
