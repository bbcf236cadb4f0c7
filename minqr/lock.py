"""One job at a time per output: a lock on a run folder (or a scores file, a report, an export)
held for the life of the job that writes it.

Without it two runs given the same --out both pass the "already holds a run" check and write into
one folder: the result is a mix of the two, or a crash. With it the second is refused at once,
with a message that names the holder: its pid, host, command line and start time.

The lock is `fcntl.flock` on a sibling file, `.<name>.lock` beside `<name>` (beside, not inside:
a report folder is replaced as a whole, and a model folder should not carry it). The kernel holds
the lock, not the file: a holder killed by `kill -9` loses it at once, and so no pid has to be
guessed alive or dead. What the file holds is the holder's description (JSON), for messages. A
job that ends, well or with an error, deletes the file; one that was killed leaves it behind, and
the next job takes the lock over and says whose it was.

Deleting a lock file races with a job that opened it just before: that job may win the lock on a
file no longer in the folder, while a third creates a new one and locks that. So after locking,
a job checks that the file it locked is still the one at the path, and starts again if not.
flock works across hosts on NFS (Linux maps it onto NFS byte-range locks).
"""
import contextlib
import fcntl
import functools
import inspect
import json
import os
import shlex
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

from minqr.atomic import missing_folders, remove_empty, writing
from minqr.errors import MinqrError
from minqr.reading import loads

WAIT_FOR_DESCRIPTION_S = 2.0  # a holder writes its description right after locking
DESCRIPTION_KEYS = ("pid", "host", "command", "since")


def lock_path(path) -> Path:
    """The lock file of output `path`: `.<name>.lock` in the same folder, after following symbolic
    links (an alias of a run folder is that folder: its jobs must meet at one lock)."""
    path = Path(path).resolve()
    return path.parent / f".{path.name}.lock"


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _description() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.orig_argv),
            "since": datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")}


def _read_description(fd: int) -> dict | None:
    try:
        holder = loads(os.pread(fd, 1 << 16, 0).decode())
    except ValueError:  # empty (the holder has not written it yet) or torn
        return None
    return holder if isinstance(holder, dict) and set(DESCRIPTION_KEYS) <= set(holder) else None


def _describe(holder: dict) -> str:
    return (f"pid {holder['pid']} on {holder['host']}, since {holder['since']}, running: "
            f"{holder['command']}")


@contextlib.contextmanager
def hold_output(path, option: str = "out", say=_say):
    """Hold the lock of output `path` (a file or a folder, made or not) while the block runs.

    Another job holding it: a MinqrError that names that job (`option` is the name of the
    setting the user gave, e.g. "--out"). A lock left by a killed job is taken over, and `say`
    tells whose it was."""
    lock = lock_path(path)
    made = missing_folders(lock.parent)  # _acquire makes them
    fd = _acquire(lock, f"{option} {path}")
    try:
        left_behind = _read_description(fd)
        if left_behind:
            say(f"note: {option} {path}: its lock file was left behind by {_describe(left_behind)}, which no "
                "longer runs (killed?); taking the lock over")
        with writing(lock):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_description()) + "\n").encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)  # before the unlock: see the module docstring
        os.close(fd)
        remove_empty(made)  # a job that failed before writing its output leaves no folder behind


def _acquire(lock: Path, what: str) -> int:
    """An open descriptor of `lock` that holds its flock (see the module docstring)."""
    while True:
        try:
            with writing(lock):  # makes its folder; a full disk, a read-only file system...: a write's message
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:  # any other reason
            raise MinqrError(f"{what}: cannot open its lock file ({error})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _wait_for_description(fd)
            os.close(fd)
            who = _describe(holder) if holder else "another process (it is starting; no details yet)"
            raise MinqrError(f"{what} is in use by {who}. Wait for that job to end or stop it, or write "
                             f"elsewhere (lock file: {lock})") from None
        try:
            still_there = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            still_there = False
        if still_there:
            return fd
        os.close(fd)  # its holder deleted it between our open and our lock: start again


def _wait_for_description(fd: int) -> dict | None:
    deadline = time.monotonic() + WAIT_FOR_DESCRIPTION_S
    while (holder := _read_description(fd)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return holder


def holds_output(argument: str, option: str = "out"):
    """Decorator: the function holds the lock of the output its `argument` names while it runs
    (`option`: that output's name in messages)."""
    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            with hold_output(signature.bind(*args, **kwargs).arguments[argument], option):
                return function(*args, **kwargs)
        return locked
    return decorate
