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

Replacing a folder deletes what it held, so a folder is replaced only when minqr made it as the same
kind of folder and no one has added to it since: every folder written here carries a marker,
`.minqr-made`, saying what it is (a synthetic task, an analysis report, ...) and listing what was
written, so that `analyze --out TASK --overwrite` cannot replace a task with a report. A folder
that holds anything else (a user's `--out ~`, a data folder with their own
files beside a task) is refused before a byte is written, with what it holds named. An empty folder
is taken as it is: it holds nothing to lose.

A write that fails (disk full, read-only file system, no permission, a file-size limit) is one
MinqrError, "cannot write PATH: no space left on device; ...", whichever library failed: Python's
OSError, torch.save's "[enforce fail at inline_container.cc]" (which carries no errno: the free
space of the file system tells), safetensors' SafetensorError, torch.distributed.checkpoint's
CheckpointException (`writing`). It leaves nothing half-made: the temporary is removed, and so
are the folders that the write created for it. Other errors are bugs and keep their traceback.
"""
import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from minqr.errors import MinqrError
from minqr.reading import loads

# mkstemp/mkdtemp create private paths (0600/0700) on purpose; what we publish should have the
# permissions of an ordinary file or folder, as the user's umask sets them.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _publish_mode(path: Path) -> None:
    """Give `path`, and everything in it if it is a folder, the modes the umask gives new files and
    folders: some writers (safetensors) create their files private (0600)."""
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~_UMASK)


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
    """Remove temporaries that a killed writer of `path` left."""
    for stale in abandoned(path):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


# ---- failed writes ---------------------------------------------------------------------------------

# errno of a failed write -> what the user can do about it; any other errno is not a write's failure
_WRITE_FIXES = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "write elsewhere",
    errno.EACCES: "check the folder's permissions or write elsewhere",
    errno.EPERM: "check the folder's permissions or write elsewhere",
    errno.EFBIG: "a limit on the size of files (ulimit -f, or the file system's) stops it: write elsewhere",
    errno.EIO: "the device failed: check the disk",
}
NEARLY_FULL_BYTES = 1 << 20  # less free than this after a failed write: the disk is what is full


def _problem(error: BaseException, path: Path) -> str | None:
    """Why a write under `path` failed, as a user reads it; None when `error` is no write's failure."""
    if isinstance(error, OSError) and error.errno in _WRITE_FIXES:
        return _say(error.errno)
    if isinstance(error, SafetensorError) and (found := re.search(r"\(os error (\d+)\)", str(error))):
        code = int(found.group(1))  # safetensors' writer is Rust: its io::Error's errno is in the text
        return _say(code) if code in _WRITE_FIXES else None
    if isinstance(getattr(error, "failures", None), dict):  # torch.distributed.checkpoint's, per rank
        causes = [f[0] if isinstance(f, tuple) else f for f in error.failures.values()]
        return next((p for cause in causes if (p := _problem(cause, path))), None)
    if isinstance(error, RuntimeError) and "inline_container.cc" in str(error) and "Reader" not in str(error):
        # torch.save's writer names the cause of a failed open ("open file failed with strerror: ..."),
        # but not of a failed write, even into a Python file: then the free space on the disk tells
        said = str(error).rpartition("strerror: ")[2].strip()
        if (code := next((c for c in _WRITE_FIXES if os.strerror(c) == said), None)) is not None:
            return _say(code)
        if _free_bytes(path) < NEARLY_FULL_BYTES:
            return _say(errno.ENOSPC)
        return (f"the write failed ({str(error).strip()}); check the disk, its free space and the limits "
                "on file sizes (ulimit -f)")
    return None


def _say(code: int) -> str:
    return f"{os.strerror(code).lower()}; {_WRITE_FIXES[code]}"


def _free_bytes(path: Path) -> int:
    """The bytes free to this user on the file system of `path` (or of its nearest existing folder)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stat = os.statvfs(path)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize if stat.f_favail else 0  # no inode left is full too


def missing_folders(folder) -> list[Path]:
    """`folder` and those of its ancestors that do not exist, deepest first: the folders that
    making it makes, for `remove_empty` to undo."""
    missing, folder = [], Path(folder)
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` (deepest first) that are empty; one with anything in it stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


class WriteFailed(MinqrError):
    """A write that failed: "cannot write PATH: PROBLEM", PROBLEM as `_problem` says it."""

    def __init__(self, path: Path, problem: str, note: str = ""):
        super().__init__(f"cannot write {path}: {problem}{note}")
        self.problem = problem


@contextlib.contextmanager
def writing(path, note: str = ""):
    """Create `path`'s folder if needed and run the block, which writes `path`. A write that fails
    (see the module docstring) is a WriteFailed naming `path` (plus `note`), and the folders made here
    that the failure left empty are removed; other errors go through as they are. Nested, the
    outermost names its path: a write into a temporary folder is reported as one of what the user
    asked for."""
    path = Path(path)
    made = missing_folders(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException as error:
        remove_empty(made)
        problem = error.problem if isinstance(error, WriteFailed) else _problem(error, path)
        if problem is None:
            raise
        raise WriteFailed(path, problem, note) from None


UNCHANGED = " (nothing was changed there)"  # an atomic write that failed left the old version whole


# ---- the atomic writes ------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path; on success it becomes `path` in one rename."""
    path = Path(path)
    with writing(path, UNCHANGED):
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


MARKER = ".minqr-made"  # in every folder atomic_dir writes: what it wrote (see the module docstring)


def _contents(folder: Path) -> list[str]:
    """Every file and folder under `folder`, as sorted relative paths, the marker left out."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != MARKER or p.parent != folder)


def check_output_file(path, option: str = "out", *, overwrite: bool, what: str = "a file",
                      inputs: tuple = ()) -> None:
    """Refuse (MinqrError) a file to write by name unless it is new, or exists with `overwrite`: a
    folder there, or a symbolic link (a write replaces the path by a rename, which would replace the
    link and leave its target as it was, while the lock follows the link), is refused either way,
    and so is a file the same job reads (`inputs`: pairs of what names it and its path), which
    --overwrite would replace by the job's own output."""
    path = Path(path)
    for name, input_path in inputs:
        input_path = None if input_path is None else Path(input_path).expanduser()
        if input_path is not None and path.is_file() and input_path.is_file() and os.path.samefile(path, input_path):
            raise MinqrError(f"{option} {path} is also {name}, which this job reads: writing there would replace "
                             "it; choose another path")
    if path.is_symlink():
        raise MinqrError(f"{option} {path} is a symbolic link (to {os.readlink(path)}): minqr writes by renaming a "
                         "new file into place, which would replace the link, not what it points to; give the "
                         "path of the file itself")
    if path.is_dir():
        raise MinqrError(f"{option} {path} is a folder: minqr writes {what} there; choose a file's path")
    if path.exists() and not overwrite:
        raise MinqrError(f"{option} {path} exists: pass --overwrite to replace it, or choose another path")


def check_replaceable(path, option: str = "out", *, overwrite: bool, kind: str, older: bool = False) -> None:
    """Refuse (MinqrError) unless folder `path` may be replaced as a whole by a folder of `kind`
    ("a synthetic task"): it does not exist, is empty, or, with `overwrite` (the user's
    --overwrite), is a folder of that kind holding exactly what minqr wrote there (its marker's
    list). A folder of an older minqr, whose marker names no kind, is taken only with `older` (a
    run's own checkpoint, which the run's checks have already found to be its). `option` names the
    setting that chose the folder, for the message. Call it before long work, so that a refusal
    comes first."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise MinqrError(f"{option} {path} is a file, not a folder: minqr writes a folder there and will not "
                         "replace the file; choose another path")
    held = _contents(path)
    if not held:
        return
    try:
        marker = loads((path / MARKER).read_text())
        made, made_as = marker["contents"], marker.get("kind")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        made = None
    if made is None:
        raise MinqrError(f"{option} {path} is not a folder that minqr wrote as a whole (it holds {_some(held)}): minqr "
                         "replaces a folder as a whole, so it writes only into a new or empty folder or one it "
                         "made itself; choose another path")
    if made_as is None and not older:
        raise MinqrError(f"{option} {path} was made by an older minqr, which did not record what kind of folder it "
                         f"is, so --overwrite cannot tell it from other kinds than {kind}: delete it yourself if it "
                         "can go, or choose another path")
    if made_as != kind and not (made_as is None and older):
        made_as = made_as if isinstance(made_as, str) else "a folder of another kind"
        raise MinqrError(f"{option} {path} is {made_as} that minqr wrote, not {kind}: --overwrite replaces only "
                         f"{kind}, so that one kind of output never replaces another; choose another path")
    added = sorted(set(held) - set(made))
    if added:
        raise MinqrError(f"{option} {path} holds files added since minqr wrote it ({_some(added)}): "
                         "replacing the folder would delete them; move them out or choose another path")
    if not overwrite:  # asked last: only where --overwrite would replace it
        raise MinqrError(f"{option} {path} exists and holds {_some(held)}: pass --overwrite to replace it as a "
                         "whole, or choose another path")


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@contextlib.contextmanager
def atomic_dir(path, option: str = "out", *, overwrite: bool, kind: str, older: bool = False):
    """Yield a temporary directory; on success it replaces the directory `path`, marked as a folder
    of `kind`. A folder that holds anything is refused first without `overwrite`, and a folder minqr
    did not make, made as another kind (or, without `older`, by an older minqr), or has had files
    added, always (`check_replaceable`; `option` names it)."""
    path = Path(path)
    check_replaceable(path, option, overwrite=overwrite, kind=kind, older=older)
    with writing(path, UNCHANGED):
        _prepare(path)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(path, "tmp", _writer()), dir=path.parent))
        try:
            yield tmp
            (tmp / MARKER).write_text(json.dumps({"kind": kind, "contents": _contents(tmp)}) + "\n")
            _fsync_tree(tmp)
            _publish_mode(tmp)
            if path.exists():
                # again: it may have changed while we wrote
                check_replaceable(path, option, overwrite=overwrite, kind=kind, older=older)
                old = Path(tempfile.mkdtemp(prefix=_prefix(path, "old", _writer()), dir=path.parent))
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
            _fsync(path.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def record_made(folder: Path, name: str) -> None:
    """Add `name`, a file just written into `folder`, to the folder's marker if minqr made the
    folder (nothing otherwise), so that the folder stays one that minqr may replace as a whole."""
    marker = Path(folder) / MARKER
    try:
        held = loads(marker.read_text())
        made = held["contents"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if name not in made:
        with atomic_file(marker) as tmp:
            tmp.write_text(json.dumps({**held, "contents": sorted([*made, name])}) + "\n")
