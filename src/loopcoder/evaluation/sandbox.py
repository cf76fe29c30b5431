"""Run untrusted Python programs (model-written code) in a contained child process.

Usable on its own: `python -m loopcoder.evaluation.sandbox FILE.py --allow-code-execution` runs one
file and prints the result as JSON. Nothing runs without the explicit opt-in.

Each program gets a fresh interpreter (`python -I`) started in a new session, in a fresh temporary
directory (removed afterwards), with a scrubbed environment. A small trusted launcher inside that
interpreter sets the resource limits, enters new network/PID/IPC namespaces where the OS allows it,
and starts a small init that is PID 1 of the new namespace, so that when the program ends every
process it started ends too. The init gives the run a private filesystem where the OS allows it (a
mount namespace: one size-capped tmpfs for the working directory, /tmp, /var/tmp and /dev/shm, a
fresh /proc, every other mount read-only; all of it gone with the run), drops root to a fresh
unprivileged uid (when started as root) or the user namespace's capabilities (when not), sets
no_new_privs, and starts the program. The parent enforces the wall clock (killing the whole process
group) and caps stdout and stderr while reading them. `docs/sandbox.md` states what this does and
does not protect against.

A run passes only on positive evidence: the program ran to its last statement and exited with
status 0. The evidence is a per-run nonce, sent down a pipe the program never needs to touch, that
the launcher reads and writes back on a second pipe only after the program's code has returned.
Exiting early (`sys.exit(0)`, `os._exit(0)`) or printing a fake success line cannot produce it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Literal

from loopcoder.errors import LoopcoderError

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
# Tests switch this off to exercise what happens where the OS refuses new namespaces (for example
# Docker's default seccomp profile): no network or PID isolation, and the report says so.
_NAMESPACES = True
# And this one only the private filesystem (mount namespace), as where the OS refuses just that.
_PRIVATE_FILESYSTEM = True


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
    program take three), so memory in all is at most processes x address space. Wall clock and
    output are enforced by the parent. tmp_bytes and tmp_files cap the run's private tmpfs, which
    holds what it writes to its working directory, /tmp, /var/tmp and /dev/shm (in RAM); they apply
    only where the run has a private filesystem (isolation_report says whether)."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    address_space_bytes: int = 512 << 20
    file_size_bytes: int = 16 << 20
    open_files: int = 128
    processes: int = 8
    output_bytes: int = 1 << 20  # per stream; a program writing more is killed (status output_limit)
    tmp_bytes: int = 64 << 20
    tmp_files: int = 1024

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            kinds = (int, float) if name == "wall_seconds" else (int,)
            if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
                what = "number" if name == "wall_seconds" else "whole number"
                raise LoopcoderError(f"sandbox limit {name} must be a positive {what}, got {value!r}")
        if self.processes < 4:  # the launcher, the namespace's init and the program are three already
            raise LoopcoderError(f"sandbox limit processes must be at least 4, got {self.processes}")


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


# --------------------------------------------------------------------------------------------------
# The launcher: trusted code that runs inside the child interpreter before the program. It must be
# stdlib-only and compatible with any Python >= 3.8 (the sandbox interpreter may be the system one),
# and it must not import loopcoder.
_LAUNCHER = r"""
import json, os, sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
MS_STRICTATIME, MNT_DETACH = 1 << 24, 2
# Per-mount flags as /proc/self/mountinfo spells them. A read-only remount repeats them: inside a
# user namespace, flags inherited from the host are locked and may not change.
MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
               "nosymfollow": 256, "noatime": 1024, "nodiratime": 2048, "relatime": 4096}
# The run's private temporary directories: where the program sees them, and their folder on the
# run's tmpfs (the working directory is its "work" folder).
PRIVATE_DIRS = (("/tmp", "tmp"), ("/var/tmp", "var-tmp"), ("/dev/shm", "shm"))
_LIBC = []


def _call(name, *args):
    # A libc call that raises OSError on failure, and ENOSYS where libc lacks it (not Linux).
    if not _LIBC:
        import ctypes
        _LIBC.append((ctypes, ctypes.CDLL(None, use_errno=True)))
    ctypes, libc = _LIBC[0]
    function = getattr(libc, name, None)
    if function is None:
        raise OSError(38, "%s is not available on this system" % name)
    if function(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _unshare(flags):
    if hasattr(os, "unshare"):
        os.unshare(flags)
    else:
        _call("unshare", flags)


def _mount(source, target, fstype, flags, data=None):
    import ctypes
    text = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    try:
        _call("mount", text[0], text[1], text[2], ctypes.c_ulong(flags), text[3])
    except OSError as e:
        raise OSError(e.errno, "%s: %s" % (target, e.strerror))


def _no_new_privs():
    _call("prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot raise privileges


def _drop_capabilities():
    # capset(2) with everything empty: what a user namespace granted is gone for good.
    import ctypes
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _call("capset", header, (ctypes.c_uint32 * 6)())


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _user_process_count(uid):
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/status" % name) as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            n += int(line.split()[1]) == uid
                            break
            except OSError:
                pass
    return n


def _enter_namespaces(cfg):
    # New network, PID and IPC namespaces (the mount namespace is the init's, below). Returns what was
    # achieved and whether a user namespace was needed for it.
    info = {"ready": True, "network": "no", "pid_namespace": "no", "uid": os.getuid(), "no_new_privs": False}
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    userns = cfg["uid"] is None and os.getuid() != 0
    if userns:
        flags |= CLONE_NEWUSER  # unprivileged: a user namespace grants the right to make the others
    outer_uid, outer_gid = os.getuid(), os.getgid()  # before unshare: then they read as the overflow id
    try:
        if not cfg["namespaces"]:
            raise OSError(0, "switched off by the caller")
        _unshare(flags)
    except OSError as e:
        info["network"] = info["pid_namespace"] = "no: new namespaces refused (%s)" % (e.strerror or e)
        return info, False
    info["network"] = info["pid_namespace"] = "yes"
    if userns:  # we are in the new namespaces now: a failure here is a setup error, not a fallback
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", "%d %d 1" % (outer_uid, outer_uid))
        _write("/proc/self/gid_map", "%d %d 1" % (outer_gid, outer_gid))
    return info, userns


def _set_limits(cfg, userns):
    import resource
    rl = cfg["limits"]
    if cfg["uid"] is not None or userns:
        nproc = rl["processes"]
    else:
        # Same uid as the caller and no namespace: the count includes the caller's own processes.
        nproc = _user_process_count(os.getuid()) + rl["processes"]
    for res, soft, hard in (
        (resource.RLIMIT_CPU, rl["cpu_seconds"], rl["cpu_seconds"] + 1),  # SIGXCPU, then SIGKILL
        (resource.RLIMIT_AS, rl["address_space_bytes"], rl["address_space_bytes"]),
        (resource.RLIMIT_FSIZE, rl["file_size_bytes"], rl["file_size_bytes"]),
        (resource.RLIMIT_NOFILE, rl["open_files"], rl["open_files"]),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(res, (soft, hard))


def _drop_privileges(cfg, userns):
    # Returns whether no_new_privs is set. Afterwards the process holds no capability anywhere.
    try:
        _no_new_privs()
        nnp = True
    except OSError:
        nnp = False
    uid = cfg["uid"]
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    elif userns:
        _drop_capabilities()  # the user namespace gave us all of them (mounts included)
    os.umask(0o077)
    return nnp


def _private_filesystem(cfg, pid_namespace):
    # Give this process (the init) and its descendants their own view of the filesystem: one fresh
    # tmpfs, capped, holds the working directory, /tmp, /var/tmp and /dev/shm; a fresh /proc shows
    # only the run's processes; every other mount is read-only. All of it goes when the run ends.
    # Returns the plain-words status; on a failure the host's view is kept, as without a namespace.
    try:
        _unshare(CLONE_NEWNS)
        _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates to or from the host
    except OSError as e:
        return "no: mount namespace refused (%s)" % (e.strerror or e)
    workdir = os.path.realpath(cfg["rundir"])
    source = None
    if cfg["program"] is not None:
        with open(cfg["program"], "rb") as f:
            source = f.read()
    mounted = []
    try:
        _private_tmpfs(cfg, workdir, source, mounted)
    except OSError as e:
        for target in reversed(mounted):
            try:
                _call("umount2", target.encode(), MNT_DETACH)
            except OSError:
                pass
        return "no: could not set up a private tmpfs (%s)" % (e.strerror or e)
    missing = []
    if not pid_namespace:
        missing.append("/proc shows the host's processes (no PID namespace)")
    else:
        try:
            _mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as e:
            missing.append("/proc shows the host's processes (a fresh /proc was refused: %s)" % e.strerror)
    refused = _read_only_elsewhere(mounted + ["/proc"])
    if refused:
        more = " and %d more" % (len(refused) - 5) if len(refused) > 5 else ""
        missing.append("still writable: " + ", ".join(refused[:5]) + more)
    os.chdir(cfg["workspace"] or workdir)  # the new working directory, not the host's one under it
    status = "partly: " + "; ".join(missing) if missing else "yes"
    return status[:1000]  # the control pipe carries at most a few KiB


def _private_tmpfs(cfg, workdir, source, mounted):
    # A program gets the tmpfs's "work" folder as its working directory, holding a copy of it (source);
    # a command gets the caller's workspace, bound read-write at its own path.
    rl = cfg["limits"]
    workspace = cfg["workspace"]
    # Opened before anything is mounted: the workspace may be under /tmp, which is about to be covered.
    space = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY) if workspace else None
    try:
        _private_tmpfs_in(cfg, rl, workdir, source, mounted, space)
    finally:
        if space is not None:
            os.close(space)


def _private_tmpfs_in(cfg, rl, workdir, source, mounted, space):
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
           "mode=0755,size=%d,nr_inodes=%d" % (rl["tmp_bytes"] + len(source or b"") + 65536, rl["tmp_files"] + 64))
    mounted.append(workdir)
    base = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)  # the tmpfs root, reachable once covered
    try:
        root = "/proc/self/fd/%d/" % base
        for _, name in PRIVATE_DIRS:
            os.mkdir(root + name)
            os.chmod(root + name, 0o1777)
        os.mkdir(root + "work")
        os.chmod(root + "work", 0o700)
        done = []
        for target, name in PRIVATE_DIRS:
            real = os.path.realpath(target)
            if os.path.isdir(real) and real not in done:  # /var/tmp may be a link to /tmp
                _mount(root + name, real, None, MS_BIND)
                mounted.append(real)
                done.append(real)
        if space is not None:  # a command: the workspace, read-write, at its own path
            here = cfg["workspace"]
            source_dir = "/proc/self/fd/%d" % space
        else:  # a program: the tmpfs's work folder, holding a copy of the program
            here = workdir
            source_dir = root + "work"
            with open(root + "work/" + os.path.basename(cfg["program"]), "wb") as f:
                f.write(source)
                os.fchmod(f.fileno(), 0o644)
            if cfg["uid"] is not None:
                os.chown(root + "work", cfg["uid"], cfg["uid"])
        if not os.path.isdir(here):
            os.makedirs(here, 0o755)  # it was under /tmp: make its path again in the private one
        _mount(source_dir, here, None, MS_BIND)
        mounted.append(here)
        # The caps count from here: what is already used (the program's copy) does not take from them.
        st = os.fstatvfs(base)
        _mount(None, root, None, MS_REMOUNT | MS_NOSUID | MS_NODEV, "size=%d,nr_inodes=%d" % (
            (st.f_blocks - st.f_bfree) * st.f_frsize + rl["tmp_bytes"], st.f_files - st.f_ffree + rl["tmp_files"]))
    finally:
        os.close(base)


def _read_only_elsewhere(ours):
    # Remount every other mount read-only (per mount, in this namespace only). Returns the ones refused;
    # mounts hidden under another one (not reachable by their path) are skipped.
    refused, seen = [], set()
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        fields = line.split(" ")
        point = fields[4]
        for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            point = point.replace(code, char)
        if point in seen or any(point == p or point.startswith(p.rstrip("/") + "/") for p in ours):
            continue
        seen.add(point)
        options = fields[5].split(",")
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= MOUNT_FLAGS.get(option, 0)
        if "noatime" not in options and "relatime" not in options:
            flags |= MS_STRICTATIME
        try:
            _mount(None, point, None, flags)
        except OSError as e:
            if e.errno not in (2, 22):  # ENOENT, EINVAL: hidden under another mount
                refused.append(point)
    return refused


def _run_program(cfg):
    import builtins, signal, traceback, types
    signal.signal(signal.SIGINT, signal.default_int_handler)
    path = cfg["program"]
    nonce_fd, report_fd = cfg["nonce_fd"], cfg["report_fd"]
    sys.argv = [path]
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
    except SyntaxError:
        traceback.print_exc(limit=0)
        sys.exit(1)
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.exit(1)
    # The program's code returned: only now is the nonce read and echoed as evidence of completion.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os.write(report_fd, os.read(nonce_fd, 256) + b"\n")


def _run_command(cfg):
    # Replace this process with the command. Nothing of the launcher may reach it: its pipes are
    # closed, and the signals Python ignores (SIGPIPE, SIGXFSZ) or the init ignores (SIGINT) get their
    # default action back, since ignored signals stay ignored across exec.
    import signal
    argv = cfg["command"]
    try:
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.fchdir(cfg["workspace_fd"])  # opened while privileged: its parents may be closed to our uid
        os.closerange(3, 1 << 16)
        os.umask(0o022)  # files in the workspace as a shell makes them, readable by the caller
        os.execve(argv[0], argv, os.environ)
    except OSError as e:
        os.write(2, ("sandbox: cannot run %s: %s\n" % (argv[0], e.strerror or e)).encode())
    os._exit(127)


def _fail(control_fd, e):
    os.write(control_fd, (json.dumps({"setup_error": "%s: %s" % (type(e).__name__, e)}) + "\n").encode())
    os._exit(70)


def _init(cfg, info, userns, launcher_dropped):
    # PID 1 of the new namespace (when there is one): the kernel kills every process in it when this
    # one exits, and signals from inside the namespace cannot kill it. It sets up the private
    # filesystem (a fresh /proc needs a process inside the PID namespace), drops its privileges,
    # waits until the launcher has dropped its own, and only then starts the program, as its child:
    # an ordinary process (PID 1 would ignore SIGXCPU and friends).
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control_fd = cfg["control_fd"]
    try:
        if cfg["namespaces"] and cfg["private_filesystem"]:
            info["filesystem"] = _private_filesystem(cfg, info["pid_namespace"] == "yes")
        else:
            info["filesystem"] = "no: switched off by the caller"
        if cfg["command"] is not None:  # the workspace as the run sees it (bound, or the host's)
            cfg["workspace_fd"] = os.open(cfg["workspace"], os.O_RDONLY | os.O_DIRECTORY)
        info["no_new_privs"] = _drop_privileges(cfg, userns)
        if cfg["uid"] is not None:
            info["uid"] = cfg["uid"]
        if os.read(launcher_dropped, 1) != b"1":
            raise RuntimeError("the launcher could not drop its privileges")
        os.close(launcher_dropped)
    except BaseException as e:
        _fail(control_fd, e)
    os.write(control_fd, (json.dumps(info) + "\n").encode())
    pid = os.fork()
    if pid == 0:
        os.close(control_fd)
        if cfg["command"] is not None:
            _run_command(cfg)
        _run_program(cfg)
        return
    os.close(cfg["nonce_fd"])
    os.close(cfg["report_fd"])
    status = None
    while True:  # reap orphans too, until the program itself has ended
        try:
            child, st = os.wait()
        except ChildProcessError:
            break
        if child == pid:
            status = st
            break
    os.write(control_fd, (json.dumps({"wait": status}) + "\n").encode())
    os._exit(0)


def _main():
    cfg = json.loads(sys.argv[1])
    control_fd = cfg["control_fd"]
    try:
        info, userns = _enter_namespaces(cfg)
        _set_limits(cfg, userns)
    except BaseException as e:
        _fail(control_fd, e)
    dropped_r, dropped_w = os.pipe()
    init = os.fork()  # after unshare(CLONE_NEWPID) the first child is PID 1 of the new namespace
    if init == 0:
        os.close(dropped_w)
        _init(cfg, info, userns, dropped_r)
        return
    os.close(dropped_r)
    for fd in (cfg["nonce_fd"], cfg["report_fd"], control_fd):
        os.close(fd)
    # The launcher is one of the run's processes too (the process cap counts it): it drops its
    # privileges like the init, which starts the program only once this is done.
    try:
        _drop_privileges(cfg, userns)
        os.write(dropped_w, b"1")
    except BaseException:
        pass
    os.close(dropped_w)
    os.waitpid(init, 0)
    os._exit(0)


_main()
"""

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


_plans: dict[str | None, _Plan] = {}
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


def _plan(python: str | None) -> _Plan:
    """Choose the interpreter and check, once per interpreter, that a trivial program passes."""
    with _plans_lock:
        if python in _plans:
            return _plans[python]
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
            plan = _Plan(candidate, drop_root, {}, _compile_launcher(candidate))
            probe = _execute(_Job(_PROBE_PROGRAM), Limits(wall_seconds=30.0), None, plan)
            if probe.passed:
                _plans[python] = _Plan(candidate, drop_root, probe.isolation, plan.launcher)
                return _plans[python]
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
    }


def run_program(
    source: str,
    limits: Limits | None = None,
    *,
    allow_code_execution: bool,
    stdin: str | bytes | None = None,
    python: str | None = None,
) -> ExecResult:
    """Run one Python program in the sandbox and say what happened. Refuses without the opt-in."""
    _require_opt_in(allow_code_execution)
    if not isinstance(source, str):
        raise LoopcoderError(f"a program must be Python source text (str), got {type(source).__name__}")
    limits = limits or Limits()
    plan = _plan(python)
    return _execute(_Job(source), limits, stdin, plan)


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
    # python3 on PATH is the sandbox's interpreter (a virtual environment's bin first, as activating it does).
    here = os.path.dirname(plan.python)
    path = _SAFE_PATH if here in _SAFE_PATH.split(":") else f"{here}:{_SAFE_PATH}"
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
    programs: Sequence[str],
    limits: Limits | None = None,
    *,
    workers: int | None = None,
    allow_code_execution: bool,
    progress: Callable[[int, int], None] | None = None,
    python: str | None = None,
) -> BatchResult:
    """Run programs on `workers` parallel sandboxes; results come back in the programs' order."""
    _require_opt_in(allow_code_execution)
    bad = [type(p).__name__ for p in programs if not isinstance(p, str)]
    if bad:
        raise LoopcoderError(f"programs must be Python source text (str), got {bad[0]}")
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
        futures = {pool.submit(_execute, _Job(source), limits, None, plan): i for i, source in enumerate(programs)}
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
    """What one run executes: a Python program (source), or a command in a workspace."""

    source: str | None = None
    command: tuple[str, ...] | None = None  # argv, its first item an absolute path
    workspace: str | None = None  # the command's one writable directory (a real path)
    env: dict[str, str] | None = None  # the command's whole environment


def _execute(job: _Job, limits: Limits, stdin: str | bytes | None, plan: _Plan) -> ExecResult:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="loopcoder-sandbox-")
    own: list[int] = []  # our pipe ends, closed in `finally`
    owner = None  # the workspace's owner, given it back afterwards
    try:
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if plan.drop_root else None
        program = None if job.source is None else os.path.join(workdir, "program.py")
        # A file, not -c: `ps` stays readable.
        launcher = os.path.join(workdir, ".launcher.py" if plan.launcher is None else ".launcher.pyc")
        launcher_bytes = _LAUNCHER.encode() if plan.launcher is None else plan.launcher
        files = [(launcher, launcher_bytes)] + ([(program, job.source.encode())] if program else [])
        for path, data in files:
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o644)
        if uid is not None:
            os.chown(workdir, uid, uid)  # the program may write here, and nowhere it owns anything else
        if job.workspace is not None and uid is not None:
            st = os.stat(job.workspace)
            owner = (st.st_uid, st.st_gid)
            _chown_tree(job.workspace, uid, uid)  # the run's uid may write there, for this call
        stdin_file = None
        if stdin is not None:
            # A file, not a pipe: a program that never reads its input cannot block us.
            stdin_path = os.path.join(workdir, "stdin.txt")
            with open(stdin_path, "wb") as f:
                f.write(stdin.encode() if isinstance(stdin, str) else stdin)
            stdin_file = open(stdin_path, "rb")  # noqa: SIM115 (closed below)
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
            "command": job.command,
            "workspace": job.workspace,
            "uid": uid,
            "namespaces": _NAMESPACES,
            "private_filesystem": _PRIVATE_FILESYSTEM,
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
            },
        }
        try:
            proc = subprocess.Popen(
                [plan.python, "-I", "-B", launcher, json.dumps(config)],
                stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=job.env if job.env is not None else _scrubbed_env(workdir),
                start_new_session=True,  # its own process group, so the whole group can be killed
                close_fds=True,
                pass_fds=(nonce_r, report_w, control_w),
            )
        finally:
            if stdin_file is not None:
                stdin_file.close()
        for fd in (nonce_r, report_w, control_w):  # the child has them; EOF must mean the child let go
            os.close(fd)
            own.remove(fd)
        out = _collect(
            proc,
            {
                "stdout": proc.stdout.fileno(),
                "stderr": proc.stderr.fileno(),
                "report": report_r,
                "control": control_r,
            },
            limits,
            uid,
        )
        proc.stdout.close()
        proc.stderr.close()
        evidence = None if job.command is not None else nonce  # a command's verdict is its exit status
        return _judge(proc.returncode, out, evidence, limits, time.monotonic() - start)
    finally:
        for fd in own:
            os.close(fd)
        if owner is not None:  # every process of the run is dead: nothing can race the walk
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


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it: its pid (our process group id) stays ours."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


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
        return json.loads(first).get("pid_namespace") == "yes"
    except ValueError:
        return False


def _collect(proc: subprocess.Popen, fds: dict[str, int], limits: Limits, uid: int | None) -> _Collected:
    """Read the child's pipes until it is gone, enforcing the wall clock and the output caps.

    Once the launcher has exited, or we have killed its group, we keep reading until every pipe is
    at EOF (so every process that held one is dead) or a short grace period has passed. With a PID
    namespace everything the program started is dead once the launcher is; without one, a run that
    has its own uid is cleaned up by killing every process of that uid.
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
    pidfd = None
    if hasattr(os, "pidfd_open"):  # wakes us the moment the launcher exits; else we poll
        try:
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ, "exit")
        except OSError:
            pidfd = None
    deadline = time.monotonic() + limits.wall_seconds
    exited = ending = False  # ending: the launcher is gone or killed; we only drain the pipes

    def end_now() -> None:
        nonlocal ending, deadline
        _kill_group(proc.pid)  # whatever is left of its process group dies now
        if uid is not None and not _pid_namespaced(out):
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
            if not exited and _exited(proc.pid):
                exited = True
                if pidfd is not None:
                    sel.unregister(pidfd)
                if not ending:
                    end_now()
    finally:
        _kill_group(proc.pid)
        if uid is not None and not _pid_namespaced(out):
            _kill_uid(uid)
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        proc.wait()
    return out


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _judge(launcher_rc: int, out: _Collected, nonce: bytes | None, limits: Limits, wall: float) -> ExecResult:
    """The run's result. With `nonce`, passing needs the completion evidence; without (a command),
    the exit status alone decides."""
    control = []
    for line in bytes(out.data["control"]).decode("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError):
            control.append(json.loads(line))
    info = next((c for c in control if c.get("ready")), None)
    setup_error = next((c["setup_error"] for c in control if "setup_error" in c), None)
    wait = next((c["wait"] for c in control if "wait" in c), None)
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
