"""The sandbox's launcher: trusted code that runs in the child interpreter before the untrusted code.

Never imported: `sandbox.py` compiles this file's text with the sandbox's interpreter and starts it as
`python -I -B launcher CONFIG`. So it is standard library only, runs on any Python >= 3.8 (the sandbox's
interpreter may be the system one), and must not import loopcoder. `docs/sandbox.md` describes what it
does, in order: join the run's cgroup, enter new network/PID/IPC (and, not root, user) namespaces, cap
the IPC namespace's shared memory, set the rlimits, fork the init (PID 1), which builds a fresh root
filesystem and pivots into it, drops its privileges, and starts what the run runs:

- a program: Python source, run in this interpreter; it passes on the completion evidence (a nonce
  read and echoed only after its code returned);
- a checked run: an untrusted program and a trusted checker in two processes that talk over two pipes
  with plain data; the checker's completion evidence is the verdict, and the program never holds the
  checker's code, memory or evidence pipes;
- a command: argv exec'd in the workspace; its exit status is the verdict.
"""

import builtins
import ctypes
import os
import resource
import signal
import struct
import sys
import types

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = (
    1,
    2,
    4,
    8,
    32,
    4096,
    8192,
    16384,
    1 << 18,
)
MS_STRICTATIME, MNT_DETACH = 1 << 24, 2
# Per-mount flags as /proc/self/mountinfo spells them. A read-only remount repeats them: inside a user
# namespace, flags inherited from the host are locked and may not change.
MOUNT_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "nosymfollow": 256,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 4096,
}
# What the fresh root holds of the host, read-only: the system's programs and libraries (or the links
# to them, on a merged /usr), the few files in /etc that programs, git and the C library read, and
# the five harmless devices. Not /home, /root, /run, /var, /srv, /mnt, /opt, /sys or the host's /tmp.
ROOT_ENTRIES = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
ETC_ENTRIES = (
    "alternatives",
    "gitconfig",
    "group",
    "hosts",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "passwd",
)
ETC_PREFIXES = ("python3",)  # Debian's /etc/python3.X holds the standard library's sitecustomize.py
DEVICES = ("null", "zero", "full", "random", "urandom")
DEVICE_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"))
DEVICE_LINKS += (("stderr", "/proc/self/fd/2"),)
# The run's writable temporary directories, folders of the one capped tmpfs that is also the new root.
PRIVATE_DIRS = ("tmp", "var/tmp", "dev/shm")
# pivot_root(2) has no libc wrapper: its system call number per machine (elsewhere: MS_MOVE + chroot).
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41, "ppc64le": 203, "s390x": 217}
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 4, 38, 22
_LIBC = []


def _libc():
    if not _LIBC:
        _LIBC.append((ctypes, ctypes.CDLL(None, use_errno=True)))
    return _LIBC[0]


def _call(name, *args):
    # A libc call that raises OSError on failure, and ENOSYS where libc lacks it (not Linux).
    ctypes, libc = _libc()
    function = getattr(libc, name, None)
    if function is None:
        raise OSError(38, f"{name} is not available on this system")
    if function(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _unshare(flags):
    if hasattr(os, "unshare"):
        os.unshare(flags)
    else:
        _call("unshare", flags)


def _mount(source, target, fstype, flags, data=None):
    ctypes, _ = _libc()
    text = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    try:
        _call("mount", text[0], text[1], text[2], ctypes.c_ulong(flags), text[3])
    except OSError as e:
        raise OSError(e.errno, f"{target}: {e.strerror}") from None


def _prctl(option, value):
    _call("prctl", option, value, 0, 0, 0)


def _drop_capabilities():
    # capset(2) with everything empty: what a user namespace granted is gone for good.
    ctypes, _ = _libc()
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
                with open(f"/proc/{name}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            n += int(line.split()[1]) == uid
                            break
            except OSError:
                pass
    return n


# ------------------------------------------------------------------------------------- the launcher


def _join_cgroup(cfg, info):
    # The run's cgroup, made by the parent with its caps: this process and all it starts are in it.
    memory = cfg["cgroup"]
    if memory["procs"] is None:
        info["memory"] = memory["why_not"]
        return
    try:
        for procs in memory["procs"]:
            _write(procs, "0")  # 0: the writing process
    except OSError as e:
        info["memory"] = f"no: could not join the run's cgroup ({e.strerror or e})"
        return
    info["memory"] = memory["in_force"]


def _enter_namespaces(cfg):
    # New network, PID and IPC namespaces (the mount namespace is the init's, below). Returns what was
    # achieved and whether a user namespace was needed for it.
    info = {"ready": True, "network": "no", "pid_namespace": "no", "uid": os.getuid(), "no_new_privs": False}
    _join_cgroup(cfg, info)
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
        why = f"no: new namespaces refused ({e.strerror or e})"
        info["network"] = info["pid_namespace"] = info["shared_memory"] = why
        return info, False
    info["network"] = info["pid_namespace"] = "yes"
    if userns:  # we are in the new namespaces now: a failure here is a setup error, not a fallback
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{outer_uid} {outer_uid} 1")
        _write("/proc/self/gid_map", f"{outer_gid} {outer_gid} 1")
    info["shared_memory"] = _cap_ipc(cfg["limits"])
    return info, userns


def _cap_ipc(rl):
    # SysV shared memory and message queues live in the IPC namespace, outside RLIMIT_AS: cap the new
    # namespace's own. shm_bytes in all (shmall counts pages), few segments and queues.
    page = os.sysconf("SC_PAGE_SIZE")
    caps = (
        ("kernel/shmmax", rl["shm_bytes"]),
        ("kernel/shmall", max(1, rl["shm_bytes"] // page)),
        ("kernel/shmmni", 64),
        ("kernel/msgmni", 16),
        ("fs/mqueue/queues_max", 16),
    )
    refused = []
    for name, value in caps:
        try:
            _write("/proc/sys/" + name, str(value))
        except OSError as e:
            refused.append(f"{name} ({e.strerror})")
    if refused:
        return "no: the IPC namespace's limits were refused: " + ", ".join(refused)
    return f"yes: SysV shared memory at most {rl['shm_bytes']} bytes in 64 segments, 16 message queues"


def _set_limits(cfg, userns):

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
    queues = min(resource.getrlimit(resource.RLIMIT_MSGQUEUE)[1], 1 << 20)  # POSIX message queues, per uid
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (queues, queues))


def _drop_privileges(uid, userns, umask=0o077):
    # Returns whether no_new_privs is set. Afterwards the process holds no capability anywhere.
    try:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries cannot raise privileges
        nnp = True
    except OSError:
        nnp = False
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    elif userns:
        _drop_capabilities()  # the user namespace gave us all of them (mounts included)
    os.umask(umask)
    return nnp


def _report(control_fd, message):
    # One line to the parent: a dict of strings, numbers, booleans and None, as a Python literal.
    os.write(control_fd, (repr(message) + "\n").encode())


def _fail(control_fd, e):
    _report(control_fd, {"setup_error": f"{type(e).__name__}: {e}"})
    os._exit(70)


def main():
    if sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
    else:
        launch(_literal(sys.argv[1]))


def _literal(text):
    # The parent's configuration: a Python literal it wrote (json would import re: ~10 ms per run).
    return eval(text, {"__builtins__": {}})


def launch(cfg):
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
    # privileges like the init, which starts anything only once this is done.
    try:
        _drop_privileges(cfg["uid"], userns)
        os.write(dropped_w, b"1")
    except BaseException:
        pass
    os.close(dropped_w)
    os.waitpid(init, 0)
    os._exit(0)


# ----------------------------------------------------------------------------- the fork server


def serve(server_fd):
    # Started once per interpreter by the parent: forks one launcher per run, so that runs do not pay
    # for an interpreter's start. A request is the run's configuration (a literal) and its file
    # descriptors: the status socket, stdin, stdout, stderr, then the nonce, report and control pipes.
    # The server keeps nothing of a run: the request's bytes land in one buffer, zeroed after each
    # fork, and only the forked launcher parses them. On the status socket it sends "pid N" at once,
    # "exit RC" when that launcher has exited; it reaps the launcher only once the parent has closed
    # the socket, so that the process-group id stays the run's until then. Parent gone: it exits.
    import select
    import socket

    server = socket.socket(fileno=server_fd)
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    buffer, ancillary = bytearray(1 << 20), socket.CMSG_SPACE(16 * 4)
    runs = {}  # launcher pid -> [status socket, exit reported, parent done]
    server.send(b"ready")
    while True:
        readable = select.select([server, wake_r] + [r[0] for r in runs.values() if not r[2]], [], [])[0]
        if wake_r in readable:
            while True:
                try:
                    os.read(wake_r, 512)
                except OSError:
                    break
        for pid, run in list(runs.items()):
            if run[0] in readable and not run[0].recv(16):  # the parent is done with this run
                run[2] = True
                run[0].close()
            exited = None if run[1] else _exited(pid)
            if exited is not None:
                if not run[2]:
                    try:  # noqa: SIM105
                        run[0].send(b"exit %d %d" % exited)
                    except OSError:
                        pass
                run[1] = True
            if run[1] and run[2]:
                os.waitpid(pid, 0)
                del runs[pid]
        if server in readable:
            size, ancdata, _, _ = server.recvmsg_into([buffer], ancillary)
            if size == 0:
                os._exit(0)
            fds = []
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4])
            pid = os.fork()
            if pid == 0:
                _forked_launcher(bytes(buffer[:size]), fds, server, (wake_r, wake_w), runs)
            buffer[:size] = bytes(size)
            status = socket.socket(fileno=fds[0])
            for fd in fds[1:]:
                os.close(fd)
            runs[pid] = [status, False, False]
            try:  # noqa: SIM105 (a parent that gave up on the run; its exit is seen as usual)
                status.send(b"pid %d" % pid)
            except OSError:
                pass


# waitid(2) itself, for the rusage that os.waitid does not give: CPU of the launcher and all it reaped.
WAITID = {"x86_64": 247, "aarch64": 95, "riscv64": 95, "loongarch64": 95}


def _exited(pid):
    # (return code, CPU microseconds or -1) once `pid` has exited, without reaping it; else None.
    ctypes, libc = _libc()
    number = WAITID.get(os.uname().machine)
    if number is None:
        done = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return None if done is None else (done.si_status if done.si_code == os.CLD_EXITED else -done.si_status, -1)
    info, usage = ctypes.create_string_buffer(128), ctypes.create_string_buffer(256)
    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
    if libc.syscall(ctypes.c_long(number), os.P_PID, pid, info, flags, usage) != 0:
        return None
    _, _, code, _, child, _, status = struct.unpack_from("iiiiiIi", info)
    if child != pid:
        return None
    user_s, user_us, system_s, system_us = struct.unpack_from("qqqq", usage)  # two struct timevals
    rc = status if code == os.CLD_EXITED else -status
    return rc, (user_s + system_s) * 1000000 + user_us + system_us


def _forked_launcher(request, fds, server, wake, runs):
    # The fork server's child becomes one run's launcher, as if started as `launcher CONFIG`.
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    server.close()
    for fd in wake:
        os.close(fd)
    for run in runs.values():
        run[0].close()
    os.close(fds[0])
    os.setsid()  # its own session and process group, as the parent's Popen would give it
    for target, fd in zip((0, 1, 2), fds[1:4]):
        os.dup2(fd, target)
        os.close(fd)
    cfg = _literal(request.decode())
    cfg["nonce_fd"], cfg["report_fd"], cfg["control_fd"] = fds[4:7]
    os.environ.clear()
    os.environ.update(cfg["env"])
    os.chdir(cfg["rundir"])
    launch(cfg)
    raise SystemExit(0)  # a program's code returned: exit as an interpreter does (a statement: unpatchable)


# ----------------------------------------------------------------------------- the fresh root (init)


def _read_only(points, flags_of):
    # Remount each mount point read-only, keeping its other flags; returns those that refused.
    refused = []
    for point in points:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in flags_of[point]:
            flags |= MOUNT_FLAGS.get(option, 0)
        if "noatime" not in flags_of[point] and "relatime" not in flags_of[point]:
            flags |= MS_STRICTATIME
        try:
            _mount(None, point, None, flags)
        except OSError as e:
            if e.errno not in (2, 22):  # ENOENT, EINVAL: hidden under another mount
                refused.append(point)
    return refused


def _mounts_under(root):
    # Mount points at or below `root`, in mount order, with their per-mount options.
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f.read().splitlines():
            fields = line.split(" ")
            point = fields[4]
            for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(code, char)
            if point == root or point.startswith(root.rstrip("/") + "/"):
                found[point] = fields[5].split(",")
    return found


def _bind(source, target, writable=False):
    # Bind `source` (a directory, file or device) at `target`, which is made to match it.
    if os.path.isdir(source):
        if not os.path.isdir(target):
            os.makedirs(target, 0o755)
    else:
        parent = os.path.dirname(target)
        if not os.path.isdir(parent):
            os.makedirs(parent, 0o755)
        if not os.path.exists(target):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
    _mount(source, target, None, MS_BIND | (0 if writable else MS_REC))


def _new_root(cfg, pid_namespace, source, space):
    # Build the run's filesystem on one capped tmpfs mounted over its directory (rundir) and pivot into
    # it: the host's system directories read-only, a minimal /dev, a fresh /proc, private /tmp,
    # /var/tmp and /dev/shm, and the program's working directory or the command's workspace. Returns
    # (status, the working directory). Any failure before the pivot undoes every mount (the caller
    # then runs on the host's view, and the status says why).
    rl = cfg["limits"]
    root = os.path.realpath(cfg["rundir"])
    _mount(
        "tmpfs",
        root,
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"mode=0755,size={rl['tmp_bytes'] + len(source or b'') + (1 << 20)},nr_inodes={rl['tmp_files'] + 1024}",
    )
    try:
        return _build_root(cfg, pid_namespace, source, space, root)
    except OSError:
        try:  # noqa: SIM105 (the launcher imports nothing it does not need)
            _call("umount2", root.encode(), MNT_DETACH)  # lazily, with everything mounted below it
        except OSError:
            pass
        raise


def _build_root(cfg, pid_namespace, source, space, root):
    rl = cfg["limits"]
    inside = lambda path: root + path
    writable = []  # read-write mounts of the new root; everything else becomes read-only
    for name in ("dev", "proc", "var", "etc"):
        os.mkdir(inside("/" + name), 0o755)
    for name in PRIVATE_DIRS:  # first, so that what is bound below them later stays visible
        path = inside("/" + name)
        os.mkdir(path)
        os.chmod(path, 0o1777)
        _mount(path, path, None, MS_BIND)  # its own mount: stays writable when the root is not
        writable.append(path)
    for name in ROOT_ENTRIES:
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), inside(host))  # merged /usr: /bin -> usr/bin
        elif os.path.isdir(host):
            _bind(host, inside(host))
    for name in sorted(os.listdir("/etc")):
        if name in ETC_ENTRIES or name.startswith(ETC_PREFIXES):
            host = "/etc/" + name
            if os.path.islink(host):
                os.symlink(os.readlink(host), inside(host))
            elif os.path.exists(host):
                _bind(host, inside(host))
    for path in cfg["interpreter_paths"]:  # the interpreter and its libraries, where not under /usr
        if os.path.exists(path) and not os.path.exists(inside(path)):
            _bind(path, inside(path))
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            _bind("/dev/" + name, inside("/dev/" + name), writable=True)
            writable.append(inside("/dev/" + name))
    for name, target in DEVICE_LINKS:
        os.symlink(target, inside("/dev/" + name))
    if space is not None:  # a command: the workspace, read-write, at its own path
        here = cfg["workspace"]
        os.makedirs(inside(here), 0o755)
        cfg["workspace_ownership"] = _bind_workspace(cfg, space, inside(here))
    else:  # a program: a private working directory at the host directory's path, holding its copy
        here = root
        os.makedirs(inside(here), 0o755)
        os.chmod(inside(here), 0o700)
        with open(inside(here) + "/" + os.path.basename(cfg["program"]), "wb") as f:
            f.write(source)
            os.fchmod(f.fileno(), 0o644)
        if cfg["uid"] is not None:
            os.chown(inside(here), cfg["uid"], cfg["uid"])
        _mount(inside(here), inside(here), None, MS_BIND)
    writable.append(inside(here))
    missing = []
    if pid_namespace:
        _mount("proc", inside("/proc"), "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    else:
        _bind("/proc", inside("/proc"))
        missing.append("/proc shows the host's processes (no PID namespace)")
    writable.append(inside("/proc"))
    # The caps count from here: the skeleton and the program's copy do not take from them.
    st = os.statvfs(root)
    _mount(
        None,
        root,
        None,
        MS_REMOUNT | MS_NOSUID | MS_NODEV,
        f"size={(st.f_blocks - st.f_bfree) * st.f_frsize + rl['tmp_bytes']},"
        f"nr_inodes={st.f_files - st.f_ffree + rl['tmp_files']}",
    )
    mounts = _mounts_under(root)
    refused = _read_only([p for p in mounts if p != root and p not in writable], mounts)
    _pivot(root)
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    if refused:
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        missing.append("still writable: " + ", ".join(p[len(root) :] for p in refused[:5]) + more)
    status = "partly: " + "; ".join(missing) if missing else "yes"
    return status[:1000], here  # the control pipe carries at most a few KiB


def _bind_workspace(cfg, space, target):
    # Bind the workspace where the run's uid may write it. As root, the run has a uid of its own: an
    # idmapped mount shows the owner's files as the run's and stores the run's new files as the
    # owner's, whatever the workspace's size; where the filesystem or kernel refuses one, the tree is
    # lent to the run's uid (chown), and the parent gives it back after the run.
    uid = cfg["uid"]
    if uid is not None:
        try:
            if not cfg["idmapped_workspace"]:
                raise OSError(0, "switched off by the caller")
            _idmapped_bind(space, target, cfg["workspace_owner"], uid)
            return "idmapped mount"
        except OSError as e:
            why = e.strerror or str(e)
        _lend(f"/proc/self/fd/{space}", uid)
        _mount(f"/proc/self/fd/{space}", target, None, MS_BIND)
        return f"lent to the run's uid (chown; no idmapped mount: {why})"
    _mount(f"/proc/self/fd/{space}", target, None, MS_BIND)
    return "the caller's own (not root: the run has the caller's uid)"


def _lend(path, uid):
    # The workspace tree to the run's uid, following no symbolic link below it (the parent gives it
    # back; it looks at the top, which goes first). `path` itself may be a /proc/self/fd link.
    os.chown(path, uid, uid)
    for parent, dirs, names in os.walk(path):
        for name in dirs + names:
            try:  # noqa: SIM105 (contextlib costs every run an import)
                os.lchown(os.path.join(parent, name), uid, uid)
            except FileNotFoundError:
                pass


def _syscall(number, *args):
    ctypes, libc = _libc()
    result = libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _idmapped_bind(space, target, owner, uid):
    # open_tree(2) a detached copy of the workspace's mount, give it an idmapping (the owner's ids are
    # the run's uid), move_mount(2) it to the target. The system call numbers are the same everywhere.
    open_tree, move_mount, mount_setattr = 428, 429, 442
    userns = _mapping_namespace(owner, uid)
    try:
        tree = _syscall(open_tree, space, b"", 0x1 | 0x1000 | os.O_CLOEXEC)  # OPEN_TREE_CLONE | AT_EMPTY_PATH
        try:
            ctypes, _ = _libc()
            attr = ctypes.create_string_buffer(struct.pack("QQQQ", 0x00100000, 0, 0, userns), 32)  # MOUNT_ATTR_IDMAP
            _syscall(mount_setattr, tree, b"", 0x1000, attr, ctypes.c_size_t(32))
            _syscall(move_mount, tree, b"", -100, target.encode(), 0x4)  # AT_FDCWD, MOVE_MOUNT_F_EMPTY_PATH
        finally:
            os.close(tree)
    finally:
        os.close(userns)


def _mapping_namespace(owner, uid):
    # A user namespace whose ids `owner` are the host's `uid`: a child makes it, we write its maps.
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(done_w)
        try:
            _unshare(CLONE_NEWUSER)
            os.write(ready_w, os.readlink("/proc/self").encode())  # its pid as the host's /proc knows it
        except BaseException:
            pass
        os.read(done_r, 1)
        os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        host_pid = os.read(ready_r, 64).decode()
        if not host_pid.isdigit():
            raise OSError(1, "a user namespace for the idmapping was refused")
        _write(f"/proc/{host_pid}/uid_map", f"{owner[0]} {uid} 1")
        _write(f"/proc/{host_pid}/gid_map", f"{owner[1]} {uid} 1")
        return os.open(f"/proc/{host_pid}/ns/user", os.O_RDONLY)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


def _pivot(root):
    # Make `root` the root of this mount namespace and let go of the host's: after this nothing of the
    # host is reachable by path, and the old root cannot be mounted back.
    ctypes, libc = _libc()
    os.chdir(root)
    number = PIVOT_ROOT.get(os.uname().machine)
    if number is not None:
        if libc.syscall(ctypes.c_long(number), b".", b".") != 0:
            err = ctypes.get_errno()
            raise OSError(err, "pivot_root: " + os.strerror(err))
        _call("umount2", b".", MNT_DETACH)  # the old root, stacked under the new one
    else:
        _mount(root, "/", None, MS_MOVE)
        _call("chroot", b".")
    os.chdir("/")


def _private_filesystem(cfg, pid_namespace, source):
    # Returns (plain-words status, working directory); the host's view on any failure.
    host_dir = cfg["workspace"] or os.path.realpath(cfg["rundir"])
    try:
        _unshare(CLONE_NEWNS)
        _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates to or from the host
    except OSError as e:
        return f"no: mount namespace refused ({e.strerror or e})", host_dir
    space = None
    try:
        if cfg["workspace"] is not None:  # opened in this namespace (a bind's source must be in it), before
            space = os.open(cfg["workspace"], os.O_RDONLY | os.O_DIRECTORY)  # any mount: it may be under /tmp
        return _new_root(cfg, pid_namespace, source, space)
    except OSError as e:
        return f"no: could not set up a private root ({e.strerror or e})", host_dir
    finally:
        if space is not None:
            os.close(space)


# ------------------------------------------------------------------------------------- the init (PID 1)


def _seccomp(block_ipc):
    # Where no cgroup caps memory: refuse memfd_create and memfd_secret (memory outside RLIMIT_AS and
    # the tmpfs), new user namespaces (a tmpfs of one's own) and, where the IPC namespace's own limits
    # could not be set (not root), SysV shared memory and message queues. Returns the plain-words status.

    machine = os.uname().machine
    numbers = {
        "x86_64": (0xC000003E, 319, 447, 272, 56, 435, 29, 68),
        "aarch64": (0xC00000B7, 279, 447, 97, 220, 435, 194, 186),
    }.get(machine)
    if numbers is None:
        return f"no: no seccomp filter for {machine}: memfd and user namespaces stay uncapped"
    arch, memfd, secret, unshare, clone, clone3, shmget, msgget = numbers
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    # (code, jump-if-true label, jump-if-false label, k); labels resolve to relative offsets below.
    program = [
        (0x20, None, None, 4),  # A = seccomp_data.arch
        (0x15, None, "enosys", arch),
        (0x20, None, None, 0),  # A = seccomp_data.nr
    ]
    if machine == "x86_64":
        program.append((0x35, "enosys", None, 0x40000000))  # the x32 ABI's numbers
    program += [
        (0x15, "eperm", None, memfd),
        (0x15, "eperm", None, secret),
        *([(0x15, "eperm", None, shmget), (0x15, "eperm", None, msgget)] if block_ipc else []),
        (0x15, "enosys", None, clone3),  # its flags are out of the filter's sight; libc falls back to clone
        (0x15, "flags", None, unshare),
        (0x15, "flags", None, clone),
        (0x06, None, None, allow),
        ("flags", None, None, None),
        (0x20, None, None, 16),  # A = low 32 bits of the first argument (little-endian)
        (0x45, "eperm", None, CLONE_NEWUSER),
        (0x06, None, None, allow),
        ("eperm", None, None, None),
        (0x06, None, None, eperm),
        ("enosys", None, None, None),
        (0x06, None, None, enosys),
    ]
    labels, code = {}, []
    for op in program:
        if isinstance(op[0], str):
            labels[op[0]] = len(code)
        else:
            code.append(op)
    raw = b""
    for i, (op, jt, jf, k) in enumerate(code):
        jt, jf = (0 if label is None else labels[label] - i - 1 for label in (jt, jf))
        raw += struct.pack("HBBI", op, jt, jf, k)
    ctypes, libc = _libc()
    buffer = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HxxxxxxP", len(code), ctypes.addressof(buffer))
    if libc.prctl(PR_SET_SECCOMP, 2, ctypes.c_char_p(fprog), 0, 0) != 0:  # SECCOMP_MODE_FILTER
        err = ctypes.get_errno()
        return f"no: seccomp filter refused ({os.strerror(err)}): memfd and user namespaces stay uncapped"
    ipc = ", SysV shared memory and message queues" if block_ipc else ""
    return f"yes: memfd_create{ipc} and new user namespaces refused (no cgroup caps memory)"


def _init(cfg, info, userns, launcher_dropped):
    # PID 1 of the new namespace (when there is one): the kernel kills every process in it when this
    # one exits, and signals from inside the namespace cannot kill it. It builds the fresh root (a
    # fresh /proc needs a process inside the PID namespace), drops its privileges, waits until the
    # launcher has dropped its own, and only then starts what the run runs, as its children: ordinary
    # processes (PID 1 would ignore SIGXCPU and friends).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control_fd = cfg["control_fd"]
    checker_fd = None
    try:
        _prctl(PR_SET_DUMPABLE, 0)  # not ptrace-able, /proc/1/mem closed, even to the same uid
        source = None
        if cfg["program"] is not None:
            with open(cfg["program"], "rb") as f:
                source = f.read()
        if cfg["checker"] is not None:  # opened now, read only after the program's process exists
            checker_fd = os.open(cfg["checker"], os.O_RDONLY)
            os.unlink(cfg["checker"])
        if cfg["namespaces"] and cfg["private_filesystem"]:
            info["filesystem"], here = _private_filesystem(cfg, info["pid_namespace"] == "yes", source)
        else:
            info["filesystem"] = "no: switched off by the caller"
            here = cfg["workspace"] or os.path.realpath(cfg["rundir"])
        if cfg["workspace"] is not None:
            if info["filesystem"].startswith("no") and cfg["uid"] is not None:  # the host's workspace, as is
                _lend(cfg["workspace"], cfg["uid"])
                cfg["workspace_ownership"] = "lent to the run's uid (chown; no private filesystem)"
            info["workspace"] = cfg.get("workspace_ownership", "the caller's own (not root)")
        # The working directory as the run sees it, opened while privileged: its parents may be
        # closed to the run's uid.
        here_fd = os.open(here, os.O_RDONLY | os.O_DIRECTORY)
        if not info["memory"].startswith("yes"):
            info["seccomp"] = _seccomp_after_nnp(block_ipc=not info["shared_memory"].startswith("yes"))
        else:
            info["seccomp"] = "not needed: the cgroup caps memfd and tmpfs memory"
        if os.read(launcher_dropped, 1) != b"1":
            raise RuntimeError("the launcher could not drop its privileges")
        os.close(launcher_dropped)
    except BaseException as e:
        _fail(control_fd, e)
    children = _start(cfg, info, userns, here, here_fd, checker_fd, control_fd)
    if children is not None:  # None: this is a child whose code has returned; it exits normally
        _wait(cfg, children, control_fd)


def _seccomp_after_nnp(block_ipc):
    try:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)  # a filter needs it (or privileges we are about to drop)
    except OSError as e:
        return f"no: no_new_privs refused ({e.strerror}): memfd and user namespaces stay uncapped"
    return _seccomp(block_ipc)


def _start(cfg, info, userns, here, here_fd, checker_fd, control_fd):
    # Fork what the run runs; returns {"main": pid, "peer": pid or None}. A checked run's program (the
    # peer) is forked before the checker's source is read, so that its memory never holds it.
    uid = cfg["uid"]
    if cfg["checker"] is None:
        pid = _fork_child(cfg, uid, userns, here_fd, [control_fd])
        if pid == 0:
            os.fchdir(here_fd)
            os.close(here_fd)
            if cfg["command"] is not None:
                _run_command(cfg)
            _run_program(cfg, here, evidence=True)
            return None
        children = {"main": pid, "peer": None}
    else:
        # Both sides start with the channel's code (json, linecache) and the launcher's failure path
        # (traceback): imported once here, their forks share it instead of importing it twice.
        import json  # noqa: F401
        import linecache  # noqa: F401
        import traceback  # noqa: F401

        to_program_r, to_program_w = os.pipe()
        to_checker_r, to_checker_w = os.pipe()
        closed = [control_fd, checker_fd, cfg["nonce_fd"], cfg["report_fd"], to_program_w, to_checker_r]
        peer = _fork_child(cfg, uid, userns, here_fd, closed)
        if peer == 0:
            os.fchdir(here_fd)
            os.close(here_fd)
            sys.argv = [os.path.basename(cfg["program"]), str(to_program_r), str(to_checker_w)]
            _run_program(cfg, here, evidence=False)
            return None
        for fd in (to_program_r, to_checker_w):
            os.close(fd)
        checker = b""
        while True:
            chunk = os.read(checker_fd, 1 << 20)
            if not chunk:
                break
            checker += chunk
        os.close(checker_fd)
        main = _fork_child(cfg, cfg["checker_uid"], userns, here_fd, [control_fd])
        if main == 0:
            os.close(here_fd)
            os.chdir("/")
            sys.argv = ["checker", str(to_checker_r), str(to_program_w)]
            _run_source(checker, "checker", evidence=True, cfg=cfg)
            return None
        for fd in (to_program_w, to_checker_r):
            os.close(fd)
        children = {"main": main, "peer": peer}
    os.close(here_fd)
    try:
        info["no_new_privs"] = _drop_privileges(uid, userns)
    except BaseException as e:
        _fail(control_fd, e)
    if uid is not None:
        info["uid"] = uid
    _report(control_fd, info)
    return children


def _fork_child(cfg, uid, userns, here_fd, close):
    # Fork one of the run's processes; the child closes `close` and drops to `uid` before returning 0.
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        for fd in close:
            if fd is not None:
                os.close(fd)
        _drop_privileges(uid, userns, umask=0o022 if cfg["command"] is not None else 0o077)
    except BaseException as e:
        os.write(2, (f"sandbox: could not start the run's process: {e}\n").encode())
        os._exit(70)
    return 0


def _wait(cfg, children, control_fd):
    # Reap orphans until the main process (the program, command or checker) has ended; then the peer
    # (a checked run's program) is killed. Reports both wait statuses: the peer's only if it ended on
    # its own before the checker did.
    os.close(cfg["nonce_fd"])
    os.close(cfg["report_fd"])
    status = {"wait": None, "peer_wait": None}
    peer = children["peer"]
    while True:
        try:
            child, st = os.wait()
        except ChildProcessError:
            break
        if child == peer:
            status["peer_wait"] = st
            peer = None
        elif child == children["main"]:
            status["wait"] = st
            break
    if peer is not None:
        try:  # noqa: SIM105
            os.kill(peer, signal.SIGKILL)
        except OSError:
            pass
    _report(control_fd, status)
    os._exit(0)


# ------------------------------------------------------------------------------------- what runs


def _run_command(cfg):
    # Replace this process with the command. Nothing of the launcher may reach it: its pipes are
    # closed, and the signals Python ignores (SIGPIPE, SIGXFSZ) or the init ignores (SIGINT) get their
    # default action back, since ignored signals stay ignored across exec.
    argv = cfg["command"]
    try:
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        _prctl(PR_SET_DUMPABLE, 1)
        os.closerange(3, 1 << 16)
        os.execve(argv[0], argv, os.environ)
    except OSError as e:
        os.write(2, (f"sandbox: cannot run {argv[0]}: {e.strerror or e}\n").encode())
    os._exit(127)


def _run_program(cfg, here, evidence):
    _prctl(PR_SET_DUMPABLE, 1)  # an ordinary process of its uid (the init is not)
    import site  # only programs pay for site-packages: the launcher starts with -S

    site.main()
    path = os.path.join(here, os.path.basename(cfg["program"]))
    with open(path, "rb") as f:
        source = f.read()
    _run_source(source, path, evidence, cfg)


def _run_source(source, path, evidence, cfg):
    # Run Python source as __main__ in this process. The untrusted code can replace anything it can
    # reach (sys, os, traceback, builtins): so the failure path calls only functions bound before it
    # ran, and the evidence is written only on the path where its code returned, never after a failure.
    _exit, _read, _write = os._exit, os.read, os.write
    import traceback  # only programs pay for it (it imports re); bound before the program can replace it

    _print_exception = traceback.print_exception
    nonce_fd, report_fd = cfg["nonce_fd"], cfg["report_fd"]  # closed already where evidence is False
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # plain data may hold big numbers
    if not sys.argv or sys.argv[0] != os.path.basename(path):
        sys.argv = [path]
    try:
        code = compile(source, path, "exec")
    except SyntaxError:
        traceback.print_exc(limit=0)
        _exit(1)
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    except SystemExit as e:
        status = _exit_status(e.code, _write)
        _flush()
        _exit(status)
    except BaseException as e:
        try:  # noqa: SIM105 (contextlib is a module the program can patch)
            _print_exception(type(e), e, e.__traceback__.tb_next)
        except BaseException:
            pass
        _flush()
        _exit(1)
    else:
        # The code returned: only now is the nonce read and echoed as evidence of completion.
        _flush()
        if evidence:
            _write(report_fd, _read(nonce_fd, 256) + b"\n")


def _flush():
    # Best effort: the program may have replaced the streams, and whatever it put there may fail.
    for name in ("stdout", "stderr"):
        try:  # noqa: SIM105 (contextlib is a module the program can patch)
            getattr(sys, name).flush()
        except BaseException:
            pass


def _exit_status(code, write):
    # SystemExit's code as the interpreter would turn it into an exit status.
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    try:  # noqa: SIM105 (contextlib is a module the program can patch)
        write(2, (str(code) + "\n").encode("utf-8", "replace"))
    except BaseException:
        pass
    return 1


if __name__ == "__main__":
    main()
