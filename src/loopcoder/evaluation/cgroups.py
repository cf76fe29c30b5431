"""A cgroup per sandboxed run: one cap on all the memory and processes the run holds.

RLIMIT_AS caps each process's address space, not the memory a run holds outside it: memfd and tmpfs
pages, SysV shared memory, pipe and socket buffers. A memory cgroup counts all of it (and the run's
private tmpfs), whichever process of the run wrote it. The run's cgroup is made below the caller's
own, so the caller's limits still hold, and removed after the run.

cgroup v2 (`memory.max`, `memory.swap.max`, `memory.oom.group`, `pids.max`) where its memory and pids
controllers can be given to children of the caller's cgroup (its root, or a delegated subtree that
already has them in `cgroup.subtree_control`); otherwise cgroup v1's memory and pids hierarchies
(`memory.limit_in_bytes`, `memory.memsw.limit_in_bytes`, `pids.max`). Where neither can be made (not
root, no delegation, no cgroupfs), `find()` says why, and the sandbox falls back on rlimits and a
seccomp filter.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import signal
import threading
import time
from dataclasses import dataclass

PREFIX = "loopcoder-sandbox-"
_counter = itertools.count()
_counter_lock = threading.Lock()


@dataclass(frozen=True)
class Hierarchy:
    """Where runs' cgroups are made: the caller's own cgroup directories (one for v2)."""

    version: int
    memory: str
    pids: str

    def describe(self) -> str:
        if self.version == 2:
            return f"yes (cgroup v2 below {self.memory}: memory.max, memory.swap.max 0, pids.max)"
        return f"yes (cgroup v1 below {self.memory}: memory.limit_in_bytes, memory.memsw.limit_in_bytes, pids.max)"


def _own_cgroups(text: str) -> dict[str, str]:
    """/proc/self/cgroup as {controller: path}; cgroup v2's line under ""."""
    own = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                own[controller] = parts[2]
    return own


def _cgroup_mounts(text: str) -> list[tuple[str, str, str, set[str]]]:
    """cgroup mounts from /proc/self/mountinfo: (mount point, root within the hierarchy, fs type, options)."""
    found = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields:
            continue
        tail = fields[fields.index("-") + 1 :]
        if tail[0] in ("cgroup", "cgroup2"):
            point = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            found.append((point, fields[3], tail[0], set(tail[2].split(",")) if len(tail) > 2 else set()))
    return found


def _directory(point: str, root: str, own: str) -> str:
    if root != "/" and own.startswith(root):
        own = own[len(root) :]
    return os.path.normpath(os.path.join(point, own.lstrip("/")))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def find(proc: str = "/proc/self") -> Hierarchy | str:
    """Where this process can make runs' cgroups, or a plain-words reason why it cannot."""
    try:
        own = _own_cgroups(_read(f"{proc}/cgroup"))
        mounts = _cgroup_mounts(_read(f"{proc}/mountinfo"))
    except OSError as e:
        return f"no: cannot read this process's cgroups ({e.strerror})"
    reasons = []
    v2 = next((m for m in mounts if m[2] == "cgroup2"), None)
    if v2 is not None and "" in own:
        found = _v2(_directory(v2[0], v2[1], own[""]))
        if isinstance(found, Hierarchy):
            return found
        reasons.append(found)
    v1 = {c: m for m in mounts if m[2] == "cgroup" for c in ("memory", "pids") if c in m[3]}
    if "memory" in v1 and "pids" in v1 and "memory" in own and "pids" in own:
        found = _v1(*(_directory(v1[c][0], v1[c][1], own[c]) for c in ("memory", "pids")))
        if isinstance(found, Hierarchy):
            return found
        reasons.append(found)
    elif not reasons:
        reasons.append("no cgroup v2 or v1 memory and pids hierarchy is mounted")
    return "no: " + "; ".join(reasons)


def _v2(directory: str) -> Hierarchy | str:
    try:
        available = set(_read(os.path.join(directory, "cgroup.controllers")).split())
        if not {"memory", "pids"} <= available:
            return f"cgroup v2: {directory} has no memory and pids controllers to give"
        enabled = set(_read(os.path.join(directory, "cgroup.subtree_control")).split())
        if not {"memory", "pids"} <= enabled:
            # Only allowed at the root, or in a cgroup without processes of its own (we are one).
            _write(os.path.join(directory, "cgroup.subtree_control"), "+memory +pids")
    except OSError as e:
        return (
            f"cgroup v2: cannot give the memory and pids controllers to children of {directory} ({e.strerror}; "
            "run the evaluator as root, or in a delegated cgroup whose subtree_control has them)"
        )
    return _usable(Hierarchy(2, directory, directory))


def _v1(memory: str, pids: str) -> Hierarchy | str:
    return _usable(Hierarchy(1, memory, pids))


def _usable(hierarchy: Hierarchy) -> Hierarchy | str:
    """Make and remove one cgroup to be sure; clear what dead evaluators left behind."""
    _remove_stale(hierarchy)
    try:
        probe = RunCgroup(hierarchy, 64 << 20, 8)
    except OSError as e:
        return f"cgroup v{hierarchy.version}: cannot make a cgroup below {hierarchy.memory} ({e.strerror})"
    probe.remove()
    return hierarchy


def _remove_stale(hierarchy: Hierarchy) -> None:
    for directory in {hierarchy.memory, hierarchy.pids}:
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                match = re.fullmatch(re.escape(PREFIX) + r"(\d+)-\d+", name)
                if match and not os.path.exists(f"/proc/{match.group(1)}"):
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(directory, name))  # empty once its processes are gone


class RunCgroup:
    """One run's cgroup with its caps; `procs` are the files the run's first process joins through."""

    def __init__(self, hierarchy: Hierarchy, memory_bytes: int, processes: int) -> None:
        with _counter_lock:
            name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.version = hierarchy.version
        self.dirs = list(dict.fromkeys([os.path.join(hierarchy.memory, name), os.path.join(hierarchy.pids, name)]))
        made = []
        try:
            for d in self.dirs:
                os.mkdir(d)
                made.append(d)
            memory, pids = self.dirs[0], self.dirs[-1]
            if self.version == 2:
                _write(f"{memory}/memory.max", str(memory_bytes))
                _write(f"{memory}/memory.swap.max", "0")
                with contextlib.suppress(OSError):
                    _write(f"{memory}/memory.oom.group", "1")  # an out-of-memory kill takes the whole run
            else:
                _write(f"{memory}/memory.limit_in_bytes", str(memory_bytes))
                if os.path.exists(f"{memory}/memory.memsw.limit_in_bytes"):  # swap accounting is on
                    _write(f"{memory}/memory.memsw.limit_in_bytes", str(memory_bytes))
            _write(f"{pids}/pids.max", str(processes))
        except OSError:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
            raise
        self.procs = [f"{d}/cgroup.procs" for d in self.dirs]

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the run for going over the memory cap."""
        events = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = _read(f"{self.dirs[0]}/{events}")
        except OSError:
            return False
        match = re.search(r"^oom_kill (\d+)$", text, re.M)
        return bool(match and int(match.group(1)) > 0)

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (those that escaped the process group included)."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                _write(f"{self.dirs[0]}/cgroup.kill", "1")
                return
        for _ in range(100):  # a fork bomb may still be forking (up to pids.max) while we kill
            try:
                pids = [int(p) for p in _read(self.procs[0]).split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def remove(self) -> None:
        """Remove the cgroup once its processes are gone (they may take a moment to leave it)."""
        deadline = time.monotonic() + 2.0
        for d in self.dirs:
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:  # busy: processes still leaving
                        break  # left for the next evaluator's clean-up (find() removes stale ones)
                    self.kill()
                    time.sleep(0.005)
