"""The command line's one style: fast `--help` and `--version` (no torch), every default in `--help`,
one-line errors that name the nearest known option, command or key, and the model and training flags
that are `key=value` overrides by another name."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
import yaml

from loopcoder.cli import COMMANDS, build_parser, command_parser, main
from loopcoder.commands.options import CONFIG_FLAGS, MODEL_FLAGS, TRAINING_FLAGS, config_overrides
from loopcoder.training.config import load_config, valid_keys

HEAVY = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pyarrow", "fastapi", "uvicorn", "lm_eval")


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter (nothing imported yet), with this test run's environment."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_help_version_and_every_parser_import_no_torch():
    """What `loopcoder --help`, `loopcoder CMD --help` and `--version` run, in a fresh interpreter: no
    torch, no transformers (each costs seconds), whatever the command."""
    r = fresh_python(
        f"""
        import contextlib, io, json, sys
        from loopcoder.cli import COMMANDS, main
        calls = [["--help"], ["--version"], ["-V"]] + [[name, "--help"] for name in COMMANDS if name != "lm-eval"]
        calls += [["data", "build", "--help"], ["bench", "decode", "--help"], ["bench", "serve", "--help"]]
        codes = []
        for argv in calls:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    codes.append(main(argv))
                except SystemExit as e:  # argparse's --help
                    codes.append(e.code)
            assert out.getvalue().strip(), argv
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print(json.dumps({{"codes": codes, "heavy": heavy, "calls": len(calls)}}))
        """
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0] * result["calls"]
    assert result["heavy"] == []


def test_version_is_the_installed_package_version(capsys):
    expected = f"loopcoder {importlib.metadata.version('loopcoder')}"
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == expected
    assert main(["-V"]) == 0 and capsys.readouterr().out.strip() == expected
    with pytest.raises(SystemExit) as e:  # argparse's own spelling, as in `loopcoder --help`
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == expected


def option_help(help_text: str, flag: str) -> str:
    """The help of one option in a `--help` page: its lines, joined (argparse wraps long ones)."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\s+(-\w, )?{re.escape(flag)}\b", line))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if re.match(r"\s{2,}-", line) or not line.startswith(" " * 10):
            break
        block.append(line)
    return " ".join(" ".join(block).split())


def all_parsers() -> list[argparse.ArgumentParser]:
    out = []
    for name in COMMANDS:
        if name == "lm-eval":  # lm-eval's own command line
            continue
        parser = command_parser(name)
        out.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                out += list(action.choices.values())
    return out


def shown(default) -> str:
    return ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


def test_help_shows_every_default():
    missing = []
    for parser in all_parsers():
        page = parser.format_help()
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._StoreFalseAction) or (isinstance(default, list) and not default):
                continue
            text = option_help(page, action.option_strings[-1])
            if f"default: {shown(default)}" not in text and "(default" not in text:
                missing.append(f"{parser.prog} {action.option_strings[-1]}: {text!r}")
    assert not missing, "options whose --help does not show the default:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    "argv, flag, default",
    [
        (["generate"], "--max-new-tokens", "128"),
        (["eval"], "--max-new-tokens", "384"),
        (["data", "build"], "--vocab-size", "4096"),
        (["data", "build"], "--seq-len", "512"),
        (["chat"], "--max-new-tokens", "512"),
        (["serve"], "--block-size", "16"),
        (["train"], "--steps", "300"),  # without --config: the dataclass default, shown as such
    ],
)
def test_the_defaults_a_newcomer_looks_for_are_in_help(argv, flag, default, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert f"{default}" in option_help(capsys.readouterr().out, flag).split("default")[-1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["trian"], "loopcoder: error: unknown command 'trian'; did you mean train?"),
        (["train", "--loosp", "2"], "loopcoder train: error: unknown option --loosp; did you mean --loops?"),
        (["generate", "--model", "m", "--max-new-tokns=3"], "--max-new-tokns; did you mean --max-new-tokens?"),
        (["data", "build", "--out", "d", "--vocab-sise", "9"], "--vocab-sise; did you mean --vocab-size?"),
        (["bench", "decode", "--batchs", "1"], "unknown option --batchs; did you mean --batches?"),
        (["generate", "--model", "m", "--qqqqqq"], "unknown option --qqqqqq; `loopcoder generate --help` lists"),
        (["sft", "--config", "tiny", "--init", "x", "--loops", "2"], "unknown option --loops"),  # SFT: --init's shape
        (["train", "--config", "tiny", "loops=2"], "unknown key 'loops'; did you mean model.loops?"),
        (["train", "--config", "tiny", "optim.lrr=1"], "unknown key 'optim.lrr'; did you mean optim.lr?"),
        (["train", "--config", "tiny", "--loops", "2", "model.loops=3"], "--loops and model.loops=... both given"),
        (["train", "--config", "tiny", "--loops", "two"], "argument --loops: invalid int value: 'two'"),
        (["generate"], "the following arguments are required: --model"),
    ],
)
def test_a_bad_command_line_is_one_line_naming_the_nearest_known_word(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits from parse_args
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err


def printed_config(argv: list[str], capsys) -> dict:
    assert main([*argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_train_flags_are_the_config_keys_by_another_name(capsys):
    flags = shlex.split(
        "--loops 2 --hidden-size 64 --layers 3 --heads 8 --kv-heads 2 --intermediate-size 96 --window 16 "
        "--max-positions 2048 --architecture vanilla --data d --seq-len 128 --steps 7 --batch-size 4 "
        "--lr 1e-3 --device cpu --seed 5 --out runs/x"
    )
    keys = shlex.split(
        "model.loops=2 model.hidden_size=64 model.layers=3 model.heads=8 model.kv_heads=2 "
        "model.intermediate_size=96 model.window=16 model.max_position_embeddings=2048 "
        "model.architecture=vanilla data.dir=d data.seq_len=128 train.steps=7 train.global_batch_size=4 "
        "optim.lr=1e-3 train.device=cpu seed=5 out=runs/x"
    )
    by_flag = printed_config(["train", "--config", "tiny", *flags], capsys)
    assert by_flag == printed_config(["train", "--config", "tiny", *keys], capsys)
    assert by_flag == load_config("tiny", keys).to_dict()
    assert by_flag["model"]["loops"] == 2 and by_flag["optim"]["lr"] == 1e-3
    # a flag and key=value for different keys combine; flags left out keep the config's values
    mixed = printed_config(["train", "--config", "tiny", "--loops", "3", "optim.weight_decay=0.05"], capsys)
    assert mixed == load_config("tiny", ["model.loops=3", "optim.weight_decay=0.05"]).to_dict()
    sft = printed_config(["sft", "--config", "tiny", "--init", "runs/x", "--steps", "9", "--out", "o"], capsys)
    assert sft == load_config("tiny", ["train.steps=9", "out=o"], stage="sft", extra={"init": "runs/x"}).to_dict()


def test_plan_takes_the_model_flags(capsys):
    assert main(["plan", "--preset", "tiny", "--loops", "3", "--hidden-size", "256", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["loops"] == 3 and report["config"]["hidden_size"] == 256


def test_one_table_maps_every_flag_onto_a_real_key():
    keys = set(valid_keys())
    assert {f.key for f in CONFIG_FLAGS.values()} <= keys
    assert set(MODEL_FLAGS) | set(TRAINING_FLAGS) == set(CONFIG_FLAGS)
    # every command that shows a table flag maps it back through the same table
    for name, flags in (("train", CONFIG_FLAGS), ("sft", TRAINING_FLAGS), ("plan", MODEL_FLAGS)):
        parser = command_parser(name)
        for flag in flags:
            value = {"--architecture": "vanilla", "--lr": "0.5", "--data": "d", "--out": "o", "--device": "cpu"}.get(
                flag, "3"
            )
            args = parser.parse_args([flag, value])
            [(key, parsed)] = config_overrides(args, []).items()
            assert key == CONFIG_FLAGS[flag].key and str(parsed) == value, (name, flag)
