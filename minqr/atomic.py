"""Atomic writes: a reader, or a process killed half-way, sees the old file or the new one,
never a torn mix.

The recipe is the usual one: write everything into a temporary sibling (same directory, hence
same filesystem), flush it to disk, then rename it over the destination. A file rename is atomic
on POSIX. A directory that already exists cannot be replaced by one rename, so it is first moved
aside and removed only after the new one is in place; a crash in that instant leaves the old
copy beside the destination as `<name>.old-*`, still whole.

A process killed while writing leaves its temporary sibling behind (`.<name>.tmp-*`: no
`finally` runs on SIGKILL); the next write of the same destination removes it, so repeated kills
during checkpointing do not pile up gigabytes of half-written copies. It must never remove the
temporary of a writer that is still at work (two writers of one destination: a library caller's
threads, or jobs that do not take minqr.lock), so every temporary is named after its writer,
`.<name>.tmp-<pid>@<host>.<random>`, and only those of this host whose process no longer runs are
removed. A temporary from another host, or from a pid that was reused, is left alone: a leak is
recoverable, a deleted live temporary is not. The same holds for the `<name>.old-*` copies below.
"""
import contextlib
import glob
import os
import shutil
import socket
import tempfile
from pathlib import Path

# mkstemp/mkdtemp create private paths (0600/0700) on purpose; what we publish should have the
# permissions of an ordinary file or folder, as the user's umask sets them.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _publish_mode(path: Path) -> None:
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_UMASK)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (which is where a rename lives), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        _fsync(f)


_HOST = socket.gethostname()
_KINDS = {"tmp": ".{}.tmp-", "old": "{}.old-"}  # the new copy being written; the old one moved aside


def _prefix(path: Path, kind: str, owner: str = "") -> str:
    return _KINDS[kind].format(path.name) + owner


def _writer() -> str:
    """The name a temporary carries of its writer: `pid@host.` (the random part follows)."""
    return f"{os.getpid()}@{_HOST}."


def _gone(owner: str) -> bool:
    """Is the writer named `pid@host` known to have ended? Only a process of this host can be asked."""
    pid, _, host = owner.partition("@")
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False


def abandoned(path, kind: str = "tmp") -> list[Path]:
    """The temporaries (`tmp`) or moved-aside copies (`old`) of `path` whose writer has ended."""
    path = Path(path)
    prefix = _prefix(path, kind)
    return [p for p in path.parent.glob(glob.escape(prefix) + "*")
            if _gone(p.name[len(prefix):].rpartition(".")[0])]


def _prepare(path: Path) -> None:
    """Create the parent folder and remove temporaries that a killed writer of `path` left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in abandoned(path):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path; on success it becomes `path` in one rename."""
    path = Path(path)
    _prepare(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path, "tmp", _writer()), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish_mode(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary directory; on success it replaces the directory `path`."""
    path = Path(path)
    _prepare(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path, "tmp", _writer()), dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish_mode(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(path, "old", _writer()), dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
