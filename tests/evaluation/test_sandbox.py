"""The code-execution sandbox: opt-in, isolation, limits, completion evidence, hostile programs.

Hostile programs guard themselves: the fork bomb and the memory bomb check that their limits are in
place before they start, and anything that signals other processes runs only inside a PID namespace,
so that a regression in the sandbox fails a test instead of hurting the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from loopcoder.evaluation import sandbox
from loopcoder.evaluation.sandbox import (
    CodeExecutionNotAllowedError,
    Limits,
    isolation_report,
    network_isolation,
    run_many,
    run_program,
)
from loopcoder.utils.errors import LoopcoderError

QUICK = Limits(cpu_seconds=5, wall_seconds=10)
AS_ROOT = os.geteuid() == 0
PROJECT = Path(__file__).resolve().parents[2]


def _interpreter_paths() -> list[str]:
    """Where the interpreter, its environment and this checkout live (resolved)."""
    paths = [sys.prefix, sys.base_prefix, sys.executable, str(PROJECT)]
    return [os.path.realpath(q) for q in paths] + paths


def run(source: str, limits: Limits = QUICK, **kwargs) -> sandbox.ExecResult:
    return run_program(textwrap.dedent(source), limits, allow_code_execution=True, **kwargs)


def assert_evaluator_carries_on() -> None:
    """After a hostile program: the sandbox still runs a trivial program, quickly."""
    start = time.monotonic()
    result = run("assert 1 + 1 == 2\n")
    assert result.passed, result
    assert time.monotonic() - start < 5


def processes_of_uid(uid: int) -> list[int]:
    """Live (not zombie) processes of a uid."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            if fields["State"].split()[0] not in ("Z", "X") and int(fields["Uid"].split()[0]) == uid:
                found.append(int(name))
    return found


def wait_until_no_processes_of(uid: int, seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes_of_uid(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# ---------------------------------------------------------------------------------------------- opt-in


@pytest.mark.parametrize("flag", [False, None, 1, "yes"])
def test_refuses_to_run_without_the_explicit_opt_in(flag, tmp_path):
    marker = tmp_path / "ran"
    source = f"open({str(marker)!r}, 'w').close()\n"
    with pytest.raises(CodeExecutionNotAllowedError, match="--allow-code-execution"):
        run_program(source, allow_code_execution=flag)
    with pytest.raises(CodeExecutionNotAllowedError, match="--allow-code-execution"):
        run_many([source], allow_code_execution=flag)
    assert issubclass(CodeExecutionNotAllowedError, LoopcoderError)
    assert not marker.exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("cpu_seconds", 0),
        ("wall_seconds", -1.0),
        ("cpu_seconds", 1.5),
        ("output_bytes", True),
        ("processes", 2),
        ("open_files", "64"),
        ("tmp_bytes", 0),
        ("tmp_files", -1),
    ],
)
def test_bad_limits_are_one_clear_error(field, value):
    with pytest.raises(LoopcoderError, match=field):
        Limits(**{field: value})


def test_bad_worker_count_is_one_clear_error():
    with pytest.raises(LoopcoderError, match="workers"):
        run_many(["pass"], workers=0, allow_code_execution=True)


# ---------------------------------------------------------------------------------------------- basics


def test_a_passing_program_runs_in_a_fresh_directory_that_is_removed_afterwards():
    result = run("""
        import os, sys
        cwd = os.getcwd()
        os.makedirs("sub/deeper")
        with open("sub/deeper/data.txt", "w") as f:
            f.write("x")
        os.chmod("sub", 0)  # even an unreadable subdirectory must not stop the clean-up
        print(cwd)
        print(sys.flags.isolated, sys.argv[0].startswith(cwd))
    """)
    assert result.passed, result
    assert result.status == "passed" and result.returncode == 0 and result.signal is None
    cwd, flags = result.stdout.splitlines()
    assert flags == "1 True"
    assert os.path.basename(cwd).startswith("loopcoder-sandbox-")
    assert cwd != os.getcwd()
    assert not os.path.exists(cwd)


def test_a_failing_assert_fails_with_its_traceback():
    result = run("x = 3\nassert x == 4, 'x is wrong'\n")
    assert result.status == "failed" and not result.passed
    assert result.returncode == 1
    assert "AssertionError: x is wrong" in result.stderr
    assert "AssertionError" in result.reason


def test_syntax_errors_and_crashes_fail():
    assert run("def f(:\n").status == "failed"
    crashed = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert crashed.status == "killed" and crashed.signal == "SIGSEGV"


def test_stdin_is_delivered():
    result = run("import sys\nassert sys.stdin.read() == 'two\\nlines'\n", stdin="two\nlines")
    assert result.passed, result
    assert run("import sys\nassert sys.stdin.read() == ''\n").passed  # no stdin: empty, never blocks


def test_limits_are_in_force_inside_the_program():
    limits = Limits(
        cpu_seconds=3,
        wall_seconds=10,
        address_space_bytes=300 << 20,
        file_size_bytes=1 << 20,
        open_files=50,
        processes=6,
    )
    result = run(
        """
        import resource
        for name, want in [("RLIMIT_CPU", 3), ("RLIMIT_AS", 300 << 20), ("RLIMIT_FSIZE", 1 << 20),
                           ("RLIMIT_NOFILE", 50), ("RLIMIT_CORE", 0)]:
            soft, hard = resource.getrlimit(getattr(resource, name))
            assert soft == want, (name, soft, want)
        assert resource.getrlimit(resource.RLIMIT_NPROC)[0] != resource.RLIM_INFINITY
    """,
        limits,
    )
    assert result.passed, result


def test_file_size_limit():
    result = run("open('big', 'wb').write(b'x' * (2 << 20))\n", Limits(file_size_bytes=1 << 20))
    assert not result.passed
    assert "File too large" in result.stderr or result.signal == "SIGXFSZ"


# ------------------------------------------------------------------------------- completion evidence


@pytest.mark.parametrize(
    "exit_code",
    [
        "import sys\nsys.exit(0)\n",
        "raise SystemExit\n",
        "import os\nos._exit(0)\n",
        "exit()\n",
        "def f():\n    import os\n    os._exit(0)\nf()\n",
    ],
)
def test_exiting_with_status_0_before_the_end_is_not_a_pass(exit_code):
    result = run(exit_code + "assert False, 'the checks would have failed'\n")
    assert result.status == "failed" and not result.passed
    assert result.returncode == 0
    assert "no completion evidence" in result.reason


def test_a_failing_program_that_replaces_what_reports_failure_still_fails():
    # Issue 24: the launcher reported a failure through sys.exit, which the program had replaced.
    result = run("""
        import builtins, os, sys, traceback
        sys.exit = lambda *a, **k: None
        sys.excepthook = lambda *a: None
        traceback.print_exception = traceback.print_exc = lambda *a, **k: None
        os._exit = lambda *a: None
        builtins.print = lambda *a, **k: None
        assert False, "the program's own check fails"
    """)
    assert result.status == "failed" and not result.passed, result
    assert result.returncode == 1


def test_printing_or_writing_a_fake_success_marker_is_not_a_pass():
    result = run("""
        import os, sys
        print("passed"); print("ok"); print("PASSED", file=sys.stderr)
        for fd in range(3, 64):  # the launcher's pipes are among these
            try:
                os.write(fd, b"0123456789abcdef0123456789abcdef\\npassed\\n")
            except OSError:
                pass
        assert False
    """)
    assert not result.passed and result.status == "failed"
    exited_early = run("""
        import os
        for fd in range(3, 64):
            try:
                os.write(fd, b"0123456789abcdef0123456789abcdef\\n")
            except OSError:
                pass
        os._exit(0)
    """)
    assert exited_early.status == "failed" and exited_early.returncode == 0
    scribbled = run("""
        import os
        for fd in range(3, 64):
            try:
                os.write(fd, b"passed\\n")
            except OSError:
                pass
    """)
    assert scribbled.status == "failed"  # it ran to the end, but its scribbling corrupted the evidence
    assert "forged or corrupted" in scribbled.reason


# ---------------------------------------------------------------------------------------- hostile programs


def test_infinite_loop_times_out_and_its_directory_is_removed():
    start = time.monotonic()
    result = run(
        """
        import os
        print(os.getcwd(), flush=True)
        while True:
            pass
    """,
        Limits(cpu_seconds=30, wall_seconds=1.5),
    )
    assert result.status == "timeout" and not result.passed
    assert 1.5 <= result.wall_seconds < 5 and time.monotonic() - start < 6
    assert not os.path.exists(result.stdout.strip())
    assert_evaluator_carries_on()


def test_sleeping_forever_times_out():
    result = run("import time\ntime.sleep(3600)\n", Limits(wall_seconds=1.0))
    assert result.status == "timeout"


def test_cpu_time_limit_kills_a_busy_loop():
    result = run("while True:\n    pass\n", Limits(cpu_seconds=1, wall_seconds=20))
    assert result.status == "killed" and result.signal in ("SIGXCPU", "SIGKILL")
    assert result.wall_seconds < 10


FORK_COUNT = """
import os, time
started = 0
for _ in range(100):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(1)
        os._exit(0)
    started += 1
print(started)
"""

FORK_BOMB = """
import os, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
if os.getuid() == 0 or hard == resource.RLIM_INFINITY or hard > 64:
    print("refusing: no process cap", soft, hard)
    raise SystemExit(3)
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@pytest.mark.slow
def test_fork_bomb_is_capped_and_every_process_is_gone_afterwards():
    limits = Limits(cpu_seconds=2, wall_seconds=2, processes=8)
    # First prove the cap with a program that ends by itself: launcher, init and program are 3 of the 8.
    counted = run(FORK_COUNT, limits)
    assert counted.passed, counted
    assert 0 < int(counted.stdout) <= 5
    bomb = run(FORK_BOMB, limits)
    assert "refusing" not in bomb.stdout
    assert bomb.status in ("timeout", "killed") and not bomb.passed
    if AS_ROOT:  # each run has its own uid: nothing of it may survive
        assert wait_until_no_processes_of(bomb.isolation["uid"]) == []
    assert_evaluator_carries_on()


def test_memory_bomb_is_stopped_by_the_address_space_limit():
    result = run(
        """
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft > 256 << 20:
            print("refusing: no memory cap")
            raise SystemExit(3)
        hoard = []
        while True:
            hoard.append(bytearray(32 << 20))
    """,
        Limits(address_space_bytes=256 << 20, wall_seconds=10),
    )
    assert "refusing" not in result.stdout
    assert not result.passed and result.status in ("failed", "killed")
    assert "MemoryError" in result.stderr or result.signal is not None
    assert_evaluator_carries_on()


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_enormous_output_is_capped_and_the_run_ends(stream):
    start = time.monotonic()
    result = run(
        f"""
        import sys
        while True:
            sys.{stream}.write("x" * 100000)
    """,
        Limits(output_bytes=64 << 10, wall_seconds=30),
    )
    assert result.status == "output_limit" and not result.passed
    assert len(getattr(result, stream)) == 64 << 10
    assert getattr(result, f"{stream}_truncated") and result.truncated
    assert time.monotonic() - start < 10  # stopped at the cap, not by the 30 s wall clock


@pytest.mark.skipif(not AS_ROOT, reason="protecting files outside the directory needs the uid drop (root)")
def test_writing_or_deleting_outside_the_directory_changes_nothing(outside_dir):
    private = outside_dir / "target.txt"  # in a directory the program can see but does not own
    private.write_text("original")
    fd, shared_name = tempfile.mkstemp(prefix="loopcoder-sandbox-test-")  # in world-writable /tmp
    os.write(fd, b"original")
    os.close(fd)
    os.chmod(shared_name, 0o644)
    try:
        result = run(f"""
            import os, shutil
            outcomes = {{}}
            for target in [{str(private)!r}, {shared_name!r}]:
                for attack in ("write", "append", "delete", "rename", "chmod", "rmtree-parent"):
                    try:
                        if attack == "write":
                            open(target, "w").write("pwned")
                        elif attack == "append":
                            open(target, "a").write("pwned")
                        elif attack == "delete":
                            os.remove(target)
                        elif attack == "rename":
                            os.rename(target, target + ".moved")
                        elif attack == "chmod":
                            os.chmod(target, 0o777)
                        else:
                            shutil.rmtree(os.path.dirname(target))
                        outcomes.setdefault(target, []).append("done")
                    except OSError:
                        outcomes.setdefault(target, []).append("denied")
            open("inside.txt", "w").write("fine")  # its own directory is writable
            print(outcomes)
        """)
        assert result.passed, result
        outcomes = eval(result.stdout)
        assert outcomes[str(private)] == ["denied"] * 6
        if result.isolation["filesystem"] != "yes":  # else it acted on its own private /tmp, not this file
            assert "done" not in outcomes[shared_name]
        assert private.read_text() == "original"
        with open(shared_name) as f:
            assert f.read() == "original"
        assert oct(os.stat(shared_name).st_mode & 0o777) == oct(0o644)
    finally:
        os.remove(shared_name)


def test_killing_its_parent_does_not_stop_the_evaluator():
    result = run("""
        import os, signal, time
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(0.2)
    """)
    # Its parent is the namespace's init, which signals from inside cannot kill; the run goes on.
    assert result.status in ("passed", "killed")
    assert_evaluator_carries_on()


def test_killing_its_process_group_is_a_failure_and_the_evaluator_carries_on():
    result = run("import os, signal\nos.kill(0, signal.SIGKILL)\n")
    assert result.status == "killed" and result.signal == "SIGKILL"
    assert_evaluator_carries_on()


def test_killing_the_evaluator_by_pid_or_everything_cannot_reach_outside():
    if isolation_report()["pid namespace"] != "yes":
        pytest.skip("without a PID namespace, a same-uid program could signal the evaluator")
    result = run(f"""
        import os, signal
        outcomes = []
        for target in ({os.getpid()}, {os.getppid()}, -1):
            if target == -1 and (os.getuid() == 0 or os.getpid() > 100):
                continue  # only where the namespace and the uid make kill(-1) harmless
            try:
                os.kill(target, signal.SIGKILL)
                outcomes.append("sent")
            except OSError as e:
                outcomes.append(type(e).__name__)
        print(outcomes)
    """)
    assert result.passed, result
    assert "sent" not in result.stdout
    assert_evaluator_carries_on()


def test_network_connection_fails_where_isolation_is_available():
    status = network_isolation()
    assert status == "network namespace: yes" or status.startswith("network namespace: no: ")
    isolated = status == "network namespace: yes"
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        # A listener on the host's loopback; and, only when isolated (so nothing ever leaves), the internet.
        targets = [("127.0.0.1", port)] + ([("1.1.1.1", 53), ("8.8.8.8", 443)] if isolated else [])
        result = run(f"""
            import socket
            outcomes = []
            for host, port in {targets!r}:
                try:
                    socket.create_connection((host, port), timeout=2).close()
                    outcomes.append("connected")
                except OSError as e:
                    outcomes.append(type(e).__name__)
            print(outcomes)
        """)
        assert result.status == "passed", result  # it ran to the end either way: no crash, no hang
        if isolated:
            assert "connected" not in result.stdout
            server.setblocking(False)
            with pytest.raises(BlockingIOError):
                server.accept()
        else:
            assert "connected" in result.stdout  # and the status string said so plainly


@pytest.mark.skipif(not AS_ROOT, reason="the clean-up by uid needs the run's own uid (root)")
def test_where_namespaces_are_refused_the_report_says_so_and_escaped_processes_still_die(monkeypatch):
    monkeypatch.setattr(sandbox, "_NAMESPACES", False)  # as under Docker's default seccomp profile
    with socket.create_server(("127.0.0.1", 0)) as server:
        result = run(f"""
            import os, socket, time
            socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=2).close()
            print("connected")
            if os.fork() == 0:
                os.setsid()  # leave the process group
                if os.fork() == 0:
                    os.close(1)
                    os.close(2)  # and let go of the output pipes
                    time.sleep(600)
                os._exit(0)
            time.sleep(0.2)
        """)
    assert result.passed, result
    assert result.stdout == "connected\n"  # no network namespace here, and the report says so plainly:
    assert result.isolation["network"].startswith("no: ")
    assert result.isolation["pid_namespace"].startswith("no: ")
    assert result.isolation["filesystem"] == "no: switched off by the caller"
    assert wait_until_no_processes_of(result.isolation["uid"], seconds=2) == []
    assert_evaluator_carries_on()


def test_without_a_mount_namespace_the_report_says_so_and_the_run_still_works(monkeypatch):
    monkeypatch.setattr(sandbox, "_PRIVATE_FILESYSTEM", False)  # as where the OS refuses only that
    result = run("""
        import os
        with open("inside.txt", "w") as f:  # its working directory is the host's one, as before
            f.write("fine")
        print(os.getcwd())
    """)
    assert result.passed, result
    assert result.isolation["filesystem"] == "no: switched off by the caller"
    assert result.isolation["network"] == network_isolation().split(": ", 1)[1]  # the rest as usual
    assert not os.path.exists(result.stdout.strip())


def test_program_cannot_see_secrets_in_the_callers_environment(monkeypatch):
    secret = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv("LOOPCODER_TEST_API_KEY", secret)
    result = run("""
        import os
        print(sorted(os.environ))
        print(dict(os.environ))
    """)
    assert result.passed
    assert secret not in result.stdout and "LOOPCODER_TEST_API_KEY" not in result.stdout
    assert sorted(eval(result.stdout.splitlines()[0])) == ["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"]


DRIVER = """
import json, sys, types
package = types.ModuleType("loopcoder")  # the sandbox alone, without importing torch
package.__path__ = [sys.argv[1]]
sys.modules["loopcoder"] = package
from loopcoder.evaluation.sandbox import run_program
print(json.dumps(run_program(sys.stdin.read(), allow_code_execution=True).to_dict()))
"""


def test_program_cannot_read_the_callers_environment_through_proc():
    # The evaluator must have the secret in its environment from its start to show in /proc/PID/environ.
    secret = "s3cr3t-" + os.urandom(8).hex()
    env = {**os.environ, "LOOPCODER_TEST_API_KEY": secret}
    program = textwrap.dedent("""
        import os
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                for part in ("environ", "cmdline"):
                    try:
                        with open(f"/proc/{pid}/{part}", "rb") as f:
                            data = f.read()
                    except OSError:
                        continue
                    for item in data.split(b"\\0"):
                        if item.startswith(b"LOOPCODER_TEST_API_KEY="):
                            found.append(item.decode())
        print(found, os.environ.get("LOOPCODER_TEST_API_KEY"))
    """)
    package_dir = os.path.dirname(os.path.dirname(sandbox.__file__))
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, package_dir],
        input=program,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["passed"], result
    assert secret not in result["stdout"]
    assert result["stdout"].strip() == "[] None"


# ---------------------------------------------------------------------------------- private filesystem

SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")
UNPRIVILEGED_UID = 1_600_000_000  # a caller that is not root; below the range of the runs' own uids


def skip_without_private_filesystem(what: str = "") -> str:
    status = isolation_report().get("private filesystem", "missing")
    if status.startswith("no: ") or (what and what in status):
        pytest.skip(f"no private filesystem on this machine: {status}")
    return status


def unique_name() -> str:
    return "loopcoder-sandbox-test-" + os.urandom(6).hex()


def host_leftovers(name: str) -> list[str]:
    """Entries in the host's shared temporary directories whose names start with `name`."""
    return [os.path.join(d, e) for d in SHARED_TMP if os.path.isdir(d) for e in os.listdir(d) if e.startswith(name)]


def remove_leftovers(name: str) -> None:
    for path in host_leftovers(name):  # only where a test has already failed: keep the host clean anyway
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def reachable_by_everyone(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


@pytest.fixture
def outside_dir():
    """A directory outside every temporary directory (so the program sees it) that every uid can reach
    (so the run's own uid can pass through), removed afterwards."""
    private = [Path(d) for d in ("/tmp", "/var/tmp", "/dev/shm")]  # the program gets its own copies of these
    for parent in (PROJECT, Path("/run")):
        inside_private = any(parent.resolve().is_relative_to(d.resolve()) for d in private if d.exists())
        if not inside_private and parent.is_dir() and os.access(parent, os.W_OK) and reachable_by_everyone(parent):
            break
    else:
        pytest.skip("no directory outside /tmp that every uid can reach (the checkout is private)")
    path = Path(tempfile.mkdtemp(prefix=".sandbox-test-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_writes_to_the_shared_temporary_directories_stay_private_and_vanish():
    skip_without_private_filesystem()
    name = unique_name()
    try:
        result = run(f"""
            import os
            for d in {SHARED_TMP!r}:
                with open(os.path.join(d, {name!r}), "w") as f:
                    f.write("planted")
                os.makedirs(os.path.join(d, {name!r} + ".dir", "deeper"), exist_ok=True)  # /var/tmp may be /tmp
            print(sorted(set(os.listdir("/tmp")) - {{os.path.basename(os.getcwd())}}))
        """)
        assert host_leftovers(name) == []
        assert result.passed, result  # the private directories are writable: programs that use /tmp work
        # nothing of the host's /tmp is in sight, but for the interpreter's and this checkout's own paths, which
        # the fresh root binds (read-only) where they are: a clone under /tmp puts its top directory there
        bound = {Path(q).relative_to("/tmp").parts[0] for q in _interpreter_paths() if Path(q).is_relative_to("/tmp")}
        assert sorted(set(eval(result.stdout)) - bound) == [name, name + ".dir"]
    finally:
        remove_leftovers(name)


def test_each_run_has_its_own_temporary_directories_and_tempfile_works():
    skip_without_private_filesystem()
    name = unique_name()
    program = f"""
        import os, tempfile, time
        mine = os.urandom(8).hex()
        made = [tempfile.mkdtemp(), tempfile.mkdtemp(dir="/tmp"), tempfile.mkdtemp(dir="/dev/shm")]
        paths = [os.path.join(d, "data") for d in made] + [os.path.join(d, {name!r}) for d in {SHARED_TMP!r}]
        for path in paths:  # the last three: the same names in every run
            with open(path, "w") as f:
                f.write(mine)
        time.sleep(0.5)  # both runs are alive at once
        for path in paths:
            with open(path) as f:
                assert f.read() == mine, path
        print(made)
    """
    try:
        batch = run_many([textwrap.dedent(program)] * 2, QUICK, workers=2, allow_code_execution=True)
        assert host_leftovers(name) == []
        for result in batch.results:
            assert result.passed, result
            assert not any(os.path.exists(d) for d in eval(result.stdout))
    finally:
        remove_leftovers(name)


def test_proc_shows_only_the_runs_own_processes():
    skip_without_private_filesystem("/proc")
    result = run("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n")
    assert result.passed, result
    assert eval(result.stdout) == [1, 2]  # the namespace's init and the program


def test_creating_many_files_stops_at_the_cap_and_leaves_nothing():
    skip_without_private_filesystem()
    name = unique_name()
    try:
        result = run(
            f"""
            import errno, os
            made = 0
            try:
                for i in range(100000):  # across the shared directories and its own: one cap for all
                    open(os.path.join(("/tmp", "/var/tmp", "/dev/shm", ".")[i % 4], "{name}-%d" % i), "w").close()
                    made += 1
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
            print(made)
        """,
            Limits(tmp_files=300),
        )
        assert host_leftovers(name) == []
        assert result.passed, result
        assert int(result.stdout) == 300
    finally:
        remove_leftovers(name)
    assert_evaluator_carries_on()


def test_filling_the_temporary_space_beyond_its_cap_fails_cleanly():
    skip_without_private_filesystem()
    name = unique_name()
    try:
        result = run(
            f"""
            import os
            for i in range(1000):  # 1 MiB files, under the file-size limit, until the space is full
                with open(os.path.join(("/dev/shm", "/tmp", "/var/tmp", ".")[i % 4], "{name}-%d" % i), "wb") as f:
                    f.write(b"x" * (1 << 20))
                print(i + 1, flush=True)
        """,
            Limits(tmp_bytes=8 << 20, wall_seconds=20),
        )
        assert host_leftovers(name) == []
        assert result.status == "failed", result
        assert "No space left on device" in result.reason
        assert result.stdout.split()[-1] == "8"  # exactly the cap, shared by the four directories
    finally:
        remove_leftovers(name)
    after = run("import os\nassert os.listdir('/dev/shm') == [], os.listdir('/dev/shm')\n")
    assert after.passed, after  # the next run starts empty


def test_a_working_directory_outside_tmp_is_private_and_capped(outside_dir, monkeypatch):
    skip_without_private_filesystem()
    outside_dir.chmod(0o755)  # the run's uid must be able to pass through to its directory
    monkeypatch.setattr(tempfile, "tempdir", str(outside_dir))  # where the sandbox makes its directories
    result = run(
        """
        import os
        print(os.getcwd(), sorted(os.listdir(".")))
        with open("big", "wb") as f:
            f.write(b"x" * (2 << 20))
    """,
        Limits(tmp_bytes=1 << 20),
    )
    cwd, listing = result.stdout.split(" ", 1)
    assert os.path.dirname(cwd) == str(outside_dir)
    assert eval(listing) == ["program.py"]  # not the launcher or anything else of the host's directory
    assert result.status == "failed" and "No space left on device" in result.reason
    assert os.listdir(outside_dir) == []


def test_the_rest_of_the_host_is_read_only_to_the_program(outside_dir):
    skip_without_private_filesystem()
    outside_dir.chmod(0o1777)  # world-writable, like a shared scratch directory outside /tmp
    existing = outside_dir / "existing.txt"
    existing.write_text("original")
    existing.chmod(0o666)
    result = run(f"""
        import errno, os
        outcomes = []
        for attack in ("create", "append", "mkdir", "symlink"):
            try:
                if attack == "create":
                    open({str(outside_dir / "new.txt")!r}, "w").close()
                elif attack == "append":
                    open({str(existing)!r}, "a").write("pwned")
                elif attack == "mkdir":
                    os.mkdir({str(outside_dir / "new-dir")!r})
                else:
                    os.symlink("/tmp", {str(outside_dir / "link")!r})
                outcomes.append("done")
            except OSError as e:
                outcomes.append(errno.errorcode[e.errno])
        print(outcomes)
    """)
    assert result.passed, result
    # The run's fresh root holds none of the host's directories but the system's: not even in sight.
    assert eval(result.stdout) == ["ENOENT"] * 4
    assert sorted(os.listdir(outside_dir)) == ["existing.txt"]
    assert existing.read_text() == "original"


UNPRIVILEGED_PROGRAM = """
import ctypes, errno, json, os, site
outcomes = {}
for what, path, mode in TARGETS + [("site-packages", os.path.join(site.getsitepackages()[0], "evil.pth"), "w")]:
    try:
        with open(path, mode) as f:
            f.write("import os; os.system('echo pwned')\\n")
        outcomes[what] = "written"
    except OSError as e:
        outcomes[what] = errno.errorcode[e.errno]
libc = ctypes.CDLL(None, use_errno=True)
with open("/proc/self/status") as f:
    outcomes["capabilities"] = [line.split()[1] for line in f if line.startswith("CapEff")][0]
outcomes["umount /tmp"] = libc.umount2(b"/tmp", 2)  # MNT_DETACH: would show the host's /tmp again
outcomes["remount / read-write"] = libc.mount(None, b"/", None, ctypes.c_ulong(32 | 4096), None)
print(json.dumps(outcomes))
"""


def runs_as(as_user: dict, python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "pass"], timeout=60, **as_user).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not AS_ROOT, reason="making an unprivileged caller needs root")
def test_an_unprivileged_callers_home_project_and_site_packages_are_out_of_reach(outside_dir):
    # Not root, the sandbox cannot drop to another uid: the program runs as the caller, who owns a home,
    # a checkout and a virtual environment. Only the private filesystem keeps the program's hands off them.
    uid = UNPRIVILEGED_UID
    as_user = {"user": uid, "group": uid, "extra_groups": [], "env": {"PATH": "/usr/bin:/bin", "HOME": "/"}}
    # One every uid can read (the sandbox's own may live under /root, which its fresh root binds).
    python = next(p for p in (isolation_report()["interpreter"], *sandbox._FALLBACK_PYTHONS) if runs_as(as_user, p))
    userns = "import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare(0x10000000) != 0)"  # CLONE_NEWUSER
    if subprocess.run([python, "-c", userns], timeout=60, **as_user).returncode != 0:
        pytest.skip("this machine gives no user namespaces to unprivileged users")
    home, project, venv = outside_dir / "home", outside_dir / "project", outside_dir / "venv"
    home.mkdir()
    (home / ".bashrc").write_text("original\n")
    package = project / "src" / "loopcoder"
    sandbox_files = ("sandbox.py", "sandbox_launcher.py", "cgroups.py")
    for part in (
        "utils/__init__.py",
        "utils/errors.py",
        "evaluation/__init__.py",
        *(f"evaluation/{f}" for f in sandbox_files),
    ):  # the sandbox alone
        (package / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT / "src" / "loopcoder" / part, package / part)
    for path in [outside_dir, *outside_dir.rglob("*")]:
        os.chown(path, uid, uid)
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120, **as_user)
    site_packages = subprocess.run(
        [venv / "bin" / "python", "-c", "import site; print(site.getsitepackages()[0])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        **as_user,
    ).stdout.strip()
    name = unique_name()
    before = {p: p.read_bytes() for p in [home / ".bashrc", package / "evaluation" / "sandbox.py"]}
    driver = subprocess.Popen(
        [venv / "bin" / "python", "-c", DRIVER, str(package)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=project,
        **as_user,
    )
    targets = [(d, os.path.join(d, name), "w") for d in SHARED_TMP] + [
        ("home", str(home / ".bashrc"), "a"),
        ("home, new file", str(home / "new.txt"), "w"),
        ("project", str(package / "evaluation" / "sandbox.py"), "a"),
        ("project, new file", str(project / "new.txt"), "w"),
        ("through the caller's /proc/PID/root", f"/proc/{driver.pid}/root{home}/via-proc.txt", "w"),
    ]
    try:
        out, err = driver.communicate(f"TARGETS = {targets!r}\n" + UNPRIVILEGED_PROGRAM, timeout=120)
        assert driver.returncode == 0, err
        result = json.loads(out)
        assert result["passed"], result
        outcomes = json.loads(result["stdout"])
        assert host_leftovers(name) == []
        assert {p: p.read_bytes() for p in before} == before
        assert sorted(os.listdir(home)) == [".bashrc"]
        assert not (project / "new.txt").exists()
        assert "evil.pth" not in os.listdir(site_packages)
        assert result["isolation"]["network"] == "yes", result["isolation"]  # user namespaces work here
        assert result["isolation"].get("filesystem") == "yes", result["isolation"]
        assert [k for k, v in outcomes.items() if v == "written"] == [d for d in SHARED_TMP]  # its own /tmp only
        assert outcomes["capabilities"] == "0000000000000000"  # the user namespace's are dropped
        assert outcomes["umount /tmp"] == -1 and outcomes["remount / read-write"] == -1
    finally:
        if driver.poll() is None:
            driver.kill()
        remove_leftovers(name)
    assert wait_until_no_processes_of(uid) == []


# ------------------------------------------------------------------------------------ many, report, CLI


def test_run_many_keeps_order_reports_progress_and_throughput():
    programs = [f"assert {i} % 3 != 0\n" for i in range(9)]
    seen = []
    batch = run_many(
        programs,
        QUICK,
        workers=2,
        allow_code_execution=True,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert [r.passed for r in batch.results] == [i % 3 != 0 for i in range(9)]
    assert seen == [(i, 9) for i in range(1, 10)]
    assert batch.programs_per_second > 0 and batch.workers == 2


def test_isolation_report_says_what_is_isolated_in_plain_words():
    report = isolation_report()
    assert set(report) == {
        "interpreter",
        "network",
        "pid namespace",
        "unprivileged uid",
        "no_new_privs",
        "private filesystem",
        "memory cap",
        "shared memory cap",
        "seccomp filter",
    }
    assert all(isinstance(v, str) and v for v in report.values())
    assert report["network"] == network_isolation().split(": ", 1)[1]
    assert report["network"] == "yes" or report["network"].startswith("no: ")
    fs = report["private filesystem"]
    assert fs == "yes" or fs.startswith("partly: ") or fs.startswith("no: ")
    if AS_ROOT:
        assert report["unprivileged uid"].startswith("yes")


def test_command_line(tmp_path, capsys):
    good = tmp_path / "good.py"
    good.write_text("print('hello')\n")
    bad = tmp_path / "bad.py"
    bad.write_text("assert False\n")
    assert sandbox._main([str(good)]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert sandbox._main([str(good), "--allow-code-execution", "--wall-seconds", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "passed" and report["stdout"] == "hello\n"
    assert sandbox._main([str(bad), "--allow-code-execution"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "failed"
    assert sandbox._main([str(tmp_path / "missing.py"), "--allow-code-execution"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert sandbox._main([str(good), "--allow-code-execution", "--cpu-seconds", "0"]) == 2
    assert "cpu_seconds" in capsys.readouterr().err


def test_without_the_fork_server_each_run_starts_an_interpreter_and_works_the_same(monkeypatch):
    monkeypatch.setattr(sandbox, "_FORK_SERVER", False)
    assert sandbox._plan(None).server is None
    summed = run("print(sum(range(10)))\n")
    assert summed.stdout == "45\n"
    assert summed.cpu_seconds is not None  # read from /proc before the launcher is reaped
    failed = run("import sys\nsys.exit(3)\n")
    assert failed.status == "failed" and failed.returncode == 3
    assert run("import time\ntime.sleep(60)\n", Limits(wall_seconds=1)).status == "timeout"


def test_a_lost_fork_server_falls_back_to_an_interpreter_per_run():
    plan = sandbox._plan(sys.executable)  # a plan (and server) of its own: the shared one stays
    if plan.server is None:
        pytest.skip("no fork server here")
    assert run("pass\n", python=sys.executable).passed
    plan.server.proc.kill()
    plan.server.proc.wait()
    after = run("print('still here')\n", python=sys.executable)
    assert after.passed and after.stdout == "still here\n", after
    assert_evaluator_carries_on()


def test_killed_results_name_the_signal():
    result = run("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n")
    assert result.status == "killed" and result.signal == signal.SIGTERM.name


@pytest.mark.parametrize("python", ["/nonexistent/python3", "/bin/false"])
def test_an_interpreter_that_cannot_run_the_sandbox_is_one_clear_error(python):
    with pytest.raises(sandbox.SandboxUnavailableError, match=python):
        run_program("pass\n", allow_code_execution=True, python=python)
    assert issubclass(sandbox.SandboxUnavailableError, LoopcoderError)


def test_programs_must_be_source_text():
    with pytest.raises(LoopcoderError, match="source text"):
        run_program(b"pass", allow_code_execution=True)
    with pytest.raises(LoopcoderError, match="source text"):
        run_many(["pass", None], allow_code_execution=True)
