"""What every command's `--model` takes (generate, eval, serve, diagnose): a model directory or a run
directory (its newest checkpoint), and one line with exit status 2 for a broken one."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from loopcoder.cli import main
from support.data import tiny_model_dir
from support.training import run_cli


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A model (vocabulary 400, with its tokenizer), its data directory, and a run directory whose
    newest complete checkpoint is that model (an older one and an unfinished one around it)."""
    tmp = tmp_path_factory.mktemp("model-dirs")
    model, data = tiny_model_dir(tmp, max_positions=64)
    run = tmp / "run"
    for step, complete in ((1, True), (2, True), (3, False)):
        ck = run / "checkpoints" / f"step-{step:06d}"
        shutil.copytree(model, ck)
        if complete:
            (ck / "trainer_state.pt").write_bytes(b"")
            (ck / "checkpoint.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / "step-000001" / "model.safetensors").write_bytes(b"")  # only the newest is read
    (run / "checkpoints" / "latest").write_text("step-000002\n")
    with contextlib.redirect_stdout(io.StringIO()):  # a model of another vocabulary, with its own tokenizer
        assert (
            main(
                [
                    "init",
                    "--out",
                    str(tmp / "big"),
                    "--hidden-size",
                    "32",
                    "--layers",
                    "1",
                    "--heads",
                    "4",
                    "--vocab-size",
                    "1024",
                ]
            )
            == 0
        )
    return {"model": model, "data": data, "run": run, "big": tmp / "big", "tmp": tmp}


def command(name: str, model, d: dict, *extra: str) -> list[str]:
    out = d["tmp"] / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    args = {
        "generate": ["--prompt", "def f(", "--max-new-tokens", "3"],
        "eval": ["--tasks", "bpb", "--data", str(d["data"]), "--bpb-rows", "2", "--out", str(out / "r.json")],
        "serve": ["--port", "0"],
        "diagnose": [
            "--data",
            str(d["data"]),
            "--samples",
            "2",
            "--seq-len",
            "16",
            "--out",
            str(out),
            "--no-plots",
            "--quiet",
        ],
    }[name]
    return [name, "--model", str(model), "--threads", "1", *args, *extra]


def one_line_error(argv: list[str], capsys) -> str:
    if argv[0] == "serve":  # a server that wrongly starts would not return: a process with a time limit
        r = run_cli(argv, timeout=120)
        code, err = r.returncode, r.stderr.strip().splitlines()
    else:
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"loopcoder {argv[0]}: error: "), (code, err)
    return err[0]


COMMANDS = ["generate", "eval", "serve", "diagnose"]


@pytest.mark.parametrize("name", COMMANDS)
def test_a_truncated_weights_file_is_one_line(dirs, tmp_path, capsys, name):
    broken = shutil.copytree(dirs["model"], tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert "truncated or corrupted" in one_line_error(command(name, broken, dirs), capsys)


@pytest.mark.parametrize("name", ["generate", "eval", "diagnose"])
def test_a_run_directory_means_its_newest_checkpoint(dirs, capsys, name):
    capsys.readouterr()
    assert main(command(name, dirs["run"], dirs)) == 0, capsys.readouterr().err


def test_generate_from_a_run_directory_equals_its_checkpoint(dirs, capsys):
    outputs = []
    for model in (dirs["run"], dirs["run"] / "checkpoints", dirs["run"] / "checkpoints" / "step-000002"):
        capsys.readouterr()
        assert main(command("generate", model, dirs)) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("name", COMMANDS)
def test_a_run_without_a_complete_checkpoint_is_named_as_such(dirs, tmp_path, capsys, name):
    run = tmp_path / "fresh-run"
    (run / "checkpoints" / "step-000005").mkdir(parents=True)  # still being written
    message = one_line_error(command(name, run, dirs), capsys)
    assert "no complete checkpoint" in message and "step-N" in message


@pytest.mark.parametrize("name", ["generate", "eval", "serve"])
def test_a_tokenizer_that_does_not_match_the_model_is_refused(dirs, capsys, name):
    # the model's vocabulary (1024) is larger than this tokenizer's (400), far beyond padding: wrong tokenizer
    message = one_line_error(command(name, dirs["big"], dirs, "--tokenizer", str(dirs["model"])), capsys)
    assert "does not match its tokenizer's (400)" in message
    # smaller than the tokenizer's: some tokens have no embedding
    message = one_line_error(command(name, dirs["model"], dirs, "--tokenizer", str(dirs["big"])), capsys)
    assert "(400) is smaller than its tokenizer's (1024)" in message


def test_diagnose_checks_the_tokenizer_against_the_data(dirs, capsys):
    message = one_line_error(command("diagnose", dirs["big"], dirs), capsys)
    assert f"tokenizer mismatch: the data directory {str(dirs['data'])!r}" in message
    assert (
        f"the model {str(dirs['big'])!r} (model_identity.json)" in message and "--allow-tokenizer-mismatch" in message
    )


def test_padding_beyond_the_tokenizer_is_fine():
    from loopcoder.model.loading import check_vocab

    check_vocab(448, 400, "x")  # rounded up to a multiple of 64, as training does
    check_vocab(151936, 151665, "x")  # a released model's padding
    check_vocab(400, 400, "x")


GARBAGE_TOKENIZERS = {
    "random bytes": ("tokenizer.json", b"\x8f\x00garbage\xff" * 40, "not a valid tokenizer.json"),
    "JSON but no tokenizer": ("tokenizer.json", b'{"vocab": [1, 2]}', "not a valid tokenizer.json (no 'model' object)"),
    "a damaged tokenizer_config.json": ("tokenizer_config.json", b"{not json", "cannot load the tokenizer in"),
}


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("case", sorted(GARBAGE_TOKENIZERS))
def test_a_garbage_tokenizer_is_one_line(dirs, tmp_path, capsys, name, case):
    broken = shutil.copytree(dirs["model"], tmp_path / "broken")
    file, content, expected = GARBAGE_TOKENIZERS[case]
    (broken / file).write_bytes(content)
    argv = command(name, broken, dirs)
    if name == "diagnose":  # with a data directory it reads ids, not text: give it text and the tokenizer
        argv = [*argv[: argv.index("--data")], "--data", str(tmp_path / "val.jsonl"), *argv[argv.index("--data") + 2 :]]
        (tmp_path / "val.jsonl").write_text('{"text": "def f(x):\\n    return x + 1\\n"}\n')
    assert expected in one_line_error(argv, capsys)


@pytest.fixture(scope="module")
def same_size(dirs):
    """A tokenizer with as many tokens as the model's but trained on other text (loopcoder's source): other ids."""
    from loopcoder.data import tokenizer as T
    from support.training import SRC

    vocab = T.load_raw_tokenizer(dirs["model"]).get_vocab_size()
    out = dirs["tmp"] / "same-size-tokenizer"
    texts = [f.read_text() for f in sorted((SRC / "loopcoder").rglob("*.py"))[:20]]
    T.save_tokenizer(T.train_tokenizer(texts, vocab), out)
    assert T.load_raw_tokenizer(out).get_vocab_size() == vocab
    return out


@pytest.mark.parametrize("name", ["generate", "eval", "serve"])
def test_a_tokenizer_of_other_ids_is_refused_unless_allowed(dirs, same_size, capsys, name):
    message = one_line_error(command(name, dirs["model"], dirs, "--tokenizer", str(same_size)), capsys)
    assert f"tokenizer mismatch: the tokenizer {str(same_size)!r} has tokenizer" in message
    assert f"the model {str(dirs['model'])!r} (model_identity.json) was made with" in message
    assert "--allow-tokenizer-mismatch" in message
    if name == "generate":  # whoever means it says so
        capsys.readouterr()
        argv = command(name, dirs["model"], dirs, "--tokenizer", str(same_size), "--allow-tokenizer-mismatch")
        assert main(argv) == 0, capsys.readouterr().err


def test_eval_bpb_checks_the_model_against_the_data(dirs, tmp_path, capsys):
    message = one_line_error(command("eval", dirs["big"], dirs, "--tokenizer", str(dirs["big"])), capsys)
    assert f"the data directory {str(dirs['data'])!r} has tokenizer" in message


def test_a_swapped_tokenizer_file_in_a_model_directory_is_refused(dirs, same_size, tmp_path, capsys):
    """The model's own directory holds another tokenizer than the one it was made with (copied over it)."""
    swapped = shutil.copytree(dirs["model"], tmp_path / "swapped")
    shutil.copyfile(same_size / "tokenizer.json", swapped / "tokenizer.json")
    message = one_line_error(command("generate", swapped, dirs), capsys)
    assert f"tokenizer mismatch: {str(swapped)!r} has tokenizer" in message
