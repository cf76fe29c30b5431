"""The agent: mini-swe-agent's protocol (2.4.6), in both of its forms, on a loopcoder chat model.

One bash action per step, run in the sandboxed workspace; its output comes back as the next message.

- `tool`: the model calls the `bash` tool (mini-swe-agent's `BASH_TOOL`); every call of a reply runs,
  and each result goes back as a `tool` message with its call id.
- `text`: for models without tool calling, the reply must hold exactly one ```mswea_bash_command
  block (mini-swe-agent's `action_regex`); its result goes back as a user message.

A reply without a valid action gets mini-swe-agent's format-error message and the episode goes on;
three in a row end it (`RepeatedFormatError`). A command whose output starts with the line
`COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT` and that exits with status 0 ends the episode (`Submitted`).
So do the budgets: turns (model calls), tokens (generated over the episode), wall time, and the model's
context (`LimitsExceeded`, `TimeExceeded`, `ContextExceeded`). The messages keep mini-swe-agent's
layout (an `extra` dict per message with the action, output, timings and token counts) and the
trajectory, saved after every turn, ends with an `exit` message as its does.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loopcoder.swe.chat import ChatModel, ContextExceededError, Reply
from loopcoder.swe.settings import AgentConfig
from loopcoder.swe.shell import CommandResult, Shell

SUBMIT = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
ACTION_REGEX = r"```mswea_bash_command\s*\n(.*?)\n```"  # mini-swe-agent's LitellmTextbasedModelConfig
BASH_TOOL = {  # mini-swe-agent's models/utils/actions_toolcall.py
    "type": "function",
    "function": {
        "name": "bash",
        "description": "Execute a bash command",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "The bash command to execute"}},
            "required": ["command"],
        },
    },
}
OUTPUT_LIMIT = 10_000  # characters of output shown in full; longer ones show head and tail (mini's template)
SYSTEM_TEMPLATE = {
    "tool": "You are a helpful assistant that can interact with a computer shell to solve programming tasks.",
    "text": (
        "You are a helpful assistant that can interact multiple times with a computer shell to solve "
        "programming tasks.\nYour response must contain exactly ONE bash code block with ONE command (or "
        "commands connected with && or ||).\n\nInclude a THOUGHT section before your command where you "
        "explain your reasoning process.\nFormat your response as shown in <format_example>.\n\n"
        "<format_example>\nTHOUGHT: Your reasoning and analysis here\n\n```mswea_bash_command\n"
        "your_command_here\n```\n</format_example>\n\nFailure to follow these rules will cause your "
        "response to be rejected."
    ),
}
_ACTION_WORDS = {
    "tool": 'Call the bash tool with your command as the argument: {"command": "your_command_here"}.',
    "text": "Write exactly one bash code block:\n\n```mswea_bash_command\nyour_command_here\n```",
}
INSTANCE_TEMPLATE = """<pr_description>
Consider the following PR description:
{task}
</pr_description>

<instructions>
You're a software engineer interacting continuously with a computer by submitting commands.
Make changes to non-test files in the current directory (a git repository) to fix the issue described in
the PR description, in a way that is general and consistent with the codebase. Do not modify the tests.

For each response, explain your reasoning in a THOUGHT section, then issue ONE command. {action}
Every command runs in a new subshell: directory and environment variable changes do not persist.
The system executes your command and shows you its output; then you write your next command.

Recommended workflow: find and read the relevant code; write a script that reproduces the issue;
edit the source code; run your script again to check the fix; check edge cases.

When you are done, submit with this exact command, on its own:

echo {submit}

You cannot continue working on this task after submitting. Your changes to the repository are the patch.
</instructions>"""
FORMAT_ERROR = {
    "tool": (
        "Tool call error:\n\n<error>\n{error}\n</error>\n\nHere is general guidance on how to submit correct "
        "toolcalls:\n\nEvery response needs to use the 'bash' tool at least once to execute commands.\n\nCall "
        'the bash tool with your command as the argument:\n- Tool: bash\n- Arguments: {{"command": '
        '"your_command_here"}}\n\nIf you have completed your assignment, please consult the first message '
        "about how to submit your solution (you will not be able to continue working on this task after that)."
    ),
    "text": (
        "Format error:\n\n<error>\n{error}\n</error>\n\nHere is general guidance on how to format your "
        "response:\n\nPlease always provide EXACTLY ONE action in triple backticks, found {n} actions.\n\n"
        "Please format your action in triple backticks as shown in <response_example>.\n\n<response_example>\n"
        "Here are some thoughts about why you want to perform the action.\n\n```mswea_bash_command\n<action>\n"
        "```\n</response_example>\n\nIf you have completed your assignment, please consult the first message "
        "about how to submit your solution (you will not be able to continue working on this task after that)."
    ),
}
CUT_OFF = (
    "Your previous response reached the output token limit (finish_reason={reason}) before you produced "
    "{what}, so it was cut off. Respond more concisely and provide exactly one action in the required "
    "format. If you need to think more, do so briefly."
)


class FormatError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def observation(result: CommandResult) -> str:
    """The command's output as mini-swe-agent's SWE-bench observation template shows it."""
    out = result.output
    head = ""
    if result.status == "timeout":
        head = f"<exception>The command timed out ({result.reason})</exception>\n"
    elif result.status not in ("passed", "failed"):
        head = f"<exception>{result.reason}</exception>\n"
    code = result.returncode if result.returncode is not None else -1
    if len(out) < OUTPUT_LIMIT:
        return f"{head}<returncode>{code}</returncode>\n<output>\n{out}</output>"
    return (
        f"{head}<returncode>{code}</returncode>\n<warning>\nThe output of your last command was too long.\n"
        "Please try a different command that produces less output.\nIf you're looking at a file you can try "
        "use head, tail or sed to view a smaller number of lines selectively.\nIf you're using grep or find "
        "and it produced too much output, you can use a more selective search pattern.\n</warning>\n"
        f"<output_head>\n{out[:5000]}\n</output_head>\n<elided_chars>\n{len(out) - 10000} characters elided\n"
        f"</elided_chars>\n<output_tail>\n{out[-5000:]}\n</output_tail>"
    )


def parse_actions(reply: Reply, protocol: str) -> list[dict[str, Any]]:
    """The reply's commands (`{"command", "tool_call_id"?}`), or FormatError with mini-swe-agent's message."""
    cut = reply.finish_reason == "length"
    if protocol == "text":
        actions = [a.strip() for a in re.findall(ACTION_REGEX, reply.content or "", re.DOTALL)]
        if len(actions) != 1:
            if cut:
                raise FormatError(CUT_OFF.format(reason=reply.finish_reason, what="a complete action"))
            error = f"Expected exactly 1 action, found {len(actions)}."
            raise FormatError(FORMAT_ERROR["text"].format(error=error, n=len(actions)))
        return [{"command": actions[0]}]
    if not reply.tool_calls:
        if cut:
            raise FormatError(CUT_OFF.format(reason=reply.finish_reason, what="a tool call"))
        error = "No tool calls found in the response. Every response MUST include at least one tool call."
        raise FormatError(FORMAT_ERROR["tool"].format(error=error))
    actions = []
    for call in reply.tool_calls:
        error = ""
        args: Any = {}
        try:
            args = json.loads(call["function"]["arguments"])
        except (ValueError, TypeError, KeyError) as e:
            error = f"Error parsing tool call arguments: {e}."
        if call.get("function", {}).get("name") != "bash":
            error += f"Unknown tool '{call.get('function', {}).get('name')}'."
        if not isinstance(args, dict) or not isinstance(args.get("command"), str):
            error += "Missing 'command' argument in bash tool call."
        if error:
            raise FormatError(FORMAT_ERROR["tool"].format(error=error.strip()))
        actions.append({"command": args["command"], "tool_call_id": call.get("id")})
    return actions


class Episode:
    """One task, one agent: `run()` returns the exit status; `messages` and `turns` are the trajectory."""

    def __init__(
        self,
        model: ChatModel,
        shell: Shell,
        workspace: Path,
        task: str,
        config: AgentConfig,
        save: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.model, self.shell, self.workspace, self.config = model, shell, workspace, config.check()
        self.save = save
        self.tools = [BASH_TOOL] if config.protocol == "tool" else None
        action = _ACTION_WORDS[config.protocol]
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_TEMPLATE[config.protocol]},
            {
                "role": "user",
                "content": INSTANCE_TEMPLATE.format(task=task, action=action, submit=SUBMIT),
            },
        ]
        self.turns: list[dict[str, Any]] = []
        self.exit_status = ""
        self.submission = ""
        self.started = time.time()
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ totals
    def tokens(self) -> int:
        return sum(t["completion_tokens"] for t in self.turns)

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def run(self) -> str:
        cfg = self.config
        format_errors = 0
        while True:
            if len(self.turns) >= cfg.max_turns or self.tokens() >= cfg.max_tokens:
                return self._finish("LimitsExceeded")
            if self.elapsed() >= cfg.max_seconds:
                return self._finish("TimeExceeded")
            budget = min(cfg.max_new_tokens, cfg.max_tokens - self.tokens())
            try:
                reply = self.model.chat(self.messages, self.tools, max_tokens=budget, seed=cfg.seed + len(self.turns))
            except ContextExceededError as e:
                return self._finish("ContextExceeded", str(e))
            turn = {
                "turn": len(self.turns) + 1,
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "cached_tokens": reply.cached_tokens,
                "model_seconds": round(reply.seconds, 4),
                "finish_reason": reply.finish_reason,
                "commands": [],
            }
            self.turns.append(turn)
            message: dict[str, Any] = {"role": "assistant", "content": reply.content}
            if reply.tool_calls:
                message["tool_calls"] = reply.tool_calls
            message["extra"] = {k: v for k, v in turn.items() if k not in ("turn", "commands")} | {
                "raw": reply.raw,
                "timestamp": time.time(),
            }
            self.messages.append(message)
            try:
                actions = parse_actions(reply, cfg.protocol)
            except FormatError as e:
                format_errors += 1
                turn["format_error"] = True
                self.messages.append({"role": "user", "content": e.message, "extra": {"interrupt_type": "FormatError"}})
                if format_errors >= cfg.max_format_errors:
                    return self._finish("RepeatedFormatError")
                self._save()
                continue
            format_errors = 0
            message["extra"]["actions"] = actions
            for action in actions:
                result = self.execute(action["command"])
                turn["commands"].append(
                    {
                        "command": action["command"],
                        "returncode": result.returncode,
                        "status": result.status,
                        "seconds": round(result.wall_seconds, 4),
                        "output_chars": len(result.output),
                        "truncated": result.truncated,
                    }
                )
                obs: dict[str, Any] = {
                    "role": "tool" if "tool_call_id" in action else "user",
                    "content": observation(result),
                    "extra": {
                        "raw_output": result.output,
                        "returncode": result.returncode,
                        "status": result.status,
                        "timestamp": time.time(),
                    },
                }
                if "tool_call_id" in action:
                    obs["tool_call_id"] = action["tool_call_id"]
                self.messages.append(obs)
                lines = result.output.lstrip().splitlines(keepends=True)
                if lines and lines[0].strip() == SUBMIT and result.returncode == 0:
                    self.submission = "".join(lines[1:])
                    return self._finish("Submitted", self.submission)
            self._save()

    def execute(self, command: str) -> CommandResult:
        # stderr into stdout, in order, as mini-swe-agent's local environment shows them
        script = "exec 2>&1\n" + command
        return self.shell(script, self.workspace, timeout=self.config.command_timeout)

    def _finish(self, status: str, content: str = "") -> str:
        """End the episode with mini-swe-agent's `exit` message."""
        self.exit_status = status
        extra = {"exit_status": status, "submission": self.submission}
        self.messages.append({"role": "exit", "content": content or status, "extra": extra})
        self._save()
        return status

    def _save(self) -> None:
        if self.save is not None:
            self.save(self.trajectory())

    def trajectory(self) -> dict[str, Any]:
        return {
            "trajectory_format": "loopcoder-swe-1 (mini-swe-agent-1.1 messages)",
            "info": {
                "exit_status": self.exit_status,
                "submission": self.submission,
                "model": self.model.name,
                "config": asdict(self.config),
                "started": self.started,
                "seconds": round(self.elapsed(), 3),
                "turns": len(self.turns),
                "prompt_tokens": sum(t["prompt_tokens"] for t in self.turns),
                "completion_tokens": self.tokens(),
                "cached_tokens": _sum_known(t["cached_tokens"] for t in self.turns),
                "commands": sum(len(t["commands"]) for t in self.turns),
                "command_seconds": round(sum(c["seconds"] for t in self.turns for c in t["commands"]), 4),
                "model_seconds": round(sum(t["model_seconds"] for t in self.turns), 4),
                "format_errors": sum(1 for t in self.turns if t.get("format_error")),
            },
            "turns": self.turns,
            "messages": self.messages,
        }


def _sum_known(values) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None
