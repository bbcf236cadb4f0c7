"""Atomic writes: all or nothing, published with ordinary permissions, and the clean-up of what a
killed writer left never touches what a live one is writing (real processes)."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from factories import ended_writer, random_gpt2
from safetensors.torch import save_file

from minqr.atomic import MARKER, atomic_dir, atomic_file, check_output_file, check_replaceable
from minqr.errors import MinqrError
from minqr.models.head import HeadConfig
from minqr.models.reward import RewardModel


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_file_replaces_and_publishes_with_umask_mode(tmp_path):
    target = tmp_path / "scores.npz"
    target.write_text("old")
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible before the rename
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["scores.npz"]


def test_atomic_file_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_dir_replaces_a_folder_it_made_as_a_whole(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_dir(target, overwrite=True, kind="a test folder") as tmp:
        (tmp / "stale.bin").write_text("stale")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "part.bin").write_text("stale")
    assert json.loads((target / MARKER).read_text()) == {"kind": "a test folder",
                                                         "contents": ["stale.bin", "sub", "sub/part.bin"]}
    with atomic_dir(target, overwrite=True, kind="a test folder") as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "model.safetensors"]
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_atomic_dir_replaces_a_folder_that_holds_anything_only_with_overwrite(tmp_path):
    """Even a folder minqr made is the user's result: without overwrite it is refused, named with
    what it holds, and left as it was."""
    target = tmp_path / "task"
    with atomic_dir(target, "--out", overwrite=False, kind="a test folder") as tmp:  # a new folder needs no overwrite
        (tmp / "train.jsonl").write_text("a thousand pairs")
    with pytest.raises(MinqrError) as error:
        with atomic_dir(target, "--out", overwrite=False, kind="a test folder") as tmp:
            raise AssertionError("refused before the block runs")
    assert str(error.value) == (f"--out {target} exists and holds train.jsonl: pass --overwrite to replace it as a "
                                "whole, or choose another path")
    assert (target / "train.jsonl").read_text() == "a thousand pairs"
    # a folder --overwrite could not replace does not ask for it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(MinqrError, match="is not a folder that minqr wrote as a whole") as error:
        check_replaceable(mine, "--out", overwrite=False, kind="a test folder")
    assert "--overwrite" not in str(error.value)
    with atomic_dir(target, "--out", overwrite=True, kind="a test folder") as tmp:
        (tmp / "train.jsonl").write_text("ten pairs")
    assert (target / "train.jsonl").read_text() == "ten pairs"


def test_a_file_to_write_by_name(tmp_path):
    """New: fine. Existing: only with overwrite. A folder or a symbolic link: never."""
    new, mine, folder, link = tmp_path / "a.md", tmp_path / "b.md", tmp_path / "c.md", tmp_path / "d.md"
    mine.write_text("mine")
    folder.mkdir()
    link.symlink_to(mine)
    check_output_file(new, "--out", overwrite=False)
    check_output_file(mine, "--out", overwrite=True)
    for path, overwrite, message in [
            (mine, False, f"--out {mine} exists: pass --overwrite to replace it, or choose another path"),
            (folder, True, f"--out {folder} is a folder: minqr writes the table there; choose a file's path"),
            (link, True, f"--out {link} is a symbolic link (to {mine}): minqr writes by renaming a new file into "
                         "place, which would replace the link, not what it points to; give the path of the file "
                         "itself")]:
        with pytest.raises(MinqrError) as refused:
            check_output_file(path, "--out", overwrite=overwrite, what="the table")
        assert str(refused.value) == message


def test_a_folder_is_replaced_only_by_one_of_its_own_kind(tmp_path):
    """--overwrite replaces a folder of the kind the job writes, never another kind that minqr made
    (`analyze --out TASK --overwrite` deleted a synthetic task), nor one whose marker says no kind."""
    target = tmp_path / "task"
    with atomic_dir(target, "--out", overwrite=False, kind="a synthetic task") as tmp:
        (tmp / "train.jsonl").write_text("pairs")
    for marker, made_as in [(None, "a synthetic task"),
                            ({"kind": 3, "contents": ["train.jsonl"]}, "a folder of another kind")]:
        if marker is not None:
            (target / MARKER).write_text(json.dumps(marker))
        with pytest.raises(MinqrError) as refused:
            with atomic_dir(target, "--out", overwrite=True, kind="an analysis report") as tmp:
                (tmp / "report.md").write_text("report")
        assert str(refused.value) == (f"--out {target} is {made_as} that minqr wrote, not an analysis report: "
                                      "--overwrite replaces only an analysis report, so that one kind of output "
                                      "never replaces another; choose another path")
        assert (target / "train.jsonl").read_text() == "pairs"
    # an older minqr's folder (its marker names no kind): refused, saying so, unless the writer takes it
    # (a run's own checkpoint, found to be the run's by train's checks)
    (target / MARKER).write_text(json.dumps({"contents": ["train.jsonl"]}))
    with pytest.raises(MinqrError) as refused:
        check_replaceable(target, "--out", overwrite=True, kind="an analysis report")
    assert str(refused.value) == (f"--out {target} was made by an older minqr, which did not record what kind of "
                                  "folder it is, so --overwrite cannot tell it from other kinds than an analysis "
                                  "report: delete it yourself if it can go, or choose another path")
    with atomic_dir(target, overwrite=True, kind="a checkpoint", older=True) as tmp:
        (tmp / "state.pt").write_text("state")
    assert json.loads((target / MARKER).read_text()) == {"kind": "a checkpoint", "contents": ["state.pt"]}
    (target / MARKER).write_text(json.dumps({"kind": "a synthetic task", "contents": ["state.pt"]}))
    with pytest.raises(MinqrError, match="is a synthetic task that minqr wrote, not a checkpoint"):
        check_replaceable(target, overwrite=True, kind="a checkpoint", older=True)  # a known other kind: never
    with atomic_dir(target, "--out", overwrite=True, kind="a synthetic task") as tmp:  # its own kind: replaced
        (tmp / "test.jsonl").write_text("pairs")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "test.jsonl"]


def test_atomic_dir_takes_a_new_or_empty_folder(tmp_path):
    for target in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        if target.name == "empty":
            target.mkdir()
        with atomic_dir(target, overwrite=True, kind="a test folder") as tmp:
            (tmp / "a").write_text("a")
        assert (target / "a").read_text() == "a"


@pytest.mark.parametrize("case", ["user folder", "user file added", "user file added deep", "a file"])
def test_atomic_dir_never_deletes_what_minqr_did_not_write(tmp_path, case):
    """A folder of the user's (no marker), or one minqr made that a user added to, is refused
    before anything is written, with what it holds named; nothing in it changes."""
    target = tmp_path / "out"
    if case == "a file":
        target.write_text("mine")
        expected = f"--data {target} is a file, not a folder: minqr writes a folder there and will not replace " \
                   "the file; choose another path"
    elif case == "user folder":
        target.mkdir()
        for name in ("keep.txt", "b", "c", "d", "e", "f"):
            (target / name).write_text("mine")
        expected = f"--data {target} is not a folder that minqr wrote as a whole (it holds b, c, d, e, f and 1 more): " \
                   "minqr replaces a folder as a whole, so it writes only into a new or empty folder or one it " \
                   "made itself; choose another path"
    else:
        with atomic_dir(target, overwrite=True, kind="a test folder") as tmp:
            (tmp / "model").mkdir()
            (tmp / "model" / "config.json").write_text("{}")
        added = "model/notes.txt" if case.endswith("deep") else "notes.txt"
        (target / added).write_text("mine")
        expected = f"--data {target} holds files added since minqr wrote it ({added}): replacing the " \
                   "folder would delete them; move them out or choose another path"
    before = sorted((str(p), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    with pytest.raises(MinqrError) as error:
        with atomic_dir(target, "--data", overwrite=True, kind="a test folder") as tmp:
            raise AssertionError("refused before the block runs")
    assert str(error.value) == expected
    assert sorted((str(p), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")) == before


def test_atomic_dir_checks_again_after_writing(tmp_path):
    """A file the user drops into the folder while the new copy is being written is not lost."""
    target = tmp_path / "out"
    with atomic_dir(target, overwrite=True, kind="a test folder") as tmp:
        (tmp / "a").write_text("a")
    with pytest.raises(MinqrError, match="notes.txt"):
        with atomic_dir(target, overwrite=True, kind="a test folder") as tmp:
            (tmp / "a").write_text("new")
            (target / "notes.txt").write_text("mine")
    assert (target / "notes.txt").read_text() == "mine" and (target / "a").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_keeps_old_folder_when_writer_fails(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_dir(target, overwrite=True, kind="a test folder") as tmp:
        (tmp / "model.safetensors").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True, kind="a test folder") as tmp:
            (tmp / "model.safetensors").write_text("torn")
            raise RuntimeError("killed")
    assert (target / "model.safetensors").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


@pytest.mark.parametrize("writer", [atomic_file, atomic_dir])
def test_a_write_removes_what_a_killed_writer_left(tmp_path, writer):
    # SIGKILL runs no `finally`: simulate the leftovers of two killed writes of the target
    gone = ended_writer()
    (tmp_path / f".checkpoint.tmp-{gone}.abc123").mkdir()
    (tmp_path / f".checkpoint.tmp-{gone}.abc123" / "model.safetensors").write_text("torn")
    (tmp_path / f".checkpoint.tmp-{gone}.def456").write_text("torn")
    # what is not known to be abandoned stays: a live process's, another host's, an unnamed one
    kept = [f".checkpoint.tmp-{os.getppid()}@{socket.gethostname()}.ghi789",
            f".checkpoint.tmp-{gone.partition('@')[0]}@another-host.jkl012", ".checkpoint.tmp-mno345",
            f".other.tmp-{gone}.xyz"]
    for name in kept:
        (tmp_path / name).write_text("kept")
    with (writer(tmp_path / "checkpoint", overwrite=True, kind="a test folder") if writer is atomic_dir else
          writer(tmp_path / "checkpoint")) as tmp:
        (tmp / "model.safetensors").write_text("new") if tmp.is_dir() else tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "checkpoint"])


# Writes the folder sys.argv[1] through atomic_dir, and waits on stdin while its temporary is open.
SLOW_WRITER = """
import sys
from pathlib import Path
from minqr.atomic import atomic_dir
with atomic_dir(Path(sys.argv[1]), overwrite=True, kind="a test folder") as tmp:
    (tmp / "writer").write_text("slow")
    print(tmp.name, flush=True)
    sys.stdin.readline()
"""


def test_a_write_leaves_the_temporary_of_a_live_writer_alone(tmp_path):
    """Two writers of one folder at once: neither deletes the other's work, the last one wins."""
    target = tmp_path / "checkpoint"
    slow = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        temporary = tmp_path / slow.stdout.readline().strip()
        assert temporary.name.startswith(f".checkpoint.tmp-{slow.pid}@{socket.gethostname()}.")
        with atomic_dir(target, overwrite=True, kind="a test folder") as tmp:
            (tmp / "writer").write_text("fast")
        assert (target / "writer").read_text() == "fast"
        assert (temporary / "writer").read_text() == "slow"
    finally:
        slow.stdin.close()
    assert slow.wait(timeout=60) == 0, slow.stderr.read()
    assert (target / "writer").read_text() == "slow"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_the_temporary_of_a_writer_killed_by_sigkill_is_removed(tmp_path):
    target = tmp_path / "checkpoint"
    slow = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    temporary = tmp_path / slow.stdout.readline().strip()
    slow.send_signal(signal.SIGKILL)
    slow.wait(timeout=60)
    assert temporary.is_dir()
    with atomic_dir(target, overwrite=True, kind="a test folder") as tmp:
        (tmp / "writer").write_text("next")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_every_file_of_a_published_folder_has_the_umask_mode(tmp_path):
    """safetensors creates its files private (0600): a model folder must be readable as any other
    file the user makes, the model's weights as its config (RewardModel.save_pretrained moves them
    out of an atomic_dir's folder into the run's)."""
    model = RewardModel(random_gpt2(), HeadConfig.make("quantile", 4))
    run = tmp_path / "run"
    run.mkdir()
    model.save_pretrained(run, training_args={"lr": 1e-3})
    with atomic_dir(tmp_path / "folder", overwrite=True, kind="a test folder") as tmp:
        save_file({"a": torch.zeros(3)}, tmp / "model.safetensors")
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "private").write_text("x")
        (tmp / "sub" / "private").chmod(0o600)
    assert oct((run / "model.safetensors").stat().st_mode & 0o777) != "0o600"
    for path in [*run.iterdir(), *(tmp_path / "folder").rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~_umask()
        assert path.stat().st_mode & 0o777 == expected, path
