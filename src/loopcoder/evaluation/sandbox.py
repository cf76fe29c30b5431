"""Run untrusted Python programs (model-written code) in a contained child process.

Usable on its own: `python -m loopcoder.evaluation.sandbox FILE.py --allow-code-execution` runs one
file and prints the result as JSON. Nothing runs without the explicit opt-in.

Each program gets a fresh interpreter (`python -I`) started in a new session, with a scrubbed
environment, in its own cgroup (a cap on all the memory and processes the run holds, where one can be
made: `cgroups.py`). A small trusted launcher inside that interpreter (`sandbox_launcher.py`) enters
new network/PID/IPC namespaces where the OS allows it, caps the IPC namespace's shared memory, sets
the resource limits, and starts a small init that is PID 1 of the new namespace, so that when the
program ends every process it started ends too. The init builds the run a fresh root filesystem where
the OS allows it (one size-capped tmpfs, pivot_root: the host's /usr and a few files of /etc
read-only, a minimal /dev, a fresh /proc, private /tmp, /var/tmp and /dev/shm, the working directory;
no /home, /root, /run or host socket), drops root to a fresh unprivileged uid (when started as root) or
the user namespace's capabilities (when not), sets no_new_privs, and starts the program. The parent
enforces the wall clock (killing the whole process group and cgroup) and caps stdout and stderr while
reading them. `docs/sandbox.md` states what this does and does not protect against.

Verdicts. A bare program passes on evidence that it ran to its last statement and exited with status
0: a per-run nonce that the launcher echoes only after the program's code returned. Exiting early or
printing a success line cannot produce it, but a program written to cheat can (it owns its process).
So scoring uses checked runs (`Checked`): the untrusted program and a trusted checker run in two
processes that exchange only plain data; the checker decides, and the program cannot reach it. A
command (`run_command`) passes on exit status 0.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import importlib.resources
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from loopcoder.evaluation import cgroups
from loopcoder.utils.errors import LoopcoderError

ALLOW_FLAG = "--allow-code-execution"

Status = Literal["passed", "failed", "timeout", "killed", "output_limit", "error"]

# A fresh uid per run (when we start as root): RLIMIT_NPROC counts per uid, so the process cap is
# per run, and the program owns nothing outside its working directory. The range is far above
# normal user and subuid ranges (below 2**31 so no tool reads it as negative).
_UID_BASE = 1_610_612_736
_UID_SPAN = 1 << 24
# Interpreters tried when we must drop root: the current one first, but it may live where an
# unprivileged uid cannot read its standard library (here: under /root/.pyenv).
_FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
# The launcher's own pipes carry a few short lines; a program scribbling on them is cut off here.
_CHANNEL_CAP = 4096
# After the launcher exits, how long to wait for stragglers (only possible without a PID namespace)
# to release stdout/stderr before we stop reading.
_DRAIN_GRACE_S = 0.5
# Tests switch these off to exercise what happens where the OS refuses them. Where no cgroup can be
# made: rlimits per process, and a seccomp filter against memfd and user namespaces.
_CGROUPS = True
# Where the OS refuses new namespaces (for example
# Docker's default seccomp profile): no network or PID isolation, and the report says so.
_NAMESPACES = True
# And this one only the private filesystem (mount namespace), as where the OS refuses just that.
_PRIVATE_FILESYSTEM = True
# And this one idmapped workspaces (run_command as root), as where the kernel or filesystem refuses them:
# the workspace is then lent to the run's uid (chown) and given back after the run.
_IDMAPPED_WORKSPACE = True
# And this one the fork server: each run's launcher then starts in an interpreter of its own.
_FORK_SERVER = True


class CodeExecutionNotAllowedError(LoopcoderError):
    """Running untrusted code was not explicitly allowed."""

    def __init__(self) -> None:
        super().__init__(
            f"refusing to run untrusted model-generated code without {ALLOW_FLAG} "
            "(allow_code_execution=True); it runs in a sandbox, but read docs/sandbox.md first"
        )


class SandboxUnavailableError(LoopcoderError):
    """The sandbox cannot be set up safely on this machine."""


@dataclass(frozen=True)
class Limits:
    """Per-program limits. CPU, address space, file size and open files are rlimits of each process;
    processes is the rlimit on the run's tasks (threads included; the launcher, the init and the
    program take three; a checked run's checker a fourth), and its cgroup's pids.max. memory_bytes
    caps all the memory the run holds (its processes, its tmpfs, shared memory, kernel buffers) where
    a cgroup can be made (isolation_report says whether); else memory in all is at most processes x
    address space plus the tmpfs. Wall clock and output are enforced by the parent. tmp_bytes and
    tmp_files cap the run's private tmpfs, which holds what it writes to its working directory, /tmp,
    /var/tmp and /dev/shm (in RAM); tmp_bytes also caps its SysV shared memory. They apply only where
    the run has a private filesystem and IPC namespace."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    address_space_bytes: int = 512 << 20
    file_size_bytes: int = 16 << 20
    open_files: int = 128
    processes: int = 8
    output_bytes: int = 1 << 20  # per stream; a program writing more is killed (status output_limit)
    tmp_bytes: int = 64 << 20
    tmp_files: int = 1024
    memory_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            kinds = (int, float) if name == "wall_seconds" else (int,)
            if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
                what = "number" if name == "wall_seconds" else "whole number"
                raise LoopcoderError(f"sandbox limit {name} must be a positive {what}, got {value!r}")
        if self.processes < 4:  # the launcher, the namespace's init and the program are three already
            raise LoopcoderError(f"sandbox limit processes must be at least 4, got {self.processes}")
        if self.memory_bytes < _MIN_MEMORY:  # the run's interpreters alone need some
            raise LoopcoderError(f"sandbox limit memory_bytes must be at least {_MIN_MEMORY}, got {self.memory_bytes}")


_MIN_MEMORY = 64 << 20


@dataclass(frozen=True)
class Checked:
    """A checked run: `program` (untrusted) and `checker` (trusted: no model-written text) run in two
    processes joined by two pipes. Each finds its end of the channel as file descriptors in
    sys.argv[1] (to read) and sys.argv[2] (to write); they exchange plain data (`channel.py`
    has both sides). The verdict is the checker's: it passes if the checker ran to its end and exited
    with status 0. The program never holds the checker's code, memory or evidence pipes; as root it
    runs under another uid, and the checker is not dumpable (no ptrace, no /proc/PID/mem)."""

    program: str
    checker: str


@dataclass
class ExecResult:
    """What happened to one program. `passed` needs the completion evidence and exit status 0."""

    status: Status
    reason: str  # one line, plain words
    returncode: int | None  # the program's exit status, None if it did not exit normally
    signal: str | None  # the signal that ended it, e.g. "SIGKILL", "SIGXCPU"
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    wall_seconds: float
    isolation: dict[str, object] = field(default_factory=dict)
    cpu_seconds: float | None = None  # CPU time of the run's processes, as their parents reaped them

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def truncated(self) -> bool:
        return self.stdout_truncated or self.stderr_truncated

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class BatchResult:
    """Results of `run_many`, in the order of the programs, and the throughput."""

    results: list[ExecResult]
    seconds: float
    workers: int

    @property
    def programs_per_second(self) -> float:
        return len(self.results) / self.seconds if self.seconds > 0 else 0.0


# The launcher: trusted code that runs inside the child interpreter before the program (its own file,
# which is never imported; it is compiled by the interpreter that runs it). Its source is read as package
# data (importlib.resources), so it is found in a wheel or a zip as well.
_LAUNCHER = importlib.resources.files(__package__).joinpath("sandbox_launcher.py").read_text(encoding="utf-8")

_PROBE_PROGRAM = """
import collections, functools, hashlib, heapq, itertools, json, math, random, re, string, typing
assert sum(range(10)) == 45
"""


@dataclass(frozen=True)
class _Plan:
    python: str
    drop_root: bool
    isolation: dict[str, object]
    launcher: bytes | None = None  # compiled by `python` (its bytecode format); None: run the source
    interpreter_paths: tuple[str, ...] = ()  # what the fresh root needs of the host for `python`
    cgroups: cgroups.Hierarchy | str = "no: switched off by the caller"  # where runs' cgroups go, or why not
    server: _ForkServer | None = None  # forks each run's launcher; None: an interpreter per run


_plans: dict[tuple[str | None, bool, bool, bool, bool], _Plan] = {}
_plans_lock = threading.Lock()


def _require_opt_in(allow_code_execution: bool) -> None:
    if allow_code_execution is not True:
        raise CodeExecutionNotAllowedError()


def _scrubbed_env(home: str, tmpdir: str | None = None, path: str = _SAFE_PATH) -> dict[str, str]:
    # Nothing from the caller's environment: API keys and tokens there must not reach the program.
    return {"PATH": path, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home, "TMPDIR": tmpdir or home}


def _compile_launcher(python: str) -> bytes | None:
    """The launcher compiled once by the interpreter that runs it: compiling it costs each run a few
    milliseconds of CPU otherwise. None if that fails (the runs then start from the source)."""
    with tempfile.TemporaryDirectory(prefix="loopcoder-sandbox-") as d:
        source, compiled = os.path.join(d, "launcher.py"), os.path.join(d, "launcher.pyc")
        with open(source, "w", encoding="utf-8") as f:
            f.write(_LAUNCHER)
        command = "import py_compile, sys; py_compile.compile(sys.argv[1], sys.argv[2], doraise=True)"
        try:
            done = subprocess.run(
                [python, "-I", "-B", "-c", command, source, compiled],
                capture_output=True,
                env=_scrubbed_env(d),
                cwd=d,
                timeout=60,
            )
            if done.returncode == 0:
                with open(compiled, "rb") as f:
                    return f.read()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def _interpreter_paths(python: str) -> tuple[str, ...]:
    """The directories an interpreter reads at start and imports from (its prefix, a virtual
    environment's, sys.path), which the fresh root binds read-only where they are not under /usr."""
    command = (
        "import json, os, sys; print(json.dumps([os.path.realpath(sys.executable), sys.prefix, sys.base_prefix,"
        " sys.exec_prefix, sys.base_exec_prefix] + sys.path))"
    )
    try:
        done = subprocess.run(
            [python, "-I", "-c", command], capture_output=True, text=True, env=_scrubbed_env("/"), timeout=60
        )
        paths = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return ()
    real = {os.path.realpath(p) for p in paths if isinstance(p, str) and os.path.isabs(p) and os.path.exists(p)}
    dirs = {p if os.path.isdir(p) else os.path.dirname(p) for p in real}
    # Parents first; a path below one already listed comes with it.
    kept: list[str] = []
    for d in sorted(dirs, key=len):
        if d != "/" and not any(d == k or d.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(d)
    return tuple(kept)


def _fork_server(python: str, launcher: bytes | None) -> _ForkServer | None:
    if not _FORK_SERVER:
        return None
    try:
        return _ForkServer(python, launcher)
    except OSError:
        return None


def _plan(python: str | None) -> _Plan:
    """Choose the interpreter and check, once per interpreter (and isolation setting), that a trivial
    program passes."""
    key = (python, _NAMESPACES, _PRIVATE_FILESYSTEM, _CGROUPS, _FORK_SERVER)
    with _plans_lock:
        if key in _plans:
            return _plans[key]
        hierarchy = cgroups.find() if _CGROUPS else "no: switched off by the caller"
        drop_root = os.geteuid() == 0
        if python is not None:
            candidates = [python]
        elif drop_root:
            candidates = list(dict.fromkeys([sys.executable, *_FALLBACK_PYTHONS]))
        else:
            candidates = [sys.executable]
        failures = []
        for candidate in candidates:
            if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
                failures.append(f"{candidate}: not an executable file")
                continue
            launcher = _compile_launcher(candidate)
            plan = _Plan(candidate, drop_root, {}, launcher, _interpreter_paths(candidate), hierarchy)
            for server in (_fork_server(candidate, launcher), None):  # the probe checks the server too
                trial = replace(plan, server=server)
                probe = _execute(_Job(_PROBE_PROGRAM), Limits(wall_seconds=30.0), None, trial)
                if probe.passed:
                    _plans[key] = replace(trial, isolation=probe.isolation)
                    return _plans[key]
                if server is None:
                    break
                server.close()
            detail = (probe.stderr.strip().splitlines() or [probe.reason])[-1]
            failures.append(f"{candidate}: {detail}")
        who = "an unprivileged uid (we run as root and drop it)" if drop_root else "this user"
        raise SandboxUnavailableError(
            f"no Python interpreter runs a trivial program in the sandbox as {who}: " + "; ".join(failures)
        )


def network_isolation(python: str | None = None) -> str:
    """Whether sandboxed programs are cut off from the network, in plain words, for eval reports."""
    return "network namespace: " + str(_plan(python).isolation.get("network", "no: unknown"))


def isolation_report(python: str | None = None) -> dict[str, str]:
    """One plain-words line per protection, measured on this machine by running a probe program."""
    plan = _plan(python)
    iso = plan.isolation
    if plan.drop_root:
        uid = f"yes (a fresh uid per run, e.g. {iso.get('uid')})"
    else:
        uid = f"no: runs as the caller's uid {iso.get('uid')} (not root, so nothing to drop)"
    return {
        "interpreter": plan.python,
        "network": str(iso.get("network", "no: unknown")),
        "pid namespace": str(iso.get("pid_namespace", "no")),
        "unprivileged uid": uid,
        "no_new_privs": "yes" if iso.get("no_new_privs") else "no",
        "private filesystem": str(iso.get("filesystem", "no: unknown")),
        "memory cap": str(iso.get("memory", "no: unknown")),
        "shared memory cap": str(iso.get("shared_memory", "no: unknown")),
        "seccomp filter": str(iso.get("seccomp", "no: unknown")),
    }


def run_program(
    source: str | Checked,
    limits: Limits | None = None,
    *,
    allow_code_execution: bool,
    stdin: str | bytes | None = None,
    python: str | None = None,
) -> ExecResult:
    """Run one Python program (or a checked run) in the sandbox and say what happened. Refuses
    without the opt-in."""
    _require_opt_in(allow_code_execution)
    job = _program_job(source)
    limits = limits or Limits()
    plan = _plan(python)
    return _execute(job, limits, stdin, plan)


def _program_job(source: object) -> _Job:
    if isinstance(source, Checked):
        if not (isinstance(source.program, str) and isinstance(source.checker, str)):
            raise LoopcoderError("a checked run's program and checker must be Python source text (str)")
        return _Job(source.program, checker=source.checker)
    if not isinstance(source, str):
        raise LoopcoderError(f"a program must be Python source text (str), got {type(source).__name__}")
    return _Job(source)


def run_command(
    command: str,
    limits: Limits | None = None,
    *,
    workspace: str | os.PathLike[str],
    allow_code_execution: bool,
    stdin: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    python: str | None = None,
) -> ExecResult:
    """Run `bash -c command` in the sandbox, with `workspace` as its one writable directory.

    The command gets the same isolation and limits as a program. `workspace`, an existing directory,
    is bound read-write at its own path and is the command's working directory and HOME; what the
    command leaves there stays (and belongs to the workspace's owner again afterwards). Everything
    else is read-only, /tmp, /var/tmp and /dev/shm are private to the call, and no process the command
    started outlives the call. PATH has bash, coreutils, git and the sandbox's python3; the
    environment holds nothing of the caller's but `env`. The status is the exit status: `passed` for
    0, `failed` otherwise (`returncode`), or `timeout`, `killed`, `output_limit`, `error`.
    """
    _require_opt_in(allow_code_execution)
    if not isinstance(command, str):
        raise LoopcoderError(f"a command must be text (str), got {type(command).__name__}")
    if "\0" in command:
        raise LoopcoderError("a command cannot contain a NUL character")
    limits = limits or Limits()
    space = _checked_workspace(workspace)
    plan = _plan(python)
    extra = _checked_env(env)
    bash = shutil.which("bash", path=_SAFE_PATH)
    if bash is None:
        raise SandboxUnavailableError(f"no bash on {_SAFE_PATH}: run_command needs one")
    # python3 on PATH is the sandbox's interpreter: its directory comes first (as activating a venv does).
    here = os.path.dirname(plan.python)
    path = ":".join([here] + [d for d in _SAFE_PATH.split(":") if d != here])
    job = _Job(command=(bash, "-c", command), workspace=space, env={**_scrubbed_env(space, "/tmp", path), **extra})
    return _execute(job, limits, stdin, plan)


# Directories the sandbox sets up itself: a workspace may not be one of them or hold one.
_SYSTEM_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/dev", "/proc", "/usr", "/etc", "/bin", "/lib", "/sys")


def _checked_workspace(workspace: str | os.PathLike[str]) -> str:
    if not isinstance(workspace, (str, os.PathLike)):
        raise LoopcoderError(f"workspace must be a directory path, got {type(workspace).__name__}")
    path = os.path.realpath(os.fspath(workspace))
    if not os.path.isdir(path):
        raise LoopcoderError(f"workspace {os.fspath(workspace)!r} is not an existing directory")
    for system in _SYSTEM_DIRS:
        real = os.path.realpath(system)
        if real == path or real.startswith(path.rstrip("/") + "/"):
            raise LoopcoderError(f"workspace {path!r} cannot be {system} or hold it: pick a directory of its own")
    return path


def _checked_env(env: Mapping[str, str] | None) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise LoopcoderError(f"env must be a mapping of names to values, got {type(env).__name__}")
    for name, value in env.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise LoopcoderError(f"env: {name!r} is not a valid variable name")
        if not isinstance(value, str) or "\0" in value:
            raise LoopcoderError(f"env: the value of {name} must be text without NUL characters")
    return dict(env)


def run_many(
    programs: Sequence[str | Checked],
    limits: Limits | None = None,
    *,
    workers: int | None = None,
    allow_code_execution: bool,
    progress: Callable[[int, int], None] | None = None,
    python: str | None = None,
) -> BatchResult:
    """Run programs (source text, or `Checked` runs) on `workers` parallel sandboxes; results come back
    in the programs' order."""
    _require_opt_in(allow_code_execution)
    bad = [type(p).__name__ for p in programs if not isinstance(p, (str, Checked))]
    if bad:
        raise LoopcoderError(f"programs must be Python source text (str) or Checked, got {bad[0]}")
    jobs = [_program_job(p) for p in programs]
    limits = limits or Limits()
    workers = (os.cpu_count() or 1) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise LoopcoderError(f"workers must be a positive whole number, got {workers!r}")
    plan = _plan(python)  # once, before the threads, so that a setup problem is one clear error
    results: list[ExecResult | None] = [None] * len(programs)
    start = time.perf_counter()
    # Threads suffice: each one only waits on its child process and copies its output.
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
    try:
        futures = {pool.submit(_execute, job, limits, None, plan): i for i, job in enumerate(jobs)}
        for done, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if progress is not None:
                progress(done, len(programs))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - start
    return BatchResult([r for r in results if r is not None], seconds, workers)


# --------------------------------------------------------------------------------------------------
# The parent side of one run.


@dataclass(frozen=True)
class _Job:
    """What one run executes: a Python program (source, and a trusted checker for a checked run), or
    a command in a workspace."""

    source: str | None = None
    checker: str | None = None
    command: tuple[str, ...] | None = None  # argv, its first item an absolute path
    workspace: str | None = None  # the command's one writable directory (a real path)
    env: dict[str, str] | None = None  # the command's whole environment


def _fresh_uid() -> int:
    return _UID_BASE + secrets.randbelow(_UID_SPAN)


def _run_cgroup(plan: _Plan, limits: Limits) -> tuple[cgroups.RunCgroup | None, dict[str, object]]:
    """The run's cgroup (None where there is none), and what the launcher needs to know of it."""
    if isinstance(plan.cgroups, str):
        return None, {"procs": None, "why_not": plan.cgroups}
    try:
        group = cgroups.RunCgroup(plan.cgroups, limits.memory_bytes, limits.processes)
    except OSError as e:
        return None, {"procs": None, "why_not": f"no: could not make the run's cgroup ({e.strerror})"}
    return group, {"procs": group.procs, "in_force": plan.cgroups.describe()}


def _execute(job: _Job, limits: Limits, stdin: str | bytes | None, plan: _Plan) -> ExecResult:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="loopcoder-sandbox-")
    own: list[int] = []  # our pipe ends, closed in `finally`
    owner = None  # the workspace's owner, given it back afterwards
    group = None
    try:
        uid = _fresh_uid() if plan.drop_root else None
        program = None if job.source is None else os.path.join(workdir, "program.py")
        checker = None if job.checker is None else os.path.join(workdir, "checker.py")
        # A file, not -c: `ps` stays readable.
        launcher = os.path.join(workdir, ".launcher.py" if plan.launcher is None else ".launcher.pyc")
        launcher_bytes = _LAUNCHER.encode() if plan.launcher is None else plan.launcher
        files = [(launcher, launcher_bytes, 0o644)]
        if program is not None:
            files.append((program, job.source.encode(), 0o644))
        if checker is not None:  # the init reads it and unlinks it before the program starts
            files.append((checker, job.checker.encode(), 0o600))
        for path, data, mode in files:
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, mode)
        if uid is not None:
            os.chown(workdir, uid, uid)  # the program may write here, and nowhere it owns anything else
        if job.workspace is not None and uid is not None:
            st = os.stat(job.workspace)
            owner = (st.st_uid, st.st_gid)  # the run sees it as its own: idmapped, or lent (chown)
        stdin_file = None
        if stdin is not None:
            # A file, not a pipe: a program that never reads its input cannot block us.
            stdin_path = os.path.join(workdir, "stdin.txt")
            with open(stdin_path, "wb") as f:
                f.write(stdin.encode() if isinstance(stdin, str) else stdin)
            stdin_file = open(stdin_path, "rb")  # noqa: SIM115 (closed below)
        group, group_config = _run_cgroup(plan, limits)
        nonce = secrets.token_hex(16).encode()
        nonce_r, nonce_w = _pipe(own)
        os.write(nonce_w, nonce)  # waits in the pipe until the program has finished
        os.close(nonce_w)
        own.remove(nonce_w)
        report_r, report_w = _pipe(own)
        control_r, control_w = _pipe(own)
        config = {
            "rundir": workdir,
            "program": program,
            "checker": checker,
            "command": job.command,
            "workspace": job.workspace,
            "workspace_owner": owner,
            "uid": uid,
            "checker_uid": _fresh_uid() if uid is not None else None,
            "namespaces": _NAMESPACES,
            "private_filesystem": _PRIVATE_FILESYSTEM,
            "idmapped_workspace": _IDMAPPED_WORKSPACE,
            "interpreter_paths": plan.interpreter_paths,
            "cgroup": group_config,
            "nonce_fd": nonce_r,
            "report_fd": report_w,
            "control_fd": control_w,
            "limits": {
                "cpu_seconds": limits.cpu_seconds,
                "address_space_bytes": limits.address_space_bytes,
                "file_size_bytes": limits.file_size_bytes,
                "open_files": limits.open_files,
                "processes": limits.processes,
                "tmp_bytes": limits.tmp_bytes,
                "tmp_files": limits.tmp_files,
                "shm_bytes": limits.tmp_bytes,
            },
        }
        stdout_r, stdout_w = _pipe(own)
        stderr_r, stderr_w = _pipe(own)
        stdin_fd = stdin_file.fileno() if stdin_file is not None else os.open(os.devnull, os.O_RDONLY)
        env = job.env if job.env is not None else _scrubbed_env(workdir)
        try:
            fds = (stdin_fd, stdout_w, stderr_w, nonce_r, report_w, control_w)
            launched = plan.server.launch(config, env, fds) if plan.server is not None else None
            if launched is None:  # no fork server (or it is gone): an interpreter of its own
                launched = _Popened(
                    subprocess.Popen(
                        # -S: the launcher needs only the standard library; a program's process imports site.
                        [plan.python, "-I", "-S", "-B", launcher, repr(config)],
                        stdin=stdin_fd,
                        stdout=stdout_w,
                        stderr=stderr_w,
                        cwd=workdir,
                        env=env,
                        start_new_session=True,  # its own process group, so the whole group can be killed
                        close_fds=True,
                        pass_fds=(nonce_r, report_w, control_w),
                    )
                )
        finally:
            if stdin_file is not None:
                stdin_file.close()
            else:
                os.close(stdin_fd)
        for fd in (stdout_w, stderr_w, nonce_r, report_w, control_w):  # the child has them: EOF must mean it let go
            os.close(fd)
            own.remove(fd)
        out = _collect(
            launched,
            {"stdout": stdout_r, "stderr": stderr_r, "report": report_r, "control": control_r},
            limits,
            uid,
            group,
        )
        out.out_of_memory = group is not None and group.oom_killed()
        evidence = None if job.command is not None else nonce  # a command's verdict is its exit status
        result = _judge(launched.returncode, out, evidence, limits, time.monotonic() - start)
        result.cpu_seconds = launched.cpu_seconds
        return result
    finally:
        for fd in own:
            os.close(fd)
        if group is not None:
            group.remove()
        if owner is not None and os.stat(job.workspace).st_uid != owner[0]:
            # It was lent to the run's uid (no idmapped mount): every process of the run is dead now,
            # nothing can race the walk that gives it back.
            _chown_tree(job.workspace, *owner)
        shutil.rmtree(workdir, ignore_errors=True)
        if os.path.exists(workdir):  # a last straggler was still writing; it is dead now
            shutil.rmtree(workdir, ignore_errors=True)


def _chown_tree(path: str, uid: int, gid: int) -> None:
    """Give everything under `path` (itself included) to uid:gid, following no symbolic link."""
    os.lchown(path, uid, gid)
    for parent, dirs, names in os.walk(path):
        for name in dirs + names:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(parent, name), uid, gid)


def _pipe(own: list[int]) -> tuple[int, int]:
    r, w = os.pipe()
    own += [r, w]
    return r, w


@dataclass
class _Collected:
    data: dict[str, bytearray]
    truncated: dict[str, bool]
    timed_out: bool = False
    overflowed: str | None = None  # the stream that went over its cap
    out_of_memory: bool = False  # the kernel killed a process of the run at its cgroup's memory cap


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tree_cpu(pid: int) -> float | None:
    """CPU seconds of an exited, not yet reaped process and of the children it reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime, stime, cutime, cstime
    except (OSError, ValueError, IndexError):
        return None


class _Launched:
    """A run's launcher as the parent waits on it: `pid` (also its process group's id, which stays the
    run's until `finish`), `exit_fd` (readable once it has exited; None: poll `exited`), `finish()`
    (wait and release it), then `returncode` (negative: killed by that signal) and `cpu_seconds`."""

    pid: int
    exit_fd: int | None = None
    returncode: int | None = None
    cpu_seconds: float | None = None

    def exited(self) -> bool:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class _Popened(_Launched):
    """A launcher in an interpreter of its own: our child."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.pid = proc, proc.pid
        with contextlib.suppress(AttributeError, OSError):  # no pidfd before Linux 5.3: we poll
            self.exit_fd = os.pidfd_open(proc.pid)

    def exited(self) -> bool:
        """Whether it has exited, without reaping it: its pid (the process group id) stays ours."""
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def finish(self) -> None:
        if self.proc.returncode is None and self.exited():  # poll() would reap it: /proc/PID/stat gone
            self.cpu_seconds = _tree_cpu(self.pid)
        self.returncode = self.proc.wait()
        if self.exit_fd is not None:
            os.close(self.exit_fd)


class _Served(_Launched):
    """A launcher the fork server forked: it says "exit RC" on the run's status socket when it has
    exited, and reaps it when we close the socket."""

    def __init__(self, pid: int, status: socket.socket) -> None:
        self.pid, self.status, self.exit_fd = pid, status, status.fileno()

    def exited(self) -> bool:
        if self.returncode is None:
            self.status.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                self._read_exit()
        return self.returncode is not None

    def _read_exit(self) -> None:
        message = self.status.recv(64).split()  # b"exit RC CPU_MICROSECONDS"; nothing if the server died
        self.returncode = int(message[1]) if message[:1] == [b"exit"] else -signal.SIGKILL
        if len(message) == 3 and int(message[2]) >= 0:
            self.cpu_seconds = int(message[2]) / 1e6

    def finish(self) -> None:
        if self.returncode is None:  # the group was killed: it is exiting
            self.status.setblocking(True)
            self._read_exit()
        if self.cpu_seconds is None:
            self.cpu_seconds = _tree_cpu(self.pid)
        self.status.close()


class _ForkServer:
    """One launcher started per plan that forks each run's launcher (`sandbox_launcher.serve`): runs
    do not pay for an interpreter's start (most of a command's cost on a loaded machine). It dies
    with the socket, so with this process."""

    def __init__(self, python: str, launcher: bytes | None) -> None:
        folder = tempfile.mkdtemp(prefix="loopcoder-sandbox-server-")
        try:
            path = os.path.join(folder, ".launcher.py" if launcher is None else ".launcher.pyc")
            with open(path, "wb") as f:
                f.write(_LAUNCHER.encode() if launcher is None else launcher)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self.proc = subprocess.Popen(
                    [python, "-I", "-S", "-B", path, "--serve", str(theirs.fileno())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=folder,
                    env=_scrubbed_env(folder),
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(theirs.fileno(),),
                )
            finally:
                theirs.close()
            ours.settimeout(60)
            try:
                ready = ours.recv(16)
            except OSError:
                ready = b""
            ours.settimeout(None)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # it has read its code by now
        if ready != b"ready":
            ours.close()
            self.proc.kill()
            self.proc.wait()
            raise OSError("the sandbox's fork server did not start")
        self.socket, self.lock = ours, threading.Lock()
        atexit.register(self.close)

    def launch(self, config: dict[str, object], env: dict[str, str], fds: Sequence[int]) -> _Served | None:
        """Fork a run's launcher with these file descriptors (stdin, stdout, stderr, nonce, report,
        control); None if the server cannot (it is gone, or the request is too big for it)."""
        request = repr({**config, "env": env}).encode()
        if len(request) >= 1 << 20:
            return None
        status, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self.lock:
                socket.send_fds(self.socket, [request], [theirs.fileno(), *fds], socket.MSG_NOSIGNAL)
            reply = status.recv(64)
        except OSError:
            reply = b""
        finally:
            theirs.close()
        if not reply.startswith(b"pid "):
            status.close()
            return None
        return _Served(int(reply.split()[1]), status)

    def close(self) -> None:
        self.socket.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def _kill_uid(uid: int) -> None:
    """Kill every process of a run's own uid: the clean-up where there is no PID namespace, which
    also reaches processes that left the process group with setsid()."""
    for _ in range(100):  # a fork bomb may still be forking (up to its process cap) while we kill
        pids = _processes_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            _kill_if_uid(pid, uid)
        time.sleep(0.01)


def _kill_if_uid(pid: int, uid: int) -> None:
    if not hasattr(os, "pidfd_open"):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        return
    try:  # a pidfd pins the process, so a recycled pid cannot make us kill a stranger
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if _processes_of_uid(uid, [pid]):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _processes_of_uid(uid: int, pids: Sequence[int] | None = None) -> list[int]:
    """Live (not zombie) processes whose real uid is `uid`."""
    found = []
    for pid in pids if pids is not None else [int(n) for n in os.listdir("/proc") if n.isdigit()]:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if fields["State"].split()[0] not in ("Z", "X") and int(fields["Uid"].split()[0]) == uid:
                found.append(pid)
        except (OSError, ValueError, KeyError, IndexError):
            pass
    return found


def _pid_namespaced(out: _Collected) -> bool:
    first = bytes(out.data["control"]).split(b"\n", 1)[0]
    try:
        message = ast.literal_eval(first.decode("utf-8", "replace"))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return isinstance(message, dict) and message.get("pid_namespace") == "yes"


def _collect(
    proc: _Launched,
    fds: dict[str, int],
    limits: Limits,
    uid: int | None,
    group: cgroups.RunCgroup | None = None,
) -> _Collected:
    """Read the child's pipes until it is gone, enforcing the wall clock and the output caps.

    Once the launcher has exited, or we have killed its group, we keep reading until every pipe is
    at EOF (so every process that held one is dead) or a short grace period has passed. With a PID
    namespace everything the program started is dead once the launcher is; without one, a run that
    has its own uid is cleaned up by killing every process of that uid, and a run with a cgroup by
    killing every process in it.
    """
    caps = {
        "stdout": limits.output_bytes,
        "stderr": limits.output_bytes,
        "report": _CHANNEL_CAP,
        "control": _CHANNEL_CAP,
    }
    out = _Collected({name: bytearray() for name in fds}, {name: False for name in fds})
    sel = selectors.DefaultSelector()
    for name, fd in fds.items():
        sel.register(fd, selectors.EVENT_READ, name)
    pidfd = proc.exit_fd  # readable the moment the launcher exits; else we poll
    if pidfd is not None:
        sel.register(pidfd, selectors.EVENT_READ, "exit")
    deadline = time.monotonic() + limits.wall_seconds
    exited = ending = False  # ending: the launcher is gone or killed; we only drain the pipes

    def end_now() -> None:
        nonlocal ending, deadline
        _kill_group(proc.pid)  # whatever is left of its process group dies now
        if not _pid_namespaced(out):
            if group is not None:
                group.kill()
            if uid is not None:
                _kill_uid(uid)
        ending = True
        deadline = min(deadline, time.monotonic() + _DRAIN_GRACE_S)

    try:
        while True:
            streams = [key for key in sel.get_map().values() if key.data != "exit"]
            if ending and not streams:
                break
            now = time.monotonic()
            if now >= deadline:
                if ending:
                    break
                out.timed_out = True
                end_now()
                continue
            wait = deadline - now if pidfd is not None else min(deadline - now, 0.02)
            for key, _ in sel.select(wait):
                if key.data == "exit":
                    continue  # handled below, with the polling fallback
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = out.data[key.data]
                room = caps[key.data] - len(buf)
                buf += chunk[: max(room, 0)]
                if len(chunk) > room:  # over the cap: keep the head, stop the program
                    out.truncated[key.data] = True
                    if out.overflowed is None and not ending:
                        out.overflowed = key.data
                        end_now()
            if not exited and proc.exited():
                exited = True
                if pidfd is not None:
                    sel.unregister(pidfd)
                if not ending:
                    end_now()
    finally:
        _kill_group(proc.pid)
        if not _pid_namespaced(out):
            if group is not None:
                group.kill()
            if uid is not None:
                _kill_uid(uid)
        sel.close()
        proc.finish()
    return out


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _judge(launcher_rc: int, out: _Collected, nonce: bytes | None, limits: Limits, wall: float) -> ExecResult:
    """The run's result. With `nonce`, passing needs the completion evidence (of the checker, in a
    checked run); without (a command), the exit status alone decides. A run that did not pass after
    the kernel killed one of its processes at the memory cap is `killed`, and says so."""
    result = _outcome(launcher_rc, out, nonce, limits, wall)
    if out.out_of_memory and result.status not in ("passed", "timeout", "output_limit"):
        result.status, result.signal = "killed", "SIGKILL"
        result.reason = f"out of memory: the run went over its memory cap of {limits.memory_bytes} bytes; killed"
    return result


def _outcome(launcher_rc: int, out: _Collected, nonce: bytes | None, limits: Limits, wall: float) -> ExecResult:
    control = []
    for line in bytes(out.data["control"]).decode("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            message = ast.literal_eval(line)  # the launcher's literals: never code
            if isinstance(message, dict):
                control.append(message)
    info = next((c for c in control if c.get("ready")), None)
    setup_error = next((c["setup_error"] for c in control if "setup_error" in c), None)
    wait = next((c["wait"] for c in control if "wait" in c), None)
    peer_wait = next((c["peer_wait"] for c in control if "peer_wait" in c), None)
    isolation = {k: v for k, v in (info or {}).items() if k != "ready"}

    def result(status: Status, reason: str, returncode: int | None = None, sig: str | None = None) -> ExecResult:
        return ExecResult(
            status=status,
            reason=reason,
            returncode=returncode,
            signal=sig,
            stdout=bytes(out.data["stdout"]).decode("utf-8", "replace"),
            stderr=bytes(out.data["stderr"]).decode("utf-8", "replace"),
            stdout_truncated=out.truncated["stdout"],
            stderr_truncated=out.truncated["stderr"],
            wall_seconds=round(wall, 4),
            isolation=isolation,
        )

    if out.timed_out:
        return result(
            "timeout",
            f"wall-clock limit of {limits.wall_seconds:g} s exceeded; process group killed",
            sig="SIGKILL",
        )
    if out.overflowed is not None:
        cap = limits.output_bytes if out.overflowed in ("stdout", "stderr") else _CHANNEL_CAP
        return result("output_limit", f"wrote more than {cap} bytes to {out.overflowed}; killed", sig="SIGKILL")
    if info is None:
        why = setup_error or f"the launcher exited with status {launcher_rc} before the program started"
        return result("error", f"sandbox setup failed: {why}")
    if wait is None:
        sig = _signal_name(-launcher_rc) if launcher_rc < 0 else None
        return result(
            "killed",
            "the sandbox's own processes were killed before the program finished "
            "(the program probably signalled its process group)",
            sig=sig,
        )
    if os.WIFSIGNALED(wait):
        sig = _signal_name(os.WTERMSIG(wait))
        cpu = f" (CPU-time limit of {limits.cpu_seconds} s)" if sig == "SIGXCPU" else ""
        return result("killed", f"killed by {sig}{cpu}", sig=sig)
    code = os.WEXITSTATUS(wait)
    report = bytes(out.data["report"])
    passed = nonce is not None and code == 0 and report == nonce + b"\n"
    if peer_wait is not None and os.WIFSIGNALED(peer_wait) and not passed:
        # A checked run whose program was killed (its CPU limit, a signal) before the checker was done.
        sig = _signal_name(os.WTERMSIG(peer_wait))
        cpu = f" (CPU-time limit of {limits.cpu_seconds} s)" if sig == "SIGXCPU" else ""
        return result("killed", f"the program was killed by {sig}{cpu} before the checker was done", sig=sig)
    if nonce is None:
        return result("passed" if code == 0 else "failed", f"exited with status {code}", code)
    if code != 0:
        last = (bytes(out.data["stderr"]).decode("utf-8", "replace").strip().splitlines() or [""])[-1]
        return result("failed", f"exited with status {code}" + (f": {last[:200]}" if last else ""), code)
    if report == nonce + b"\n":
        return result("passed", "ran to the end and exited with status 0", code)
    if not report:
        return result("failed", "exited with status 0 before its last statement ran (no completion evidence)", code)
    return result(
        "failed",
        "completion evidence was forged or corrupted (the program wrote to the launcher's pipe)",
        code,
    )


# --------------------------------------------------------------------------------------------------
# Command line: python -m loopcoder.evaluation.sandbox FILE.py --allow-code-execution


def _main(argv: list[str] | None = None) -> int:
    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog="python -m loopcoder.evaluation.sandbox",
        description="Run one untrusted Python file in the sandbox and print the result as JSON.",
    )
    parser.add_argument("file", help="the Python program to run")
    parser.add_argument(
        ALLOW_FLAG,
        dest="allow",
        action="store_true",
        help="required: you accept running untrusted code in this sandbox",
    )
    parser.add_argument("--stdin", help="a file whose bytes are the program's standard input")
    parser.add_argument("--python", help="interpreter for the program (default: chosen and checked at start)")
    parser.add_argument("--isolation", action="store_true", help="also print what is isolated on this machine")
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"default {value}")
    args = parser.parse_args(argv)
    try:
        _require_opt_in(args.allow)
        limits = Limits(**{name: getattr(args, name) for name in asdict(defaults)})
        try:
            with open(args.file, encoding="utf-8") as f:
                source = f.read()
            stdin = None
            if args.stdin is not None:
                with open(args.stdin, "rb") as f:
                    stdin = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise LoopcoderError(f"cannot read {e.filename or args.file}: {e.strerror or e}") from None
        result = run_program(source, limits, allow_code_execution=True, stdin=stdin, python=args.python)
    except LoopcoderError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    report = result.to_dict()
    if args.isolation:
        report["isolation_report"] = isolation_report(args.python)
    print(json.dumps(report, indent=2))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(_main())
