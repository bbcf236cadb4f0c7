"""One job at a time per output (minqr/lock.py), with real processes: a holder in another process
refuses a second job with its description, a holder killed by SIGKILL leaves a lock that the next
job takes over, and the tools (train, score, export, analyze) hold the lock of their --out.
"""
import contextlib
import json
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from factories import load_tool
from test_train import ROOT, as_argv, tiny_options, write_run_inputs

from minqr.errors import MinqrError
from minqr.lock import hold_output, lock_path

TRAIN = load_tool("train")  # tools/train.py's command

HOLDER = """
import sys
from minqr.lock import hold_output
with hold_output(sys.argv[1], "--out"):
    print("held", flush=True)
    sys.stdin.readline()  # until the test lets go
"""


@contextlib.contextmanager
def holder_process(path):
    """Another process that holds the lock of `path` until the block ends (or the test kills it)."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "held\n"
        yield process
    finally:
        if process.poll() is None:
            process.stdin.close()
        process.wait(timeout=60)


def holder_description(path) -> dict:
    return json.loads(lock_path(path).read_text())


def refusal(option, path, holder) -> str:
    return (f"{option} {path} is in use by pid {holder['pid']} on {holder['host']}, since {holder['since']}, "
            f"running: {holder['command']}. Wait for that job to end or stop it, or write elsewhere "
            f"(lock file: {lock_path(path)})")


def takeover(option, path, holder) -> str:
    return (f"note: {option} {path}: its lock file was left behind by pid {holder['pid']} on {holder['host']}, "
            f"since {holder['since']}, running: {holder['command']}, which no longer runs (killed?); taking the lock over")


def test_a_second_job_is_refused_and_told_who_holds_the_output(tmp_path):
    out = tmp_path / "runs" / "quantile"
    with holder_process(out) as process:
        holder = holder_description(out)
        assert holder["pid"] == process.pid and holder["host"] == socket.gethostname()
        assert holder["command"] == shlex.join([sys.executable, "-c", HOLDER, str(out)])
        with pytest.raises(MinqrError) as refused:
            with hold_output(out, "--out"):
                pass
        assert str(refused.value) == refusal("--out", out, holder)
    # the holder ended normally: its lock file is gone and the output is free, with nothing to say
    assert not lock_path(out).exists()
    said = []
    with hold_output(out, "--out", say=said.append):
        assert holder_description(out)["pid"] != process.pid
    assert said == [] and not lock_path(out).exists()


def test_a_lock_left_by_a_killed_job_is_taken_over_and_said(tmp_path):
    out = tmp_path / "scores.npz"
    with holder_process(out) as process:
        holder = holder_description(out)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert holder_description(out) == holder  # a killed job cleans nothing up
    said = []
    with hold_output(out, "--out", say=said.append):
        pass
    assert said == [takeover("--out", out, holder)]
    assert not lock_path(out).exists()


def test_the_lock_goes_with_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with hold_output(tmp_path / "out"):
            raise RuntimeError("the job failed")
    assert not lock_path(tmp_path / "out").exists()


def wait_for_lock(path, process, seconds=120.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            return holder_description(path)
        except (FileNotFoundError, ValueError):  # not made yet, or made and not yet written
            time.sleep(0.05)
    raise AssertionError(f"no lock on {path} after {seconds} s")


def test_two_training_runs_into_one_out_folder(tmp_path):
    """The first run trains (a real process); the second is refused before it touches the folder;
    a kill -9 of the first leaves its lock, and the next run takes it over."""
    inputs = write_run_inputs(tmp_path / "inputs")
    out = tmp_path / "run"
    argv = as_argv(tiny_options(inputs, out, max_steps=100_000, eval_every=0, save_every=0))
    command = [sys.executable, str(ROOT / "tools" / "train.py"), *argv]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for_lock(out, first)
        assert holder["pid"] == first.pid and holder["command"] == shlex.join(command)
        result = CliRunner().invoke(TRAIN, argv)
        assert result.exit_code == 1
        assert result.output == f"Error: {refusal('--out', out, holder)}\n"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    result = CliRunner().invoke(TRAIN, as_argv(tiny_options(inputs, out, max_steps=2, overwrite=True)))
    assert result.exit_code == 0, result.output
    assert takeover("--out", out, holder) + "\n" in result.output
    assert not lock_path(out).exists()


@pytest.mark.parametrize("alias", [False, True])
@pytest.mark.parametrize("tool, argv", [
    ("score", ["--model", "m", "--data", "d.jsonl", "--out", "{out}"]),
    ("export", ["--model", "m", "--scalar", "--out", "{out}"]),
    ("analyze", ["s.npz", "--out", "{out}"]),
])
def test_score_export_and_analyze_hold_their_out(tmp_path, tool, argv, alias):
    """Each tool holds its output's lock; a symbolic link to the output is the same output."""
    out = tmp_path / ("output.npz" if tool == "score" else "output")  # score checks its name before the lock
    given = out
    if alias:  # the output (made by the holder's job) reached through a link in another folder
        out.mkdir()
        (tmp_path / "links").mkdir()
        given = tmp_path / "links" / f"alias{out.suffix}"
        given.symlink_to(out)
    with holder_process(out):
        result = CliRunner().invoke(load_tool(tool), [a.format(out=given) for a in argv])
        assert result.exit_code == 1
        assert result.output == f"Error: {refusal('out', given, holder_description(out))}\n"


def test_a_link_to_a_running_run_is_refused(tmp_path):
    """A training run in a real process holds run/; a second run given a link to it, or a link to
    its parent folder, is refused and the first run's files stay as they were."""
    inputs = write_run_inputs(tmp_path / "inputs")
    out = tmp_path / "runs" / "run"
    (tmp_path / "alias").symlink_to(out, target_is_directory=True)
    (tmp_path / "parent").symlink_to(tmp_path / "runs", target_is_directory=True)
    argv = as_argv(tiny_options(inputs, out, max_steps=100_000, eval_every=0, save_every=0))
    first = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), *argv],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for_lock(out, first)
        for given in (tmp_path / "alias", tmp_path / "parent" / "run"):
            result = CliRunner().invoke(TRAIN, as_argv(tiny_options(inputs, given, max_steps=2, overwrite=True)))
            assert result.exit_code == 1
            assert result.output == f"Error: {refusal('--out', given, holder)}\n"
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
