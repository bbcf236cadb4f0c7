"""Atomic writes: all or nothing, and published with ordinary permissions."""
import os

import pytest

from minqr.atomic import atomic_dir, atomic_file


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


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "stale.bin").write_text("stale")
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_atomic_dir_keeps_old_folder_when_writer_fails(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "model.safetensors").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_text("torn")
            raise RuntimeError("killed")
    assert (target / "model.safetensors").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


@pytest.mark.parametrize("writer", [atomic_file, atomic_dir])
def test_a_write_removes_what_a_killed_writer_left(tmp_path, writer):
    # SIGKILL runs no `finally`: simulate the leftovers of two killed writes of the target
    (tmp_path / ".checkpoint.tmp-abc123").mkdir()
    (tmp_path / ".checkpoint.tmp-abc123" / "model.safetensors").write_text("torn")
    (tmp_path / ".checkpoint.tmp-def456").write_text("torn")
    (tmp_path / ".other.tmp-xyz").write_text("another target's: kept")
    with writer(tmp_path / "checkpoint") as tmp:
        (tmp / "model.safetensors").write_text("new") if tmp.is_dir() else tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-xyz", "checkpoint"]
