"""Where commands run: a shell over one workspace directory, sandboxed.

Every command of the SWE harness (the agent's, the task set's validation runs, scoring) goes through
a `Shell`: `shell(command, workspace, timeout=..., stdin=...)` runs `bash -c command` with
`workspace` as the one writable directory and the working directory, and returns what happened.
`SandboxShell` is the only implementation in the package: `loopcoder.evaluation.sandbox.run_command`
(no network, rlimits, the host read-only, nothing left running after the call). The tests add an
unsandboxed one of their own for the agent loop's unit tests; nothing here offers one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from loopcoder.evaluation.sandbox import Limits, run_command

# What one agent command may use: enough for a test suite of the standard library, not more.
AGENT_LIMITS = Limits(
    cpu_seconds=60,
    wall_seconds=60.0,
    address_space_bytes=1 << 30,
    file_size_bytes=64 << 20,
    open_files=256,
    processes=64,
    output_bytes=1 << 20,
    tmp_bytes=256 << 20,
    tmp_files=4096,
)


# Every command's environment: no pager or progress bars (as mini-swe-agent's SWE-bench config sets it),
# and git's "safe.directory" for the workspace, whichever uid the sandbox runs the command as.
COMMAND_ENV = {
    "PAGER": "cat",
    "MANPAGER": "cat",
    "LESS": "-R",
    "PIP_PROGRESS_BAR": "off",
    "TQDM_DISABLE": "1",
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "safe.directory",
    "GIT_CONFIG_VALUE_0": "*",
}


@dataclass
class CommandResult:
    """One command's outcome: `status` is the sandbox's (passed = exit status 0; failed, timeout,
    killed, output_limit, error)."""

    stdout: str
    stderr: str
    returncode: int | None
    status: str
    wall_seconds: float
    truncated: bool = False
    reason: str = ""

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class Shell(Protocol):
    def __call__(
        self, command: str, workspace: Path, *, timeout: float | None = None, stdin: str | None = None
    ) -> CommandResult: ...


class SandboxShell:
    """`bash -c` in loopcoder's sandbox, with `workspace` bind-mounted read-write (the only such place)."""

    def __init__(self, limits: Limits = AGENT_LIMITS, *, allow_code_execution: bool) -> None:
        self.limits = limits
        self.allow_code_execution = allow_code_execution

    def __call__(
        self, command: str, workspace: Path, *, timeout: float | None = None, stdin: str | None = None
    ) -> CommandResult:
        limits = self.limits if timeout is None else replace(self.limits, wall_seconds=float(timeout))
        r = run_command(
            command,
            limits,
            workspace=workspace,
            allow_code_execution=self.allow_code_execution,
            stdin=stdin,
            env=COMMAND_ENV,
        )
        return CommandResult(r.stdout, r.stderr, r.returncode, r.status, r.wall_seconds, r.truncated, r.reason)
