"""Atomic writes: readers see the old file (or directory) or the new one, never a torn one.

Every output loopcoder writes (checkpoints, reports, metrics, data manifests) goes through these two
functions, so a crash never leaves a half-written file that looks valid. A directory is written as a
hidden sibling `.NAME.tmp-PID-XXXX` that is renamed into place; a process killed before the rename
leaves that sibling behind, and the next `atomic_directory(NAME)` removes it once its owner (the PID in
its name) is gone. Files get the usual permissions (0666 less the umask), whatever the library that
wrote them chose (safetensors writes 0600).

`check_output_dir` is the one rule of the commands that write a directory (`init`, `export`,
`data build`): a new or empty `--out` is written; a non-empty one only with `--force`, and only if it
is a directory of the command's own kind, so unrelated files are never deleted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from loopcoder.utils.errors import LoopcoderError


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is an ordinary directory
    try:
        yield tmp
        _usual_permissions(tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a torn one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`atomic_write_text` for bytes (an image, say)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; keep the usual file permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of `final` left: `.NAME.tmp-PID-*` and `.NAME.old-PID` siblings whose
    process is gone. Only this kind of temporary, only for this NAME, never one whose owner still runs
    (a reused PID keeps a leftover a while longer, which is safe)."""
    final = Path(final)
    removed = []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        pid = _owner_pid(p.name, final.name)
        if pid is None or _alive(pid) or not p.is_dir() or p.is_symlink():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _owner_pid(name: str, final_name: str) -> int | None:
    for kind in ("tmp", "old"):
        prefix = f".{final_name}.{kind}-"
        if name.startswith(prefix):
            head = name[len(prefix) :].split("-", 1)[0]
            return int(head) if head.isdigit() and (kind == "old" or "-" in name[len(prefix) :]) else None
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_output_dir(
    out: str | os.PathLike, force: bool, kind: str, is_kind: Callable[[Path], bool], flag: str = "--out"
) -> None:
    """Refuse an output directory that cannot be written or must not be replaced (one line, naming it):
    a file; a non-empty directory that is not a `kind` (`is_kind`), even with `force`; a non-empty `kind`
    without `force`; a place with no writable parent."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LoopcoderError(f"{flag} {str(out)!r} exists and is not a directory")
    if out.is_dir():
        names = sorted(p.name for p in out.iterdir())
        if names:
            what = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            if not is_kind(out):  # --force replaces a directory of this kind, never anything else
                raise LoopcoderError(
                    f"{flag} {str(out)!r} is not empty ({what}) and is not a {kind}; choose a new directory"
                )
            if not force:
                raise LoopcoderError(
                    f"{flag} {str(out)!r} is not empty ({what}): choose a new directory, or pass --force to replace it"
                )
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "is not a directory" if not parent.is_dir() else "is not writable"
        raise LoopcoderError(f"cannot write {flag} {str(out)!r}: {str(parent)!r} {why}")


def _usual_permissions(root: Path) -> None:
    """Files as the umask allows (0666 less it), keeping execute bits: safetensors writes 0600."""
    mask = _umask()
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            mode = p.stat().st_mode & 0o777
            want = (0o666 | (mode & 0o111)) & ~mask
            if mode != want:
                os.chmod(p, want)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
