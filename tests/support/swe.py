"""Helpers for the SWE harness's tests: an unsandboxed shell for the agent loop's unit tests (the
package itself offers none), scripted chat models, and a small task set built once per session."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from loopcoder.swe.shell import CommandResult


class LocalShell:
    """`bash -c` on the host, in the workspace: for unit tests of the agent loop only, never a default."""

    def __call__(self, command: str, workspace: Path, *, timeout: float | None = None, stdin: str | None = None):
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
