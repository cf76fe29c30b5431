"""An environment class for mini-swe-agent (2.4.6) that runs its commands in loopcoder's sandbox.

mini-swe-agent's `local` environment runs the model's commands on the host, as the calling user,
unconfined. This one runs each command with `loopcoder.evaluation.sandbox.run_command`: `cwd` (the
repository copy the agent works on) is the one writable directory, there is no network, CPU, memory,
time and output are limited, and nothing the command starts outlives it. Select it in mini-swe-agent's
config (docs/evaluation.md has the whole command line):

    environment:
      environment_class: loopcoder.swe.mini_swe_agent.SandboxEnvironment
      cwd: /path/to/the/repository
      allow_code_execution: true
      timeout: 60

It behaves as mini-swe-agent's environments do: `execute({"command": ...})` returns `output` (stdout
and stderr together, in order), `returncode` and `exception_info`, and raises mini-swe-agent's
`Submitted` when the output starts with the line `COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT` and the
command exited with 0. This module needs mini-swe-agent installed (`pip install "loopcoder[swe]"`);
nothing else in loopcoder imports it.
"""

from __future__ import annotations

import platform
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

from minisweagent.exceptions import Submitted
from pydantic import BaseModel

from loopcoder.evaluation.sandbox import run_command
from loopcoder.swe.agent import SUBMIT
from loopcoder.swe.shell import AGENT_LIMITS, COMMAND_ENV
from loopcoder.utils.errors import LoopcoderError


class SandboxEnvironmentConfig(BaseModel):
    cwd: str = ""
    """The repository the agent works on: the one writable directory, and every command's working directory."""
    env: dict[str, str] = {}
    """Environment variables for the commands, on top of loopcoder's (PAGER=cat, ...)."""
    timeout: int = 60
    """Seconds a command may take (wall clock)."""
    allow_code_execution: bool = False
    """Required: the model's commands run in the sandbox only with this opt-in."""
    cpu_seconds: int = AGENT_LIMITS.cpu_seconds
    memory_bytes: int = AGENT_LIMITS.address_space_bytes
    processes: int = AGENT_LIMITS.processes


class SandboxEnvironment:
    def __init__(self, *, config_class: type = SandboxEnvironmentConfig, **kwargs: Any) -> None:
        self.config = config_class(**kwargs)
        if not self.config.cwd or not Path(self.config.cwd).is_dir():
            raise LoopcoderError(
                f"environment.cwd must be the repository's directory, got {self.config.cwd!r} (an existing directory)"
            )
        if self.config.allow_code_execution is not True:
            raise LoopcoderError(
                "the model's commands run only with environment.allow_code_execution=true "
                "(they run in loopcoder's sandbox: docs/sandbox.md)"
            )
        self.limits = replace(
            AGENT_LIMITS,
            cpu_seconds=self.config.cpu_seconds,
            address_space_bytes=self.config.memory_bytes,
            processes=self.config.processes,
        )

    def execute(self, action: dict, cwd: str = "", *, timeout: int | None = None) -> dict[str, Any]:
        command = action.get("command", "")
        prefix = f"cd {shlex.quote(cwd)} || exit 1\n" if cwd else ""
        limits = replace(self.limits, wall_seconds=float(timeout or self.config.timeout))
        r = run_command(
            "exec 2>&1\n" + prefix + command,
            limits,
            workspace=self.config.cwd,
            allow_code_execution=True,
            env={**COMMAND_ENV, **self.config.env},
        )
        output: dict[str, Any] = {"output": r.stdout + r.stderr, "returncode": r.returncode, "exception_info": ""}
        if r.status not in ("passed", "failed"):
            output["returncode"] = -1 if r.returncode is None else r.returncode
            output["exception_info"] = f"An error occurred while executing the command: {r.reason}"
            output["extra"] = {"exception_type": r.status, "exception": r.reason}
        self._check_finished(output)
        return output

    def _check_finished(self, output: dict[str, Any]) -> None:
        """Raise mini-swe-agent's `Submitted` if the command submitted (as its local environment does)."""
        lines = output.get("output", "").lstrip().splitlines(keepends=True)
        if lines and lines[0].strip() == SUBMIT and output["returncode"] == 0:
            submission = "".join(lines[1:])
            raise Submitted(
                {"role": "exit", "content": submission, "extra": {"exit_status": "Submitted", "submission": submission}}
            )

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        return {**self.config.model_dump(), **platform.uname()._asdict(), **kwargs}

    def serialize(self) -> dict[str, Any]:
        return {
            "info": {
                "config": {
                    "environment": self.config.model_dump(mode="json"),
                    "environment_type": f"{self.__class__.__module__}.{self.__class__.__name__}",
                }
            }
        }
