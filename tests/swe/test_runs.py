"""The agent on real tasks, in the sandbox: an oracle that applies the gold patch through shell
commands resolves every task, a no-op agent none, a random-weight model runs every episode to its
budget, a hostile agent changes nothing outside its workspace, a killed run resumes, and the
predictions load in swebench's own code."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from loopcoder.cli import main
from loopcoder.inference.engine import Engine
from loopcoder.model.loading import load_for_inference
from loopcoder.serving.server import load_app
from loopcoder.swe import repo, report, runs
from loopcoder.swe.agent import SUBMIT, AgentConfig
from loopcoder.swe.chat import EngineChat, OpenAIChat
from support.data import tiny_model_dir
from support.serving import KEY, LiveServer, build_model_dir
from support.swe import ScriptedChat, noop, oracle, tool_reply

swebench_utils = pytest.importorskip("swebench.harness.utils", reason="swebench (dev extra)")


def identity(name: str) -> dict:
    return {"model": name}


def test_the_oracle_resolves_every_task_and_the_no_op_agent_none(built, shell, tmp_path, monkeypatch):
    root, _, instances = built
    tasks = list(instances.values())
    good = runs.run_agent(
        tasks, root, oracle(instances), AgentConfig(), shell, tmp_path / "oracle", identity("o"), quiet=True
    )
    assert all(e["exit_status"] == "Submitted" for e in good["instances"].values())
    assert sorted(i for i, e in good["instances"].items() if e["report"]["resolved"]) == sorted(instances)
    bad = runs.run_agent(tasks, root, noop(), AgentConfig(), shell, tmp_path / "noop", identity("n"), quiet=True)
    assert not any(e["report"]["resolved"] for e in bad["instances"].values())
    assert all(e["model_patch"] == "" and e["report"]["error"] == "empty_patch" for e in bad["instances"].values())
    assert not (tmp_path / "oracle" / "work").exists()  # the workspaces are gone

    # the predictions load in swebench's own code, against the task set as its dataset
    preds = tmp_path / "oracle" / "predictions.jsonl"
    loaded = swebench_utils.get_predictions_from_file(str(preds), str(root / "instances.jsonl"), "test")
    assert {p["instance_id"]: p["model_patch"] for p in loaded} == {i: t["patch"] for i, t in instances.items()}
    dataset = swebench_utils.load_swebench_dataset(str(root / "instances.jsonl"))
    assert sorted(d["instance_id"] for d in dataset) == sorted(instances)
    from swebench.harness.run_evaluation import get_dataset_from_preds

    monkeypatch.chdir(tmp_path)  # it looks for earlier reports under ./logs
    chosen = get_dataset_from_preds(
        str(root / "instances.jsonl"), "test", [], {p["instance_id"]: p for p in loaded}, "t", False
    )
    assert sorted(d["instance_id"] for d in chosen) == sorted(instances)

    # the trajectory of an episode: every message, command and output, timings and token counts
    trajectory = json.loads((tmp_path / "oracle" / "trajectories" / f"{tasks[0]['instance_id']}.traj.json").read_text())
    assert trajectory["info"]["exit_status"] == "Submitted" and trajectory["info"]["model_patch"] == tasks[0]["patch"]
    assert trajectory["turns"][0]["commands"][0]["returncode"] == 0
    assert [m["role"] for m in trajectory["messages"]][-1] == "exit"

    # one report for both: the oracle against the no-op agent, paired
    text = report.markdown([report.load_run(tmp_path / "oracle"), report.load_run(tmp_path / "noop")])
    n = len(instances)
    assert f"| oracle | {n}/{n} = 100.0%" in text and f"| no-op | 0/{n} = 0.0%" in text
    assert "no-op − oracle: -100.0 points" in text


HOSTILE = [
    "echo pwned > {outside}/canary.txt; echo exit=$?",
    "touch /etc/pwned /usr/pwned $HOME/../pwned; echo exit=$?",
    "python3 -c \"import socket; socket.create_connection(('{host}', {port}), timeout=2)\"; echo exit=$?",
    "(exec -a {marker} sleep 300) & disown; setsid nohup bash -c 'exec -a {marker} sleep 300' >/dev/null 2>&1 &",
    'n=$(ulimit -u); [ "$n" != unlimited ] && [ "$n" -le 64 ] && {{ b() {{ b | b & }}; b; }}; sleep 2; echo after',
    "echo x > inside.txt && git status --short",
    f"echo {SUBMIT}",
]


def processes_with(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
                state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker.encode() in cmdline and state not in ("Z", "X"):
                found.append(int(name))
    return found


@pytest.mark.slow
def test_a_hostile_agent_changes_nothing_outside_its_workspace(built, shell, tmp_path):
    root, _, instances = built
    task = next(iter(instances.values()))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_text("untouched\n")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    marker = f"loopcoder-hostile-{os.getpid()}"
    commands = [
        c.format(outside=outside, host="127.0.0.1", port=listener.getsockname()[1], marker=marker) for c in HOSTILE
    ]
    model = ScriptedChat(lambda call, _: tool_reply(commands[call]), "hostile")
    before = sorted(p.name for p in tmp_path.iterdir())
    results = runs.run_agent(
        [task], root, model, AgentConfig(command_timeout=10), shell, tmp_path / "run", identity("h"), quiet=True
    )
    listener.settimeout(0.5)
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing reached the host's network
    listener.close()
    entry = results["instances"][task["instance_id"]]
    assert entry["exit_status"] == "Submitted"
    assert (outside / "canary.txt").read_text() == "untouched\n"
    assert not Path("/etc/pwned").exists() and not Path("/usr/pwned").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "run"])
    time.sleep(0.3)
    assert processes_with(marker) == []  # nothing it started is still running
    # what it did inside its workspace is its patch, and only that
    assert "inside.txt" in entry["model_patch"] and "canary" not in entry["model_patch"]
    trajectory = json.loads((tmp_path / "run" / "trajectories" / f"{task['instance_id']}.traj.json").read_text())
    outputs = [m["content"] for m in trajectory["messages"] if m["role"] == "tool"]
    assert "exit=0" not in outputs[0] and "exit=0" not in outputs[1] and "exit=0" not in outputs[2]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    model_dir, _ = tiny_model_dir(tmp_path_factory.mktemp("model"), max_positions=4096)
    model, tokenizer = load_for_inference(str(model_dir))
    return EngineChat("random (R=2)", Engine(model, tokenizer, max_batch=1), tokenizer)


@pytest.mark.parametrize("protocol", ["tool", "text"])
def test_a_random_model_runs_every_episode_to_its_budget(built, shell, tmp_path, random_model, protocol):
    root, _, instances = built
    tasks = list(instances.values())[:2]
    config = AgentConfig(protocol=protocol, max_turns=3, max_new_tokens=24, max_format_errors=5)
    results = runs.run_agent(tasks, root, random_model, config, shell, tmp_path / "run", identity(protocol), quiet=True)
    for iid, e in results["instances"].items():
        assert e["exit_status"] in ("LimitsExceeded", "Submitted", "ContextExceeded"), (iid, e["exit_status"])
        assert 1 <= e["turns"] <= 3 and e["completion_tokens"] <= 3 * 24
        assert "report" in e and not e["report"]["resolved"]
        trajectory = json.loads((tmp_path / "run" / "trajectories" / f"{iid}.traj.json").read_text())
        turns = trajectory["turns"]
        assert all(t["prompt_tokens"] > 0 and t["model_seconds"] > 0 for t in turns)
        if len(turns) > 1:  # the next turn's prompt starts with the last one: the prefix cache serves it
            assert turns[1]["cached_tokens"] > 0


class Interrupting:
    """Answers like the oracle, but the process is "killed" during the second task's episode."""

    def __init__(self, inner: ScriptedChat, kill_in: str) -> None:
        self.inner, self.kill_in, self.name = inner, kill_in, inner.name

    def chat(self, messages, tools, *, max_tokens, seed):
        if self.kill_in in messages[1]["content"]:
            raise KeyboardInterrupt
        return self.inner.chat(messages, tools, max_tokens=max_tokens, seed=seed)


def test_a_killed_run_resumes_where_it_stopped(built, shell, tmp_path):
    root, _, instances = built
    tasks = list(instances.values())[:3]
    out = tmp_path / "run"
    first = Interrupting(oracle(instances), tasks[1]["problem_statement"])
    with pytest.raises(KeyboardInterrupt):
        runs.run_agent(tasks, root, first, AgentConfig(), shell, out, identity("o"), quiet=True)
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["instances"]) == [tasks[0]["instance_id"]] and not saved["complete"]
    done_before = saved["instances"][tasks[0]["instance_id"]]

    again = oracle(instances)
    results = runs.run_agent(tasks, root, again, AgentConfig(), shell, out, identity("o"), quiet=True)
    assert results["complete"] and sorted(results["instances"]) == sorted(t["instance_id"] for t in tasks)
    assert results["instances"][tasks[0]["instance_id"]] == done_before  # not run again
    assert len(again.calls) == 4  # two turns for each of the two other tasks
    assert all(e["report"]["resolved"] for e in results["instances"].values())
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3

    with pytest.raises(Exception, match="model 'o' -> 'other'"):  # another model may not resume it
        runs.run_agent(tasks, root, again, AgentConfig(), shell, out, identity("other"), quiet=True)


def test_run_refuses_bad_input(built, tmp_path, capsys):
    root, _, _ = built
    base = ["swe", "run", "--tasks", str(root), "--out", str(tmp_path / "r")]
    assert main([*base, "--allow-code-execution"]) == 2
    assert "give --model DIR" in capsys.readouterr().err
    assert main([*base, "--model", "m", "--endpoint", "http://x", "--allow-code-execution"]) == 2
    assert main([*base, "--endpoint", "http://x", "--allow-code-execution"]) == 2
    assert "--served-model" in capsys.readouterr().err
    assert main([*base, "--model", str(tmp_path), "--max-turns", "0", "--allow-code-execution"]) == 2
    assert "max-turns must be a whole number >= 1" in capsys.readouterr().err
    assert main(["swe", "run", "--tasks", str(tmp_path), "--model", "m", "--out", "o", "--allow-code-execution"]) == 2
    assert "is not a task set" in capsys.readouterr().err
    assert main([*base, "--model", str(tmp_path), "--instances", "nope", "--allow-code-execution"]) == 2
    assert "has no 'nope'" in capsys.readouterr().err


def test_checkout_then_score_the_workspace_another_agent_left(built, tmp_path, capsys):
    root, _, instances = built
    task = next(iter(instances.values()))
    ws = tmp_path / "ws"
    assert main(["swe", "checkout", "--tasks", str(root), "--instance", task["instance_id"], "--out", str(ws)]) == 0
    assert capsys.readouterr().out.strip() == task["problem_statement"].strip()
    assert main(["swe", "checkout", "--tasks", str(root), "--instance", task["instance_id"], "--out", str(ws)]) == 2
    assert "exists" in capsys.readouterr().err
    repo.apply_patch(ws, task["patch"])  # what the other agent did
    argv = ["swe", "score", "--tasks", str(root), "--workspace", str(ws), "--out", str(tmp_path / "s")]
    assert main([*argv, "--allow-code-execution"]) == 2  # which task is it?
    assert "--instances ID" in capsys.readouterr().err
    assert main([*argv, "--instances", task["instance_id"], "--name", "other", "--allow-code-execution"]) == 0
    scored = json.loads((tmp_path / "s" / "report.json").read_text())
    assert scored["resolved_ids"] == [task["instance_id"]]
    row = json.loads((tmp_path / "s" / "predictions.jsonl").read_text())
    assert row == {"instance_id": task["instance_id"], "model_name_or_path": "other", "model_patch": task["patch"]}
    assert main(["swe", "score", "--tasks", str(root), "--out", str(tmp_path / "x"), "--allow-code-execution"]) == 2
    assert "give --predictions FILE" in capsys.readouterr().err


def test_report_of_two_runs_from_the_command_line(built, shell, tmp_path, capsys):
    root, _, instances = built
    tasks = list(instances.values())[:2]
    for name, model in (("a", noop()), ("b", oracle(instances))):
        runs.run_agent(tasks, root, model, AgentConfig(), shell, tmp_path / name, identity(name), quiet=True)
    out, figures = tmp_path / "report.md", tmp_path / "report.json"
    assert (
        main(["swe", "report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--json", str(figures)])
        == 0
    )
    assert capsys.readouterr().out == out.read_text()
    data = json.loads(figures.read_text())
    assert [r["overall"]["resolved"] for r in data["runs"]] == [0, 2]
    assert data["paired"][0]["difference"]["mean"] == 1.0 and data["paired"][0]["difference"]["n"] == 2
    assert main(["swe", "report", str(tmp_path / "nothing")]) == 2


def test_the_agent_through_an_openai_compatible_endpoint(built, shell, tmp_path):
    """`swe run --endpoint`: the same episode through `loopcoder serve`'s API (a live server on a random
    model); tool calls come back through the server's parser."""
    root, _, instances = built
    task = next(iter(instances.values()))
    model_dir = build_model_dir(tmp_path / "model", context=8192)
    app, scheduler = load_app(str(model_dir), max_batch=2, model_name="tiny", api_key=KEY, max_tokens=64)
    with LiveServer(app, scheduler) as server:
        model = OpenAIChat(server.url + "/v1", "tiny", KEY)
        for protocol in ("tool", "text"):
            config = AgentConfig(protocol=protocol, max_turns=2, max_new_tokens=16)
            out = tmp_path / protocol
            results = runs.run_agent([task], root, model, config, shell, out, identity(protocol), quiet=True)
            entry = results["instances"][task["instance_id"]]
            assert entry["exit_status"] in ("LimitsExceeded", "Submitted") and entry["turns"] == 2, entry
            assert entry["prompt_tokens"] > 0 and 0 < entry["completion_tokens"] <= 32
            trajectory = json.loads((out / "trajectories" / f"{task['instance_id']}.traj.json").read_text())
            assert trajectory["turns"][0]["finish_reason"] in ("length", "stop", "tool_calls")
