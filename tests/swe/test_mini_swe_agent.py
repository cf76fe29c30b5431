"""mini-swe-agent on loopcoder: its agent with loopcoder's sandboxed environment class, and the
documented official path: the `mini` command driving `loopcoder serve` (litellm, `openai/<id>` and
`api_base`, MSWEA_COST_TRACKING=ignore_errors, MSWEA_CONFIGURED=true)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loopcoder.swe import repo, runs, scoring
from loopcoder.swe.agent import SUBMIT
from loopcoder.utils.errors import LoopcoderError
from support.serving import ServeProcess, build_model_dir

pytest.importorskip("minisweagent", reason="mini-swe-agent (the `swe` extra: pip install 'loopcoder[swe]')")
os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")

from minisweagent.agents.default import DefaultAgent
from minisweagent.models.test_models import DeterministicModel, make_output

from loopcoder.swe.mini_swe_agent import SandboxEnvironment


@pytest.fixture
def task_workspace(built, tmp_path):
    root, _, instances = built
    task = next(iter(instances.values()))
    return task, repo.materialize(root / task["source_dir"], task, tmp_path / "repo"), root


def test_mini_swe_agent_runs_its_commands_in_the_sandbox(task_workspace, shell, tmp_path):
    task, ws, root = task_workspace
    outside = tmp_path / "outside.txt"
    model = DeterministicModel(
        outputs=[
            make_output("apply the fix", [{"command": f"git apply <<'EOF'\n{task['patch']}EOF"}]),
            make_output("escape", [{"command": f"echo x > {outside}; curl -sm 3 http://example.com; echo rc=$?"}]),
            make_output("long", [{"command": "sleep 30"}]),
            make_output("submit", [{"command": f"echo {SUBMIT} && git diff --stat"}]),
        ]
    )
    env = SandboxEnvironment(cwd=str(ws), allow_code_execution=True, timeout=3)
    agent = DefaultAgent(model, env, system_template="s", instance_template="{{task}}", step_limit=10, cost_limit=0)
    result = agent.run(task["problem_statement"])
    assert result["exit_status"] == "Submitted" and "1 file changed" in result["submission"]
    observations = [m for m in agent.messages if m["role"] == "user"][1:]
    assert "rc=0" not in observations[1]["content"] and not outside.exists()
    assert "<exception>" in observations[2]["content"] and observations[2]["extra"]["returncode"] == -1
    # the repository's diff is the task's gold patch, and it resolves the task
    patch, error = runs.workspace_patch(shell, ws, task["base_commit"])
    assert error is None and patch == task["patch"]
    report, _ = scoring.score(shell, root / task["source_dir"], task, patch)
    assert report["resolved"]
    info = agent.serialize()["info"]["config"]
    assert info["environment_type"] == "loopcoder.swe.mini_swe_agent.SandboxEnvironment"


def test_the_environment_needs_the_opt_in_and_a_directory(tmp_path):
    with pytest.raises(LoopcoderError, match="allow_code_execution=true"):
        SandboxEnvironment(cwd=str(tmp_path))
    with pytest.raises(LoopcoderError, match=r"environment\.cwd"):
        SandboxEnvironment(cwd=str(tmp_path / "missing"), allow_code_execution=True)


@pytest.mark.slow
def test_the_mini_command_drives_loopcoder_serve(task_workspace, tmp_path):
    """The documented command line (docs/evaluation.md), on a random model: the loop runs, format errors go
    back to the model, and the episode ends at its budget with a trajectory."""
    mini = shutil.which("mini", path=str(Path(sys.executable).parent))
    assert mini, "mini-swe-agent is installed but its `mini` command is not beside this Python"
    task, ws, _ = task_workspace
    model_dir = build_model_dir(tmp_path / "model", context=16384)  # mini's prompts are long in a 400-token vocab
    server = ServeProcess(model_dir, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        port = server.start(180)
        env = {
            **os.environ,
            "MSWEA_CONFIGURED": "true",
            "MSWEA_COST_TRACKING": "ignore_errors",
            "MSWEA_GLOBAL_CONFIG_DIR": str(tmp_path / "mini-config"),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
        command = [
            mini, "-m", "openai/model", "-c", "mini.yaml",
            "-c", f"model.model_kwargs.api_base=http://127.0.0.1:{port}/v1",
            "-c", "model.model_kwargs.api_key=none",
            "-c", "model.model_kwargs.max_tokens=32",
            "-c", "agent.step_limit=3",
            "--environment-class", "loopcoder.swe.mini_swe_agent.SandboxEnvironment",
            "-c", f"environment.cwd={ws}",
            "-c", "environment.allow_code_execution=true",
            "-t", task["problem_statement"], "-y", "--exit-immediately", "-o", str(tmp_path / "traj.json"),
        ]  # fmt: skip
        done = subprocess.run(command, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        server.stop()
    trajectory = json.loads((tmp_path / "traj.json").read_text())
    info = trajectory["info"]
    assert info["exit_status"] in ("LimitsExceeded", "RepeatedFormatError", "Submitted"), info
    assert info["model_stats"]["api_calls"] >= 1
    assert info["config"]["environment_type"] == "loopcoder.swe.mini_swe_agent.SandboxEnvironment"
    assert trajectory["messages"][-1]["role"] == "exit"
