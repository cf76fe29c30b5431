"""The agent loop: mini-swe-agent's protocol in both forms, its format errors and exits, the budgets,
the trajectory. These unit tests run commands with the tests' own unsandboxed shell in a scratch git
repository; test_runs.py runs the agent in the sandbox on real tasks."""

from __future__ import annotations

import time

import pytest

from loopcoder.swe import repo
from loopcoder.swe.agent import SUBMIT, AgentConfig, Episode, observation
from loopcoder.swe.chat import ContextExceededError, Reply
from loopcoder.swe.shell import CommandResult
from loopcoder.utils.errors import LoopcoderError
from support.swe import LocalShell, ScriptedChat, bash_block, text_reply, tool_reply


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "repo"
    repo.write_tree(ws, {"m.py": "X = 1\n"})
    repo.commit_tree(ws)
    return ws


def episode(workspace, replies, **config) -> tuple[Episode, ScriptedChat, list[dict]]:
    saved: list[dict] = []
    model = ScriptedChat(lambda turn, _: replies[turn] if turn < len(replies) else replies[-1])
    ep = Episode(model, LocalShell(), workspace, "fix X", AgentConfig(**config), save=saved.append)
    return ep, model, saved


def test_tool_calls_run_in_the_workspace_and_submit_ends_the_episode(workspace):
    replies = [
        tool_reply("sed -i 's/1/2/' m.py", "cat m.py"),
        tool_reply(f"echo {SUBMIT}"),
        tool_reply("touch never-run"),
    ]
    ep, model, saved = episode(workspace, replies)
    assert ep.run() == "Submitted"
    assert (workspace / "m.py").read_text() == "X = 2\n" and not (workspace / "never-run").exists()
    roles = [m["role"] for m in ep.messages]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant", "tool", "exit"]
    first_obs = ep.messages[4]
    assert first_obs["tool_call_id"] == "call_1" and "<returncode>0</returncode>" in first_obs["content"]
    assert "X = 2" in first_obs["content"]
    assert ep.messages[2]["tool_calls"][0]["function"]["name"] == "bash"
    assert model.calls[0]["tools"][0]["function"]["name"] == "bash"
    info = ep.trajectory()["info"]
    assert info["exit_status"] == "Submitted" and info["turns"] == 2 and info["commands"] == 3
    assert [c["command"] for c in ep.turns[0]["commands"]] == ["sed -i 's/1/2/' m.py", "cat m.py"]
    assert saved and saved[-1]["info"]["exit_status"] == "Submitted"  # saved after the last turn too


def test_submission_needs_the_first_line_and_exit_status_zero(workspace):
    replies = [
        tool_reply(f"echo {SUBMIT}; false"),
        tool_reply(f"echo hi; echo {SUBMIT}"),
        tool_reply(f"echo {SUBMIT} && echo the rest"),
    ]
    ep, _, _ = episode(workspace, replies)
    assert ep.run() == "Submitted"
    assert len(ep.turns) == 3 and ep.submission == "the rest\n"
    assert ep.messages[-1] == {
        "role": "exit",
        "content": "the rest\n",
        "extra": {"exit_status": "Submitted", "submission": "the rest\n"},
    }


ONE = ("stop", 1, 1, 0, 0.0)  # finish reason, prompt, completion and cached tokens, seconds


def test_tool_format_errors_go_back_as_mini_swe_agent_words_them(workspace):
    replies = [
        tool_reply(),  # no call
        tool_reply(raw_args="{not json"),
        tool_reply("ls"),  # a good step resets the count
        tool_reply(raw_args='{"cmd": "ls"}'),
        Reply(
            None,
            [{"id": "c", "type": "function", "function": {"name": "python", "arguments": "{}"}}],
            "stop",
            1,
            1,
            0,
            0,
        ),
        Reply("I was cut", [], "length", *ONE[1:]),
    ]
    ep, _, _ = episode(workspace, replies)
    assert ep.run() == "RepeatedFormatError"
    errors = [m["content"] for m in ep.messages if m.get("extra", {}).get("interrupt_type") == "FormatError"]
    assert len(errors) == 5
    assert "No tool calls found in the response. Every response MUST include at least one tool call." in errors[0]
    assert "Error parsing tool call arguments" in errors[1]
    assert "Missing 'command' argument in bash tool call." in errors[2]
    assert "Unknown tool 'python'." in errors[3]
    assert "reached the output token limit (finish_reason=length)" in errors[4]
    assert all(e.startswith("Tool call error:") for e in errors[:4])
    assert len(ep.turns) == 6


def test_the_text_form_wants_exactly_one_block(workspace):
    replies = [
        text_reply("THOUGHT: no block"),
        text_reply(bash_block("echo a") + "\n" + bash_block("echo b")),
        text_reply(bash_block("echo hello > out.txt && cat out.txt")),
        text_reply(bash_block(f"echo {SUBMIT}")),
    ]
    ep, model, _ = episode(workspace, replies, protocol="text")
    assert ep.run() == "Submitted"
    assert model.calls[0]["tools"] is None  # no tools in the text form
    assert "```mswea_bash_command" in ep.messages[0]["content"]
    errors = [m["content"] for m in ep.messages if m.get("extra", {}).get("interrupt_type") == "FormatError"]
    assert "found 0 actions" in errors[0] and "found 2 actions" in errors[1]
    obs = next(m for m in ep.messages if m["role"] == "user" and "hello" in m["content"])
    assert "tool_call_id" not in obs and (workspace / "out.txt").read_text() == "hello\n"


def test_turn_and_token_budgets(workspace):
    ep, model, _ = episode(workspace, [tool_reply("true")], max_turns=3)
    assert ep.run() == "LimitsExceeded" and len(model.calls) == 3
    ep, model, _ = episode(workspace, [tool_reply("true")], max_tokens=25, max_new_tokens=20)
    assert ep.run() == "LimitsExceeded"
    assert [c["max_tokens"] for c in model.calls] == [20, 15, 5]  # each reply costs 10 tokens
    assert ep.tokens() == 30 and ep.messages[-1]["role"] == "exit"


def test_wall_time_and_context_end_the_episode(workspace):
    def slow(turn, _):
        time.sleep(0.2)
        return tool_reply("true")

    ep = Episode(ScriptedChat(slow), LocalShell(), workspace, "t", AgentConfig(max_seconds=0.3))
    assert ep.run() == "TimeExceeded" and 1 <= len(ep.turns) <= 2

    def full(turn, _):
        raise ContextExceededError("the conversation has 5000 tokens; the model's context is 4096")

    ep = Episode(ScriptedChat(full), LocalShell(), workspace, "t", AgentConfig())
    assert ep.run() == "ContextExceeded" and "5000 tokens" in ep.messages[-1]["content"]


def test_long_output_is_cut_as_mini_swe_agent_does():
    short = observation(CommandResult("hi\n", "", 0, "passed", 0.1))
    assert short == "<returncode>0</returncode>\n<output>\nhi\n</output>"
    long = observation(CommandResult("x" * 20_000, "", 1, "failed", 0.1))
    assert "<warning>" in long and "10000 characters elided" in long and len(long) < 11_000
    timed = observation(CommandResult("", "", None, "timeout", 5.0, reason="wall-clock limit"))
    assert timed.startswith("<exception>") and "<returncode>-1</returncode>" in timed


def test_bad_settings_are_one_line_errors(workspace):
    for bad in ({"protocol": "xml"}, {"max_turns": 0}, {"max_seconds": 0}, {"max_tokens": True}):
        with pytest.raises(LoopcoderError):
            AgentConfig(**bad).check()
