"""Failed writes (a full disk, a read-only file system, a limit on file sizes): whichever library
writes (Python, numpy, matplotlib, torch.save, safetensors, torch.distributed.checkpoint), the
failure is one message that names the output, "cannot write PATH: ...", the command exits 1, and
nothing half-made stays: no temporary, no folder the write made, the previous version whole.

The failures are real where the kernel can give them to anyone, root included: /dev/full (every
write fails with ENOSPC) and RLIMIT_FSIZE (a write past the limit fails with EFBIG) in a real
process running every command. A read-only file system, which root could not be kept out of with
chmod, is injected where the kernel reports it (EROFS from os.open / os.mkdir).
"""
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError

import minqr.atomic
import minqr_cli.commands as commands
from minqr.atomic import atomic_dir, atomic_file
from minqr.errors import MinqrError
from minqr.models.export import export_scalar
from minqr.training.metrics import MetricsLog, read_metrics

ROOT = Path(__file__).resolve().parents[1]
FULL = "no space left on device; free some space or write elsewhere"
UNCHANGED = " (nothing was changed there)"


def to_dev_full(path: Path) -> Path:
    """`path` made a link to /dev/full, where every write fails with ENOSPC."""
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/full")
    return path


def write_text(target):
    target.write_text("x" * 100_000)


def write_numpy(target):
    with open(target, "wb") as f:
        np.savez(f, a=np.zeros(10_000))


def write_png(target):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    try:
        fig.savefig(target, format="png")
    finally:
        plt.close(fig)


def write_torch(target):
    torch.save({"a": torch.zeros(10_000)}, target)


WRITERS = {"text": write_text, "numpy": write_numpy, "png": write_png, "torch.save": write_torch}


def listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_full_disk_is_one_message_and_leaves_the_old_version(tmp_path, monkeypatch, writer, kind):
    # torch.save's writer says nothing of why it failed (no errno): the disk's free space tells, and
    # /dev/full is not the disk of tmp_path, so that disk is made to look full too
    monkeypatch.setattr(minqr.atomic, "_free_bytes", lambda path: 0)
    old = tmp_path / "old"
    if kind == "file":
        old.write_text("previous")
    else:
        with atomic_dir(old, overwrite=True, kind="a test folder") as tmp:  # a folder minqr made: one it may replace
            (tmp / "model.bin").write_text("previous")
    before = listing(tmp_path)
    for target in (old, tmp_path / "new" / "sub" / "out"):
        with pytest.raises(MinqrError) as caught:
            if kind == "file":
                with atomic_file(target) as tmp:
                    WRITERS[writer](to_dev_full(tmp))
            else:
                with atomic_dir(target, overwrite=True, kind="a test folder") as tmp:
                    WRITERS[writer](to_dev_full(tmp / "model.bin"))
        assert str(caught.value) == f"cannot write {target}: {FULL}{UNCHANGED}"
        assert listing(tmp_path) == before  # no temporary, no new folder, the old version as it was


def test_the_errno_that_safetensors_words_and_distributed_checkpoints_wrap(tmp_path, monkeypatch):
    # safetensors replaces a link rather than writing through it: its own words on a full tmpfs
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x08")  # a part of the file, then the disk is full
        raise full
    with pytest.raises(MinqrError, match=f"^cannot write {tmp_path / 'model'}: {FULL}"):
        with atomic_dir(tmp_path / "model", overwrite=True, kind="a test folder") as tmp:
            failing_save_file({"a": torch.zeros(3)}, tmp / "model.safetensors")
    assert listing(tmp_path) == {}

    import torch.distributed.checkpoint as dcp

    monkeypatch.setattr(minqr.atomic, "_free_bytes", lambda path: 0)
    with pytest.raises(MinqrError, match=f"^cannot write {tmp_path / 'checkpoint'}: {FULL}"):
        with atomic_dir(tmp_path / "checkpoint", overwrite=True, kind="a test folder") as tmp:
            (tmp / "shards").mkdir()
            to_dev_full(tmp / "shards" / "__0_0.distcp")  # the file dcp writes for process 0
            with pytest.warns(UserWarning):  # no process group: dcp says it saves in one process
                dcp.save({"a": torch.zeros(1000)}, checkpoint_id=tmp / "shards")
    assert listing(tmp_path) == {}


def test_torch_save_failing_with_room_on_the_disk_says_what_torch_said(tmp_path):
    with pytest.raises(MinqrError, match=r"cannot write .*: the write failed \(\[enforce fail at inline_container"):
        with atomic_dir(tmp_path / "checkpoint", overwrite=True, kind="a test folder") as tmp:
            write_torch(to_dev_full(tmp / "state.pt"))


def test_errors_that_are_no_write_failure_keep_their_type(tmp_path):
    for error in (FileNotFoundError(errno.ENOENT, "a file read inside the block"), RuntimeError("a bug"),
                  SafetensorError("tensors share memory")):
        with pytest.raises(type(error)):
            with atomic_file(tmp_path / "new" / "scores.npz"):
                raise error
        assert listing(tmp_path) == {}


def test_a_read_only_file_system_is_one_message(tmp_path, monkeypatch):
    """`synthetic --out` into a read-only folder: EROFS where the kernel says it, on the first file
    or folder made in it (root is not stopped by chmod, nor is CI)."""
    read_only = tmp_path / "mounted"
    read_only.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path):
        if Path(path).is_relative_to(read_only):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def open_(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refused(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        refused(path)
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    for out in (read_only / "task", read_only / "new" / "task"):
        result = CliRunner().invoke(commands.main, ["synthetic", "--out", str(out), "--num-train", "8",
                                                    "--num-test", "4"])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        # the output, or its lock file beside it (minqr.lock) where the command takes one first
        assert re.search(rf"^Error: cannot write {re.escape(str(out.parent))}/(task|\.task\.lock): read-only file "
                         "system; write elsewhere", result.output), result.output
    assert listing(tmp_path) == {"mounted": None}


# Runs the commands of argv lists (sys.argv[1], JSON: [[limit in bytes or null, argv], ...]) one
# after the other in this process, each with the file-size limit given, and prints what each did.
LIMITED_COMMANDS = """
import json, resource, sys
from click.testing import CliRunner
import minqr_cli.commands as commands
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
done = []
for limit, argv in json.loads(sys.argv[1]):
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft if limit is None else limit, hard))
    try:
        result = CliRunner().invoke(commands.main, argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    done.append({"argv": argv, "exit_code": result.exit_code, "output": result.output,
                 "exception": type(result.exception).__name__})
print(json.dumps(done))
"""
SIZE_LIMIT = "file too large; a limit on the size of files (ulimit -f, or the file system's) stops it"


@pytest.mark.slow  # a Python started that runs ten commands: about 20 s on a busy 2-core CPU
def test_every_command_says_which_output_it_cannot_write(tmp_path):
    """One real process runs each command twice: with room, then with a file-size limit below its
    output's size, so that the kernel refuses a write past it (EFBIG) in whichever library writes."""
    t, r = tmp_path / "task", tmp_path / "run"
    train = ["train", "--model", t / "model", "--tokenizer", t / "tokenizer", "--data", t / "train.jsonl",
             "--eval-data", t / "test.jsonl", "--max-length", "128", "--batch-size", "8", "--max-steps", "2",
             "--save-every", "2"]
    prepared = [[None, ["synthetic", "--out", t, "--num-train", "64", "--num-test", "16"]],
                [None, [*train, "--out", r]],
                [None, ["score", "--model", r, "--data", t / "test.jsonl", "--out", tmp_path / "scores.npz"]],
                [None, ["export", "--model", r, "--scalar", "--out", tmp_path / "scalar"]]]
    # (limit, argv, the output the message names, what the failure names of it)
    limited = [
        (100_000, ["synthetic", "--out", tmp_path / "task2", "--num-train", "64", "--num-test", "16"],
         tmp_path / "task2", SIZE_LIMIT),  # the tiny model's safetensors (0.5 MB)
        (100_000, [*train, "--out", tmp_path / "run2"], tmp_path / "run2" / "checkpoint",
         "the write failed ([enforce fail at inline_container.cc"),  # state.pt (2 MB) through torch.save
        (4_000, ["score", "--model", r, "--data", t / "test.jsonl", "--out", tmp_path / "new" / "scores.npz"],
         tmp_path / "new" / "scores.npz", SIZE_LIMIT),  # 10 kB
        (20_000, ["analyze", tmp_path / "scores.npz", "--out", tmp_path / "report"], tmp_path / "report",
         SIZE_LIMIT),  # the figures (30 to 50 kB)
        (100_000, ["export", "--model", r, "--scalar", "--out", tmp_path / "new" / "scalar"],
         tmp_path / "new" / "scalar", SIZE_LIMIT),
        (100_000, ["export", "--model", r, "--scalar", "--out", tmp_path / "scalar", "--overwrite"],
         tmp_path / "scalar", SIZE_LIMIT),  # replaces the one made with room: it stays as it was
    ]
    runs = prepared + [[limit, argv] for limit, argv, _, _ in limited]
    done = subprocess.run([sys.executable, "-c", LIMITED_COMMANDS, json.dumps(runs, default=str)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for result in results[:len(prepared)]:
        assert result["exit_code"] == 0, result
    for (_, argv, path, problem), result in zip(limited, results[len(prepared):]):
        assert result["exit_code"] == 1 and result["exception"] == "SystemExit", result
        assert f"Error: cannot write {path}: {problem}" in result["output"], result
    temporaries = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or p.name.endswith(".lock")]
    assert temporaries == []
    for made in ("task2", "new", "report"):  # outputs and folders that did not exist stay absent
        assert not (tmp_path / made).exists()
    export_scalar(r, tmp_path / "again")  # what the export made with room, made again
    assert listing(tmp_path / "scalar") == listing(tmp_path / "again")
    assert sorted(p.name for p in (tmp_path / "run2").iterdir()) == ["metrics.jsonl", "training_args.json"]


def test_torch_save_refused_at_open_says_why(tmp_path):
    """torch.save opens the file itself, and words the errno (its message, as torch 2 gives it)."""
    with pytest.raises(MinqrError, match=f"^cannot write {tmp_path / 'checkpoint'}: read-only file system; write"):
        with atomic_dir(tmp_path / "checkpoint", overwrite=True, kind="a test folder"):
            raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: "
                               f"{os.strerror(errno.EROFS)}")
    assert listing(tmp_path) == {}


def test_the_training_log_on_a_full_disk_is_one_message(tmp_path):
    """metrics.jsonl is appended line by line (not atomically): a line that cannot be written says
    so, naming the file, and the lines before it stay whole."""
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 0.5})
    log.file.close()
    whole = (tmp_path / "metrics.jsonl").read_text()
    log.file = open(to_dev_full(tmp_path / "full.jsonl"), "a")  # the same appends, onto a full disk
    log.path = tmp_path / "full.jsonl"
    with pytest.raises(MinqrError, match=f"^cannot write {tmp_path / 'full.jsonl'}: {FULL}$"):
        log.write({"step": 2, "loss": 0.4})
    with pytest.raises(MinqrError, match=f"^cannot write {tmp_path / 'full.jsonl'}: {FULL}$"):
        log.close()  # what the buffer still holds cannot be written either
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}] and whole.endswith("\n")
