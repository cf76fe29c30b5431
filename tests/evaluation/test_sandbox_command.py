"""`run_command`: an agent's shell command in the sandbox, with one writable workspace that persists.

The hostile commands guard themselves like the programs of test_sandbox.py: the fork bomb checks its
process cap before it starts, so that a regression fails a test instead of hurting the machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from loopcoder.evaluation import sandbox
from loopcoder.evaluation.sandbox import CodeExecutionNotAllowedError, Limits, isolation_report, run_command
from loopcoder.utils.errors import LoopcoderError

QUICK = Limits(cpu_seconds=5, wall_seconds=20)
AS_ROOT = os.geteuid() == 0
PROJECT = Path(__file__).resolve().parents[2]


def sh(command: str, workspace: Path, limits: Limits = QUICK, **kwargs) -> sandbox.ExecResult:
    return run_command(command, limits, workspace=workspace, allow_code_execution=True, **kwargs)


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line holds `marker`."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = f.read()
                with open(f"/proc/{name}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker.encode() in cmdline and state not in ("Z", "X"):
                found.append(int(name))
    return found


@pytest.fixture
def workspace(tmp_path):
    path = tmp_path / "workspace"
    path.mkdir()
    (path / "README.md").write_text("a repository\n")
    return path


def test_refuses_without_the_opt_in(workspace):
    with pytest.raises(CodeExecutionNotAllowedError, match="--allow-code-execution"):
        run_command("touch ran", workspace=workspace, allow_code_execution=False)
    assert not (workspace / "ran").exists()


def test_the_exit_status_decides_and_stdin_and_output_come_through(workspace):
    ok = sh("cat; echo out; echo err >&2", workspace, stdin="given\n")
    assert ok.status == "passed" and ok.passed and ok.returncode == 0
    assert ok.stdout == "given\nout\n" and ok.stderr == "err\n"
    failed = sh("exit 3", workspace)
    assert failed.status == "failed" and failed.returncode == 3 and not failed.passed
    assert "status 3" in failed.reason
    missing = sh("no-such-tool-anywhere", workspace)
    assert missing.returncode == 127 and "not found" in missing.stderr


def test_tools_an_agent_needs_are_there(workspace):
    result = sh(
        "set -e; python3 -c 'import sys, json; print(sys.version_info >= (3, 8))'; git --version; "
        "ls | sort | head -n 1; echo x | sed s/x/y/; printf '%s\\n' b a | sort | tr -d '\\n'; echo",
        workspace,
    )
    assert result.passed, result
    lines = result.stdout.splitlines()
    assert lines[0] == "True" and lines[1].startswith("git version") and lines[2:] == ["README.md", "y", "ab"]


def test_the_workspace_persists_between_calls_and_stays_the_callers(workspace):
    first = sh("pwd; echo $HOME; mkdir -p src/pkg && echo 'x = 1' > src/pkg/mod.py && ln -s src link", workspace)
    assert first.passed, first
    assert first.stdout.splitlines() == [str(workspace.resolve())] * 2  # its working directory and HOME
    second = sh("cat src/pkg/mod.py && echo 'y = 2' >> link/pkg/mod.py", workspace)
    assert second.passed and second.stdout == "x = 1\n", second
    assert (workspace / "src" / "pkg" / "mod.py").read_text() == "x = 1\ny = 2\n"
    # Whatever uid the run had, all of it belongs to the workspace's owner again afterwards.
    owner = os.stat(workspace).st_uid
    assert {os.lstat(p).st_uid for p in [workspace, *workspace.rglob("*")]} == {owner}
    shutil.rmtree(workspace)  # the caller can delete it


@pytest.mark.skipif(not AS_ROOT, reason="only a root caller gives the run a uid of its own")
@pytest.mark.parametrize("idmapped", [True, False], ids=["idmapped mount", "lent by chown"])
def test_a_big_workspace_is_the_runs_inside_and_the_callers_outside(workspace, monkeypatch, idmapped):
    monkeypatch.setattr(sandbox, "_IDMAPPED_WORKSPACE", idmapped)
    for i in range(2000):
        (workspace / f"d{i % 20}").mkdir(exist_ok=True)
        (workspace / f"d{i % 20}" / f"f{i}.txt").write_text("x")
    owner = os.stat(workspace).st_uid
    result = sh(
        "test -O d3/f3.txt && echo owned; echo y >> d3/f3.txt; mkdir -p new/deeper; touch new/deeper/file; "
        "rm d4/f4.txt; stat -c %u d5/f5.txt",
        workspace,
    )
    assert result.passed, result
    lines = result.stdout.splitlines()
    assert lines[0] == "owned" and int(lines[1]) == result.isolation["uid"]  # the run's own inside
    want = "idmapped mount" if idmapped else "lent to the run's uid"
    if idmapped and not result.isolation["workspace"].startswith(want):
        pytest.skip(f"no idmapped mount here: {result.isolation['workspace']}")
    assert result.isolation["workspace"].startswith(want)
    assert (workspace / "d3" / "f3.txt").read_text() == "xy\n" and not (workspace / "d4" / "f4.txt").exists()
    assert {os.lstat(p).st_uid for p in [workspace, *workspace.rglob("*")]} == {owner}  # the caller's outside


@pytest.mark.skipif(not AS_ROOT, reason="only a root caller gives the run a uid of its own")
def test_a_lent_workspace_is_given_back_after_a_timeout_too(workspace, monkeypatch):
    monkeypatch.setattr(sandbox, "_IDMAPPED_WORKSPACE", False)
    result = sh("touch made; sleep 100", workspace, Limits(wall_seconds=1.5))
    assert result.status == "timeout"
    owner = os.stat(workspace).st_uid
    assert {os.lstat(p).st_uid for p in [workspace, *workspace.rglob("*")]} == {owner} == {os.getuid()}


def test_git_in_the_workspace_works_inside_and_afterwards_for_the_caller(workspace):
    result = sh(
        "git init -q . && git -c user.name=a -c user.email=a@b add README.md && "
        "git -c user.name=a -c user.email=a@b commit -qm first && echo changed >> README.md",
        workspace,
    )
    assert result.passed, result
    diff = subprocess.run(["git", "-C", str(workspace), "diff"], capture_output=True, text=True, timeout=60)
    assert diff.returncode == 0, diff.stderr  # not "dubious ownership": the caller owns the repository
    assert "+changed" in diff.stdout


def test_writes_outside_the_workspace_fail_and_tmp_is_private(workspace, tmp_path):
    marker = "loopcoder-command-test-" + os.urandom(6).hex()
    targets = ["/etc/" + marker, str(PROJECT / marker), str(tmp_path / marker), os.path.expanduser("~/" + marker)]
    result = sh(
        "for t in " + " ".join(targets) + "; do touch $t 2>/dev/null && echo written $t || echo refused; done; "
        f"echo private > /tmp/{marker}; echo private > /dev/shm/{marker}; cat /tmp/{marker}",
        workspace,
    )
    assert result.passed, result
    assert result.stdout.splitlines() == ["refused"] * len(targets) + ["private"]
    assert not any(os.path.exists(t) for t in targets)
    assert not os.path.exists("/tmp/" + marker) and not os.path.exists("/dev/shm/" + marker)
    again = sh(f"test ! -e /tmp/{marker}", workspace)  # each call gets a fresh /tmp
    assert again.passed, again


def test_the_network_is_unreachable(workspace):
    if isolation_report()["network"] != "yes":
        pytest.skip("no network namespace on this machine")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = sh(
            f"(echo hello > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo connected || echo refused; "
            f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\" "
            "2>/dev/null && echo connected || echo refused",
            workspace,
        )
        assert result.stdout.splitlines() == ["refused", "refused"], result
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


def test_the_callers_environment_does_not_leak_and_extras_arrive(workspace, monkeypatch):
    secret = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv("LOOPCODER_TEST_API_KEY", secret)
    result = sh("env", workspace, env={"GIT_AUTHOR_NAME": "agent", "PAGER": "cat"})
    assert result.passed, result
    assert secret not in result.stdout and "LOOPCODER_TEST_API_KEY" not in result.stdout
    names = {line.split("=", 1)[0] for line in result.stdout.splitlines()}
    assert names <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "GIT_AUTHOR_NAME", "PAGER", "PWD", "SHLVL", "_"}
    assert "GIT_AUTHOR_NAME=agent" in result.stdout.splitlines()


@pytest.mark.parametrize(
    "start",
    [
        "(exec -a {m} sleep 100) &",
        "setsid bash -c 'exec -a {m} sleep 100' &",
        "nohup bash -c 'exec -a {m} sleep 100' > /dev/null 2>&1 &",
        "(setsid bash -c 'exec -a {m} sleep 100' < /dev/null > /dev/null 2>&1 &) ; sleep 0.2",
    ],
)
def test_no_process_outlives_the_call(workspace, start):
    marker = "loopcoder-bg-" + os.urandom(6).hex()
    result = sh(start.format(m=marker) + "\necho started", workspace)
    assert result.passed and result.stdout == "started\n", result
    deadline = time.monotonic() + 5
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(marker) == []


def test_a_command_past_the_wall_clock_is_killed_with_everything_it_started(workspace):
    marker = "loopcoder-slow-" + os.urandom(6).hex()
    start = time.monotonic()
    result = sh(f"(exec -a {marker} sleep 100) & sleep 100", workspace, Limits(wall_seconds=1.5))
    assert result.status == "timeout" and time.monotonic() - start < 10
    time.sleep(0.2)
    assert processes_with(marker) == []


FORK_BOMB = """
n=$(ulimit -u)
if [ "$n" = unlimited ] || [ "$n" -gt 64 ] || [ "$(id -u)" = 0 ]; then echo "refusing: no process cap $n"; exit 3; fi
bomb() { bomb | bomb & }; bomb
sleep 5
"""


@pytest.mark.slow
def test_a_fork_bomb_is_contained(workspace):
    result = sh(FORK_BOMB, workspace, Limits(cpu_seconds=2, wall_seconds=3, processes=8))
    assert "refusing" not in result.stdout, result
    assert result.status in ("timeout", "killed", "passed", "failed")  # it ends, one way or another
    if AS_ROOT:
        uid = result.isolation["uid"]
        deadline = time.monotonic() + 5
        while sandbox._processes_of_uid(uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox._processes_of_uid(uid) == []
    assert sh("true", workspace).passed  # and the next call works


def test_output_is_capped(workspace):
    result = sh("yes", workspace, Limits(output_bytes=64 << 10, wall_seconds=20))
    assert result.status == "output_limit" and len(result.stdout) == 64 << 10


@pytest.mark.skipif(not AS_ROOT, reason="the fallback's clean-up and uid need root")
def test_where_namespaces_are_refused_commands_still_run_in_the_workspace(workspace, monkeypatch):
    monkeypatch.setattr(sandbox, "_NAMESPACES", False)
    result = sh("echo done > out.txt && cat out.txt", workspace)
    assert result.passed and result.stdout == "done\n", result
    assert result.isolation["network"].startswith("no: ")
    assert (workspace / "out.txt").read_text() == "done\n"
    assert os.stat(workspace / "out.txt").st_uid == os.stat(workspace).st_uid


MEMORY_SCAN = """
import sys
counts = []
for word in sys.argv[1:]:  # each built at run time, so each is in this memory the same number of times
    needle = word.encode()
    found = 0
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or line.rstrip().endswith(("[vvar]", "[vsyscall]", "[vvar_vclock]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            for at in range(start, end, 1 << 20):
                try:
                    mem.seek(at)
                    found += mem.read(min(1 << 20, end - at) + 64).count(needle)
                except (OSError, ValueError, OverflowError):
                    pass
    counts.append(found)
print(*counts)
"""


def test_a_commands_environment_is_not_in_a_later_runs_memory(workspace):
    # Runs are forked from one server process: nothing of one run's request may stay in it for the next.
    secret, unused = ("token-" + os.urandom(16).hex() for _ in range(2))
    assert sh("true", workspace, env={"LOOPCODER_TEST_TOKEN": secret}).passed
    words = ", ".join(f"'{w[:5]}' + '{w[5:]}'" for w in (secret, unused))
    scan = sandbox.run_program(
        f"import sys\nsys.argv[1:] = [{words}]\n" + MEMORY_SCAN, QUICK, allow_code_execution=True
    )
    assert scan.passed, scan
    in_memory, control = (int(x) for x in scan.stdout.split())
    assert control > 0  # the scan finds what is there (its own copies)
    assert in_memory == control  # and the earlier run's secret no more often than a word never used


def test_bad_input_is_one_clear_error(workspace, tmp_path):
    with pytest.raises(LoopcoderError, match="not an existing directory"):
        sh("true", tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoopcoderError, match="not an existing directory"):
        sh("true", tmp_path / "file")
    for system in ("/", "/tmp", "/usr", "/var"):
        with pytest.raises(LoopcoderError, match="workspace"):
            sh("true", Path(system))
    with pytest.raises(LoopcoderError, match="command must be text"):
        sh(["ls"], workspace)
    with pytest.raises(LoopcoderError, match="NUL"):
        sh("echo \0", workspace)
    with pytest.raises(LoopcoderError, match="variable name"):
        sh("true", workspace, env={"A=B": "x"})
    with pytest.raises(LoopcoderError, match="value of A"):
        sh("true", workspace, env={"A": 1})
    with pytest.raises(LoopcoderError, match="workspace must be a directory path"):
        sh("true", 42)
