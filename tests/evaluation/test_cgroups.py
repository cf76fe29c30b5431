"""The run's cgroup: finding where to make it (cgroup v2 or v1) and what it writes, on fake trees.

The machine the tests run on has one kind of cgroup at most (this one: v1 memory and pids, v2 without
controllers); these tests give `find` a fake /proc/self and cgroupfs in a temporary directory, so both
kinds, and the ways they can be unusable, are checked everywhere. test_sandbox_isolation.py checks the
real one.
"""

from __future__ import annotations

from pathlib import Path

from loopcoder.evaluation import cgroups

HYBRID_CGROUP = "4:memory:/ci/job\n8:pids:/\n1:cpu,cpuacct:/\n0::/\n"
V2_CGROUP = "0::/user.slice/evaluator\n"


def mountinfo(root: Path, *mounts: tuple[str, str, str]) -> str:
    """mountinfo lines for (directory under root, fs type, super options)."""
    lines = ["22 1 254:0 / / rw,relatime - ext4 /dev/vda rw"]
    for i, (where, fstype, options) in enumerate(mounts):
        point = str(root / where).replace(" ", "\\040")
        lines.append(f"{30 + i} 22 0:{30 + i} / {point} rw,relatime - {fstype} cgroup rw,{options}")
    return "\n".join(lines) + "\n"


def fake_proc(tmp_path: Path, cgroup: str, mounts: str) -> str:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mounts)
    return str(proc)


def test_parsing_proc_self_cgroup_and_mountinfo(tmp_path):
    assert cgroups._own_cgroups(HYBRID_CGROUP) == {
        "memory": "/ci/job",
        "pids": "/",
        "cpu": "/",
        "cpuacct": "/",
        "": "/",
    }
    mounts = cgroups._cgroup_mounts(mountinfo(tmp_path, ("a b/memory", "cgroup", "memory"), ("v2", "cgroup2", "")))
    assert [(Path(p).name, fstype, "memory" in options) for p, _, fstype, options in mounts] == [
        ("memory", "cgroup", True),
        ("v2", "cgroup2", False),
    ]
    assert mounts[0][0] == str(tmp_path / "a b" / "memory")  # octal escapes undone


def test_cgroup_v2_with_the_controllers_given_makes_a_capped_cgroup(tmp_path):
    own = tmp_path / "v2" / "user.slice" / "evaluator"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpu memory pids io\n")
    (own / "cgroup.subtree_control").write_text("memory pids\n")
    found = cgroups.find(fake_proc(tmp_path, V2_CGROUP, mountinfo(tmp_path, ("v2", "cgroup2", ""))))
    assert found == cgroups.Hierarchy(2, str(own), str(own))
    assert found.describe().startswith("yes (cgroup v2")
    group = cgroups.RunCgroup(found, 300 << 20, 9)
    (d,) = [Path(p) for p in group.dirs]
    assert d.parent == own and d.name.startswith(cgroups.PREFIX)
    written = {f.name: f.read_text() for f in d.iterdir()}
    assert written == {"memory.max": str(300 << 20), "memory.swap.max": "0", "memory.oom.group": "1", "pids.max": "9"}
    assert group.procs == [str(d / "cgroup.procs")]
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert group.oom_killed()


def test_cgroup_v2_where_children_cannot_get_the_controllers_says_why(tmp_path):
    own = tmp_path / "v2" / "user.slice" / "evaluator"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("memory pids\n")
    (own / "cgroup.subtree_control").mkdir()  # reads fail like a refused write: one clear reason
    found = cgroups.find(fake_proc(tmp_path, V2_CGROUP, mountinfo(tmp_path, ("v2", "cgroup2", ""))))
    assert isinstance(found, str) and found.startswith("no: cgroup v2:")
    assert str(own) in found
    (own / "cgroup.controllers").write_text("cpu io\n")
    (tmp_path / "again").mkdir()
    found = cgroups.find(fake_proc(tmp_path / "again", V2_CGROUP, mountinfo(tmp_path, ("v2", "cgroup2", ""))))
    assert "no memory and pids controllers" in found


def test_cgroup_v1_memory_and_pids_hierarchies(tmp_path):
    memory, pids = tmp_path / "memory" / "ci" / "job", tmp_path / "pids"
    memory.mkdir(parents=True)
    pids.mkdir()
    mounts = mountinfo(tmp_path, ("unified", "cgroup2", ""), ("memory", "cgroup", "memory"), ("pids", "cgroup", "pids"))
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("hugetlb\n")  # v2 here has no memory controller
    found = cgroups.find(fake_proc(tmp_path, HYBRID_CGROUP, mounts))
    assert found == cgroups.Hierarchy(1, str(memory), str(pids))
    group = cgroups.RunCgroup(found, 128 << 20, 6)
    mem_dir, pids_dir = (Path(d) for d in group.dirs)
    assert mem_dir.parent == memory and pids_dir.parent == pids and mem_dir.name == pids_dir.name
    assert (mem_dir / "memory.limit_in_bytes").read_text() == str(128 << 20)
    assert not (mem_dir / "memory.memsw.limit_in_bytes").exists()  # no swap accounting in the fake tree
    assert (pids_dir / "pids.max").read_text() == "6"
    assert group.procs == [str(mem_dir / "cgroup.procs"), str(pids_dir / "cgroup.procs")]
    assert not group.oom_killed()


def test_no_cgroupfs_at_all_is_a_plain_reason(tmp_path):
    found = cgroups.find(fake_proc(tmp_path, V2_CGROUP, mountinfo(tmp_path)))
    assert found == "no: no cgroup v2 or v1 memory and pids hierarchy is mounted"
    assert cgroups.find(str(tmp_path / "missing")).startswith("no: cannot read this process's cgroups")


def test_stale_cgroups_of_dead_evaluators_are_removed(tmp_path):
    hierarchy = cgroups.Hierarchy(2, str(tmp_path), str(tmp_path))
    dead = tmp_path / f"{cgroups.PREFIX}999999999-0"  # no such pid
    alive = tmp_path / f"{cgroups.PREFIX}1-0"  # pid 1 always exists
    other = tmp_path / "someone-elses"
    for d in (dead, alive, other):
        d.mkdir()
    cgroups._remove_stale(hierarchy)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])
