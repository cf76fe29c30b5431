"""Task repositories on the host: deterministic commits, diffs between trees, fresh workspaces.

These run `git` on the host, so they only ever touch trees that loopcoder wrote itself (a task's
sources and its own patches). Anything the agent has had its hands on (a workspace after an episode)
is read with git inside the sandbox instead (`episode.workspace_patch`): a repository's own
`.git/config` can name programs for git to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from loopcoder.utils.errors import LoopcoderError

# One author, one date, no user or system configuration: the same tree gives the same commit id anywhere.
_IDENTITY = {
    "GIT_AUTHOR_NAME": "loopcoder",
    "GIT_AUTHOR_EMAIL": "swe@loopcoder.invalid",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000",
    "GIT_COMMITTER_NAME": "loopcoder",
    "GIT_COMMITTER_EMAIL": "swe@loopcoder.invalid",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
    "LC_ALL": "C",
}
_SAFE_CONFIG = ("-c", "core.autocrlf=false", "-c", "core.fileMode=true", "-c", "commit.gpgSign=false")
BASE_MESSAGE = "base"


def git(*args: str, cwd: str | Path, input: str | None = None) -> str:
    """Run git with a fixed identity and no user configuration; its stdout, or a LoopcoderError."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), **_IDENTITY}
    try:
        done = subprocess.run(
            ["git", *_SAFE_CONFIG, *args], cwd=cwd, env=env, input=input, capture_output=True, text=True, timeout=120
        )
    except FileNotFoundError:
        raise LoopcoderError("git is not installed: the SWE tasks are git repositories") from None
    if done.returncode != 0:
        raise LoopcoderError(f"git {args[0]} failed in {cwd}: {done.stderr.strip()[:500]}")
    return done.stdout


def write_tree(root: Path, files: dict[str, str]) -> None:
    """Write `files` (repository path -> text) under `root`, every file 0644."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        os.chmod(path, 0o644)


def read_tree(root: Path) -> dict[str, str]:
    """Every file under `root` except `.git`, by repository path (sorted)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(".git/") and rel != ".git":
            out[rel] = path.read_text(encoding="utf-8")
    return out


def commit_tree(root: Path) -> str:
    """`git init` + commit everything under `root` as one root commit; its id (deterministic)."""
    git("init", "-q", "-b", "main", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-q", "--no-verify", "-m", BASE_MESSAGE, cwd=root)
    return git("rev-parse", "HEAD", cwd=root).strip()


def diff_trees(before: dict[str, str], after: dict[str, str]) -> str:
    """The `git diff` (a/ b/ paths, index lines) that turns tree `before` into `after`."""
    with tempfile.TemporaryDirectory(prefix="loopcoder-swe-diff-") as d:
        root = Path(d)
        write_tree(root, before)
        commit_tree(root)
        for rel in before:
            if rel not in after:
                (root / rel).unlink()
        write_tree(root, {k: v for k, v in after.items() if before.get(k) != v})
        git("add", "-A", cwd=root)
        return git("diff", "--cached", "--no-color", "--no-ext-diff", "--no-renames", "HEAD", cwd=root)


def apply_patch(root: Path, patch: str, reverse: bool = False) -> None:
    """Apply one of loopcoder's own patches to a tree it wrote (git apply, outside any index)."""
    if patch.strip():
        git("apply", "--whitespace=nowarn", *(["-R"] if reverse else []), "-", cwd=root, input=patch)


def materialize(sources: Path, instance: dict, dest: Path) -> Path:
    """A fresh repository at `dest` holding the task's base commit: the pristine sources with the gold
    patch and the test patch undone, committed. Checks the commit id against the instance's."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(sources, dest, copy_function=shutil.copyfile)
    for path in dest.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    apply_patch(dest, instance["test_patch"], reverse=True)
    apply_patch(dest, instance["patch"], reverse=True)
    commit = commit_tree(dest)
    if commit != instance["base_commit"]:
        raise LoopcoderError(
            f"{instance['instance_id']}: the rebuilt base is commit {commit[:12]}, the task says "
            f"{instance['base_commit'][:12]} (the task set's sources were changed; rebuild it)"
        )
    return dest


def patched_files(patch: str) -> list[str]:
    """The repository paths a git diff touches (its `diff --git a/X b/X` headers)."""
    out = []
    for line in patch.splitlines():
        if line.startswith("diff --git a/"):
            out.append(line.split(" b/", 1)[0][len("diff --git a/") :])
    return out


def changed_lines(patch: str) -> int:
    """Lines a patch changes: the larger of removed and added lines, per hunk, summed (a one-line edit is 1)."""
    total, removed, added = 0, 0, 0
    for line in [*patch.splitlines(), "@@"]:
        if line.startswith("@@") or line.startswith("diff --git"):
            total += max(removed, added)
            removed = added = 0
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
        elif line.startswith("+") and not line.startswith("+++"):
            added += 1
    return total
