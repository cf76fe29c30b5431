"""Issue 24, items 3 and 4: all the memory a run can hold is capped, and it sees no host socket.

Memory: the run's cgroup caps everything it holds (processes, memfd, tmpfs, shared memory); where no
cgroup can be made, a seccomp filter refuses memfd; SysV shared memory is capped in the run's own IPC
namespace either way. Each hostile program stops hoarding at a bound far below what it asks for, so a
regression fails a test without hurting the machine.

The filesystem: a fresh root holds the system's directories and the run's own, nothing else of the
host; a unix socket listening under /run or in a directory outside the workspace is out of reach.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from loopcoder.evaluation import sandbox
from loopcoder.evaluation.sandbox import Limits, isolation_report, run_command, run_program

MiB = 1 << 20
PROJECT = Path(__file__).resolve().parents[2]


def run(source: str, limits: Limits, **kwargs) -> sandbox.ExecResult:
    return run_program(textwrap.dedent(source), limits, allow_code_execution=True, **kwargs)


def cgroup_in_force() -> bool:
    return isolation_report()["memory cap"].startswith("yes")


def held(result: sandbox.ExecResult) -> int:
    """The last number the hoarding program printed: MiB it held at that moment."""
    numbers = [int(x) for x in result.stdout.split() if x.isdigit()]
    return numbers[-1] if numbers else 0


# Asks for 640 MiB of memfd memory in 8 MiB files (each under the file-size limit), outside RLIMIT_AS.
MEMFD_HOARD = """
import os
held = []
for i in range(80):
    try:
        fd = os.memfd_create("hoard")
    except OSError as e:
        print("refused", e.strerror, flush=True)
        raise SystemExit(3)
    os.ftruncate(fd, 8 << 20)
    os.pwrite(fd, b"x" * (8 << 20), 0)
    held.append(fd)
    print((i + 1) * 8, flush=True)
"""

# Asks for 512 MiB of SysV shared memory in 32 MiB segments, each touched and detached (still held).
SHM_HOARD = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmdt.argtypes = [ctypes.c_void_p]
total = 0
for i in range(16):
    sid = libc.shmget(0, 32 << 20, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
    if sid < 0:
        print("refused", os.strerror(ctypes.get_errno()), flush=True)
        break
    addr = libc.shmat(sid, None, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        print("refused", os.strerror(ctypes.get_errno()), flush=True)
        break
    ctypes.memset(addr, 1, 32 << 20)
    libc.shmdt(addr)
    total += 32
    print(total, flush=True)
"""

# Four children of 160 MiB each, every one under RLIMIT_AS, all holding it at once for 2 s: 640 MiB.
FORKED_HOARD = """
import os, time
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(160 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(2)
        os._exit(0)
    children.append(pid)
held = sum(os.waitpid(pid, 0)[1] == 0 for pid in children)
print(held * 160)
"""


def test_memfd_beyond_the_memory_cap_is_contained():
    cap = 192 * MiB
    result = run(MEMFD_HOARD, Limits(memory_bytes=cap, wall_seconds=30, open_files=256))
    assert not result.passed, result
    assert held(result) * MiB <= cap  # never more than the cap, whatever the mechanism
    if cgroup_in_force():
        assert result.status == "killed" and "out of memory" in result.reason, result
    else:
        assert "refused" in result.stdout, result


def test_without_a_cgroup_memfd_is_refused_by_the_seccomp_filter(monkeypatch):
    monkeypatch.setattr(sandbox, "_CGROUPS", False)  # as where no cgroup can be made
    report = isolation_report()
    assert report["memory cap"] == "no: switched off by the caller"
    if not report["seccomp filter"].startswith("yes"):
        pytest.skip(f"no seccomp filter here: {report['seccomp filter']}")
    result = run(MEMFD_HOARD, Limits(wall_seconds=30))
    assert result.status == "failed" and result.returncode == 3, result
    assert result.stdout.startswith("refused Operation not permitted")
    unshare = run(
        "import ctypes\nprint(ctypes.CDLL(None, use_errno=True).unshare(0x10000000), ctypes.get_errno())\n",
        Limits(wall_seconds=30),
    )
    assert unshare.stdout.split() == ["-1", "1"], unshare  # no user namespace, so no tmpfs of its own


@pytest.mark.parametrize("cgroups", [True, False], ids=["with a cgroup", "without"])
def test_sysv_shared_memory_beyond_its_cap_is_contained(monkeypatch, cgroups):
    monkeypatch.setattr(sandbox, "_CGROUPS", cgroups)
    report = isolation_report()
    if not report["shared memory cap"].startswith("yes"):
        pytest.skip(f"no IPC namespace here: {report['shared memory cap']}")
    limits = Limits(tmp_bytes=64 * MiB, wall_seconds=30)
    result = run(SHM_HOARD, limits)
    assert "refused" in result.stdout, result
    assert held(result) * MiB <= limits.tmp_bytes
    assert str(limits.tmp_bytes) in report["shared memory cap"]


def test_memory_in_all_processes_together_is_capped():
    if not cgroup_in_force():
        pytest.skip("no cgroup here: memory is capped per process only (RLIMIT_AS)")
    cap = 256 * MiB
    result = run(FORKED_HOARD, Limits(memory_bytes=cap, wall_seconds=30))
    # The kernel kills some of the run's processes at the cap: the children, or the program itself.
    if result.passed:
        assert held(result) * MiB <= cap, result
    else:
        assert result.status == "killed" and "out of memory" in result.reason, result


UNPRIVILEGED_DRIVER = """
import json, sys, types
package = types.ModuleType("loopcoder")  # the sandbox alone, without importing torch
package.__path__ = [sys.argv[1]]
sys.modules["loopcoder"] = package
from loopcoder.evaluation.sandbox import isolation_report, run_program
report = isolation_report()
results = [run_program(p, allow_code_execution=True).to_dict() for p in json.loads(sys.stdin.read())]
print(json.dumps({"report": report, "results": results}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="making an unprivileged caller needs root")
def test_an_unprivileged_caller_without_memory_caps_gets_memfd_and_shared_memory_refused(visible_dir):
    # Not root: no cgroup to make (none is delegated here), and the IPC namespace's limits need uid 0 in
    # its user namespace, which the caller's run does not have. The seccomp filter refuses all three.
    uid = 1_600_000_000
    package = visible_dir / "loopcoder"
    sandbox_files = ("__init__.py", "sandbox.py", "sandbox_launcher.py", "cgroups.py")
    for part in [
        "utils/__init__.py",
        "utils/errors.py",
        *(f"evaluation/{f}" for f in sandbox_files),
    ]:  # the sandbox alone
        (package / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT / "src" / "loopcoder" / part, package / part)
    for path in [visible_dir, *visible_dir.rglob("*")]:
        os.chown(path, uid, uid)
    as_user = {"user": uid, "group": uid, "extra_groups": [], "env": {"PATH": "/usr/bin:/bin", "HOME": "/"}}
    done = subprocess.run(
        ["/usr/bin/python3", "-c", UNPRIVILEGED_DRIVER, str(package)],
        input=json.dumps([MEMFD_HOARD, SHM_HOARD]),
        capture_output=True,
        text=True,
        cwd=visible_dir,
        timeout=300,
        **as_user,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    if out["report"]["memory cap"].startswith("yes") or out["report"]["shared memory cap"].startswith("yes"):
        pytest.skip(f"this machine caps an unprivileged caller's memory: {out['report']}")
    if not out["report"]["seccomp filter"].startswith("yes"):
        pytest.skip(f"no seccomp filter here: {out['report']['seccomp filter']}")
    assert "SysV shared memory" in out["report"]["seccomp filter"]
    for result in out["results"]:
        assert result["stdout"].startswith("refused Operation not permitted"), result


def test_a_cgroup_is_made_per_run_and_removed_afterwards():
    if not cgroup_in_force():
        pytest.skip("no cgroup here")
    hierarchy = sandbox._plan(None).cgroups
    result = run("import os\nprint(open('/proc/self/cgroup').read())\n", Limits(wall_seconds=30))
    assert result.passed, result
    assert sandbox.cgroups.PREFIX + str(os.getpid()) in result.stdout  # the run was in its own cgroup
    mine = [
        n
        for d in {hierarchy.memory, hierarchy.pids}
        for n in os.listdir(d)
        if n.startswith(f"{sandbox.cgroups.PREFIX}{os.getpid()}-")
    ]
    assert mine == []  # and it is gone


# ---------------------------------------------------------------------------------------- the fresh root


def private_root() -> str:
    status = isolation_report()["private filesystem"]
    if status != "yes":
        pytest.skip(f"no fresh root on this machine: {status}")
    return status


@pytest.fixture
def visible_dir():
    """A directory outside /tmp and outside any workspace that every uid can reach and write."""
    for parent in (PROJECT, Path("/run")):
        if (
            parent.is_dir()
            and os.access(parent, os.W_OK)
            and all(os.stat(p).st_mode & 0o001 for p in [parent, *parent.parents])
        ):
            break
    else:
        pytest.skip("no directory outside /tmp that every uid can reach")
    path = Path(tempfile.mkdtemp(prefix=".sandbox-test-", dir=parent))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def listeners(visible_dir):
    """Unix sockets listening under /run and in a directory outside the workspace, open to everyone."""
    places = [visible_dir / "listener.sock"]
    if os.access("/run", os.W_OK):
        places.append(Path("/run") / f"loopcoder-sandbox-test-{os.urandom(6).hex()}.sock")
    servers = []
    try:
        for path in places:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(path))
            os.chmod(path, 0o777)  # only the sandbox may keep the program out, not permissions
            server.listen(8)
            server.setblocking(False)
            servers.append((path, server))
        yield servers
    finally:
        for path, server in servers:
            server.close()
            path.unlink(missing_ok=True)


CONNECT = """
import errno, socket, sys
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.sendall(b"hello from the sandbox")
        print("connected")
    except OSError as e:
        print(errno.errorcode.get(e.errno, e.errno))
"""


def assert_nobody_called(servers):
    for _, server in servers:
        with pytest.raises(BlockingIOError):
            server.accept()


def test_a_program_reaches_no_unix_socket_of_the_host(listeners):
    private_root()
    paths = [str(p) for p, _ in listeners]
    result = run(f"import sys\nsys.argv[1:] = {paths!r}\n" + CONNECT, Limits(wall_seconds=30))
    assert result.passed, result
    assert result.stdout.split() == ["ENOENT"] * len(paths)  # not even in sight
    assert_nobody_called(listeners)


def test_a_command_reaches_no_unix_socket_of_the_host(listeners, tmp_path):
    private_root()
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "connect.py").write_text(CONNECT)
    paths = " ".join(str(p) for p, _ in listeners)
    result = run_command(
        f"python3 connect.py {paths}", Limits(wall_seconds=30), workspace=workspace, allow_code_execution=True
    )
    assert result.passed, result
    assert result.stdout.split() == ["ENOENT"] * len(listeners)
    assert_nobody_called(listeners)


def test_the_fresh_root_holds_only_what_programs_need():
    private_root()
    result = run(
        """
        import os
        absent = [p for p in ("/home", "/root/.bashrc", "/run", "/var/run", "/var/lib", "/sys", "/srv", "/mnt",
                              "/opt", "/boot", "/etc/shadow", "/etc/ssh", "/dev/pts", "/dev/tty", "/dev/vda")
                  if os.path.lexists(p)]
        print(absent)
        print(sorted(os.listdir("/dev")))
        print(sorted(os.listdir("/var")))
        outcomes = []
        for path in ("/usr/loopcoder-test", "/etc/passwd", "/new-top-level", "/dev/loopcoder-test"):
            try:
                open(path, "a").close()
                outcomes.append("written")
            except OSError as e:
                outcomes.append(e.strerror)
        print(outcomes)
        with open("/dev/null", "w") as f:
            f.write("fine")  # the devices work
        assert len(open("/dev/urandom", "rb").read(16)) == 16
    """,
        Limits(wall_seconds=30),
    )
    assert result.passed, result
    absent, devices, var, outcomes = result.stdout.splitlines()
    assert eval(absent) == []
    assert eval(devices) == ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero"]
    assert eval(var) == ["tmp"]
    assert "written" not in eval(outcomes)
