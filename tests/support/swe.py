"""Helpers for the SWE harness's tests: an unsandboxed shell for the agent loop's unit tests (the
package itself offers none), scripted chat models (an oracle that applies the gold patch through
shell commands, a no-op agent, a hostile one), and a tool-call reply builder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loopcoder.swe.agent import SUBMIT
from loopcoder.swe.chat import Reply
from loopcoder.swe.shell import CommandResult

# The test task set: small, quick modules; html gives the two-file tasks.
TEST_MODULES = "colorsys,getopt,html"


class LocalShell:
    """`bash -c` on the host, in the workspace: for unit tests of the agent loop only, never a default."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def __call__(self, command: str, workspace: Path, *, timeout: float | None = None, stdin: str | None = None):
        self.commands.append(command)
        t0 = time.perf_counter()
        env = {"PATH": os.environ["PATH"], "HOME": str(workspace), "LC_ALL": "C.UTF-8"}
        proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=workspace,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(stdin or "", timeout=timeout or 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return CommandResult(out, err, None, "timeout", time.perf_counter() - t0, reason="timed out")
        status = "passed" if proc.returncode == 0 else "failed"
        return CommandResult(out, err, proc.returncode, status, time.perf_counter() - t0)


def tool_reply(*commands: str, content: str | None = "THOUGHT: next step", raw_args: str | None = None) -> Reply:
    """A reply that calls the bash tool once per command (`raw_args`: one call with these arguments as is)."""
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": "bash", "arguments": json.dumps({"command": c})}}
        for i, c in enumerate(commands)
    ]
    if raw_args is not None:
        calls = [{"id": "call_x", "type": "function", "function": {"name": "bash", "arguments": raw_args}}]
    return Reply(content, calls, "tool_calls" if calls else "stop", 100, 10, 0, 0.001)


def text_reply(text: str, finish_reason: str = "stop") -> Reply:
    return Reply(text, [], finish_reason, 100, 10, 0, 0.001)


def bash_block(command: str) -> str:
    return f"THOUGHT: run it\n\n```mswea_bash_command\n{command}\n```"


class ScriptedChat:
    """A chat model whose replies come from `script(call, messages)` (`call` counts every call it has
    answered, over episodes); it records what it was sent."""

    def __init__(self, script: Callable[[int, list[dict[str, Any]]], Reply], name: str = "scripted") -> None:
        self.name = name
        self.script = script
        self.calls: list[dict[str, Any]] = []

    def chat(self, messages, tools, *, max_tokens: int, seed: int) -> Reply:
        self.calls.append({"messages": [dict(m) for m in messages], "tools": tools, "max_tokens": max_tokens})
        return self.script(len(self.calls) - 1, messages)


def oracle(instances: dict[str, dict[str, Any]]) -> ScriptedChat:
    """Applies the task's gold patch through shell commands (a here-document into `git apply`), then submits.
    It finds its task from the problem statement in the first user message."""

    def script(turn: int, messages: list[dict[str, Any]]) -> Reply:
        task = next(t for t in instances.values() if t["problem_statement"] in messages[1]["content"])
        if len(messages) == 2:  # the episode's first turn
            return tool_reply(f"git apply --whitespace=nowarn <<'GOLD_PATCH_EOF'\n{task['patch']}GOLD_PATCH_EOF")
        return tool_reply(f"echo {SUBMIT}")

    return ScriptedChat(script, "oracle")


def noop() -> ScriptedChat:
    """Looks around and submits without changing anything."""
    return ScriptedChat(lambda _, m: tool_reply("ls && git status" if len(m) == 2 else f"echo {SUBMIT}"), "no-op")
