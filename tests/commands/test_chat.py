"""`loopcoder chat`: turns remembered through the chat template, replies streamed, /reset and /exit, and a
session scripted through a pipe."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from loopcoder.cli import main
from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.model.loading import chat_prompt_ids, chat_stop_ids, load_for_inference
from support.data import tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("chat"), max_positions=256)[0]


class Recorder(io.StringIO):
    """stdout that keeps every write, to see a reply arrive in pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def chat(model_dir, lines: str, capsys, monkeypatch, *flags: str) -> tuple[int, Recorder, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))  # not a terminal: one message per line
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    code = main(["chat", "--model", str(model_dir), "--max-new-tokens", "6", "--show-prompt", *flags])
    return code, out, capsys.readouterr().err


def shown_prompts(err: str) -> list[str]:
    """The prompts `--show-prompt` printed: the text after each `[prompt: N tokens]` line, up to the next note."""
    prompts, current = [], None
    for line in err.splitlines(keepends=True):
        if line.startswith("[prompt: "):
            current = []
            prompts.append(current)
        elif line.startswith("[") and line.rstrip().endswith("]"):
            current = None
        elif current is not None:
            current.append(line)
    return ["".join(p) for p in prompts]


def test_the_second_turn_sees_the_first_and_replies_stream(model_dir, capsys, monkeypatch):
    code, out, err = chat(model_dir, "def add(a, b):\nnow in one line\n", capsys, monkeypatch)
    assert code == 0, err
    replies = out.getvalue().split("\n")[:-1]
    assert len(replies) == 2
    # what the engine answers for the conversation, rendered by the chat template
    model, tok = load_for_inference(str(model_dir))
    params = SamplingParams(max_new_tokens=6, stop_token_ids=chat_stop_ids(model.config.eos_token_id, tok))
    first = [{"role": "user", "content": "def add(a, b):"}]
    first_reply = Engine(model, tok, max_batch=1).generate([chat_prompt_ids(tok, first)], params)[0].text
    second = [*first, {"role": "assistant", "content": first_reply}, {"role": "user", "content": "now in one line"}]
    second_ids = chat_prompt_ids(tok, second)
    second_reply = Engine(model, tok, max_batch=1).generate([second_ids], params)[0].text
    assert replies == [first_reply, second_reply]
    prompts = shown_prompts(err)
    assert len(prompts) == 2
    assert prompts[1] == tok.decode(second_ids) + "\n"  # the whole conversation, as the template renders it
    assert "def add(a, b):" in prompts[1] and first_reply in prompts[1] and prompts[1].startswith(prompts[0][:-1])
    # streamed: the first reply reached stdout in more than one write, before the second prompt was rendered
    assert len([w for w in out.writes if w and w != "\n"]) > 2


def test_reset_forgets_exit_ends_and_system_stays(model_dir, capsys, monkeypatch):
    lines = "first message\n/reset\nsecond message\n/nonsense\n\n/exit\nnever answered\n"
    code, out, err = chat(model_dir, lines, capsys, monkeypatch, "--system", "You write Python.")
    assert code == 0, err
    assert len(out.getvalue().split("\n")[:-1]) == 2  # two replies; nothing after /exit, nothing for blanks
    prompts = shown_prompts(err)
    assert len(prompts) == 2
    assert "first message" in prompts[0] and "first message" not in prompts[1] and "second message" in prompts[1]
    assert all("You write Python." in p for p in prompts)  # the system message survives /reset
    assert "[conversation reset]" in err and "unknown command /nonsense" in err and "never answered" not in err


def test_a_conversation_longer_than_the_context_is_an_error_line_not_the_end(model_dir, capsys, monkeypatch):
    long = "word " * 400  # more tokens than the model's 256 positions
    code, out, err = chat(model_dir, f"{long}\nshort\n", capsys, monkeypatch)
    assert code == 0
    assert "this model's maximum is 256" in err and "/reset starts over" in err
    assert len(out.getvalue().split("\n")[:-1]) == 1  # the short message was still answered
    assert "word" not in shown_prompts(err)[-1]  # and the failed turn was not kept


def test_bad_flags_are_one_line_and_exit_2(model_dir, capsys):
    assert main(["chat", "--model", str(model_dir), "--temperature", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "temperature" in err[0]
    assert main(["chat", "--model", str(model_dir / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_piped_session_in_a_real_process(model_dir):
    """`printf ... | loopcoder chat`: the console script's path, stdin a pipe, stdout only the replies."""
    r = subprocess.run(
        [sys.executable, "-m", "loopcoder", "chat", "--model", str(model_dir), "--max-new-tokens", "4"],
        input="hello\nand again\n",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split("\n")[:-1]) == 2 and ">>>" not in r.stdout
