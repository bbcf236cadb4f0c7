"""Resuming (--resume): an interrupted run, continued from its checkpoint, reaches exactly the
weights of a run that was never interrupted: bit for bit on CPU, with dropout on, the data order
picked up mid-epoch and across epochs, AdamW's moments and the schedule restored. Interruptions
are an exception after a checkpoint (in process) and a real SIGKILL (a subprocess); a kill while
a checkpoint is being written leaves the previous one usable. A resume that changes how the numbers
are computed (device, compute dtype, compile) is allowed, with a warning. A disk that fills while a
checkpoint is written stops the run with one line, and it resumes bit for bit.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import ended_writer, load_tool
from safetensors.torch import load_file
from test_train import ROOT, TIMING_KEYS, as_argv, tiny_options, write_run_inputs

import minqr.atomic
import minqr.training.loop
from minqr import MinqrError
from minqr.training.config import TrainConfig
from minqr.training.loop import train
from minqr.training.metrics import read_metrics
from minqr.training.resume import find_checkpoint, load_checkpoint

STEPS = 8  # 24 pairs in batches of 8: 3 steps an epoch, so the run crosses two epoch boundaries


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    # dropout on: resuming must also restore the random number generators
    return write_run_inputs(tmp_path_factory.mktemp("inputs"), dropout=0.1, num_train=24)


def resume_options(inputs, out, **overrides) -> dict:
    return tiny_options(inputs, out, **{"max_steps": STEPS, "grad_accum": 2, "eval_every": 3, "save_every": 4,
                                        **overrides})


@pytest.fixture(scope="module")
def straight_run(inputs, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(TrainConfig(**resume_options(inputs, out)), progress=False)
    return out


def assert_same_run(out, reference):
    """Same weights and optimizer state bit for bit; the same log, timings aside."""
    weights, expected = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name in expected:
        assert torch.equal(weights[name], expected[name]), name
    state, expected_state = (load_checkpoint(o) for o in (out, reference))
    assert state.step == expected_state.step == STEPS
    for a, b in zip(state.optimizer["state"].values(), expected_state.optimizer["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in b)

    def without_timings(records):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    assert without_timings(read_metrics(out / "metrics.jsonl")) == without_timings(read_metrics(reference / "metrics.jsonl"))
    config, expected_config = (json.loads((o / "config.json").read_text()) for o in (out, reference))
    assert config == expected_config  # reward mean/std of the final evaluation included


def train_until_checkpoint(options: dict, stop_after: int, monkeypatch) -> None:
    """Run `options` and stop it with an exception right after it saved the checkpoint of step `stop_after`."""
    real_save = minqr.training.loop.save_checkpoint

    def save_then_stop(*args, step, **kwargs):
        real_save(*args, step=step, **kwargs)
        if step == stop_after:
            raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(minqr.training.loop, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            train(TrainConfig(**options), progress=False)
    assert load_checkpoint(options["out"]).step == stop_after


@pytest.mark.parametrize("stop_after", [4, 3])  # mid-epoch (epoch 1, batch 1); at the end of epoch 0
def test_resumed_run_equals_the_uninterrupted_one(inputs, straight_run, tmp_path, monkeypatch, capsys,
                                                 stop_after):
    options = resume_options(inputs, tmp_path / "run", save_every=stop_after)
    train_until_checkpoint(options, stop_after, monkeypatch)
    train(TrainConfig(**options, resume=True), progress=False)
    assert_same_run(tmp_path / "run", straight_run)
    assert "bit-identical" not in capsys.readouterr().err  # computed as before: no warning


@pytest.mark.slow  # a real process trained, killed and resumed: about 4 s of CPU
def test_kill_9_during_training_then_resume(inputs, straight_run, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "tools" / "train.py"), *as_argv(resume_options(inputs, out, save_every=2))]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while find_checkpoint(out) is None:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(out).step
    assert 2 <= killed_at < STEPS
    result = CliRunner().invoke(load_tool("train"), [*as_argv(resume_options(inputs, out, save_every=2)), "--resume"])
    assert result.exit_code == 0, result.output
    assert_same_run(out, straight_run)


# tools/train.py in a process that SIGKILLs itself half-way through writing the checkpoint of step
# `kill_at`: no `finally` runs, so whatever the write had made stays on disk, as after a real kill.
KILL_WHILE_SAVING = """
import os, runpy, signal
import torch

real_save = torch.save

def torn_save(obj, path, *args, **kwargs):
    if obj["step"] == {kill_at}:
        with open(path, "wb") as f:
            f.write(b"PK\\x03\\x04 half a zip")
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, path, *args, **kwargs)

torch.save = torn_save
runpy.run_path({train_py!r}, run_name="__main__")
"""


@pytest.mark.slow  # real processes killed while they save: about 4 s of CPU
def test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_one(inputs, straight_run, tmp_path):
    out = tmp_path / "run"
    argv = as_argv(resume_options(inputs, out))  # checkpoints at steps 4 and 8: the kill hits the second
    driver = KILL_WHILE_SAVING.format(kill_at=STEPS, train_py=str(ROOT / "tools" / "train.py"))
    killed = subprocess.run([sys.executable, "-c", driver, *argv], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".checkpoint.tmp-")]
    assert len(leftovers) == 1  # the torn write, which nothing could remove
    checkpoint = load_checkpoint(out)
    assert checkpoint.step == 4 and checkpoint.folder == out / "checkpoint"
    result = CliRunner().invoke(load_tool("train"), [*argv, "--resume"])
    assert result.exit_code == 0, result.output
    assert_same_run(out, straight_run)
    # the next save of the checkpoint removed the torn write
    assert [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")] == []


def test_resume_warns_when_device_dtype_or_compile_change(inputs, tmp_path, monkeypatch, capsys):
    options = resume_options(inputs, tmp_path / "run", save_every=2)
    train_until_checkpoint(options, 2, monkeypatch)
    state_file = tmp_path / "run" / "checkpoint" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["compute"] == {"device": "cpu", "dtype": "float32", "compile": False}
    capsys.readouterr()
    # the run as if it had started on a GPU in bfloat16 (--dtype auto) and compiled
    torch.save({**state, "compute": {"device": "cuda", "dtype": "bfloat16", "compile": True}}, state_file)
    train(TrainConfig(**options, resume=True), progress=False)
    warning = capsys.readouterr().err
    for words in ["device cuda -> cpu", "dtype bfloat16 -> float32", "compile True -> False",
                  "no longer bit-identical"]:
        assert words in warning


def test_resume_finds_a_checkpoint_moved_aside_by_an_interrupted_replacement(inputs, straight_run, tmp_path,
                                                                             monkeypatch):
    """atomic_dir replaces a folder with two renames; between them the old checkpoint lies at
    checkpoint.old-*/checkpoint. Resuming from there continues the run, and cleans up."""
    out = tmp_path / "run"
    options = resume_options(inputs, out, save_every=2)
    train_until_checkpoint(options, 2, monkeypatch)
    aside = out / f"checkpoint.old-{ended_writer()}.x1y2"  # the interrupted writer has ended
    aside.mkdir()
    (out / "checkpoint").rename(aside / "checkpoint")
    train(TrainConfig(**options, resume=True), progress=False)
    assert_same_run(out, straight_run)
    assert not aside.exists()


def test_resume_refuses_changed_options_and_names_them(inputs, tmp_path):
    out = tmp_path / "run"
    options = resume_options(inputs, out, max_steps=3, eval_every=0)
    train(TrainConfig(**options), progress=False)
    changed = {**options, "lr": 1e-4, "head": "scalar", "save_every": 1, "eval_every": 2}
    result = CliRunner().invoke(load_tool("train"), [*as_argv(changed), "--resume"])
    assert result.exit_code == 1
    assert "--lr 0.0001" in result.output and "--head 'scalar'" in result.output
    assert "--save-every" not in result.output and "--eval-every" not in result.output  # these may change


def test_a_run_made_before_newer_options_is_refused(inputs, tmp_path, monkeypatch):
    """A checkpoint whose config lacks options added since (here --ema-window and --param-dtype) was
    made by a minqr without them: --resume refuses it and names them (no compatibility path)."""
    out = tmp_path / "run"
    options = resume_options(inputs, out)
    train_until_checkpoint(options, 4, monkeypatch)
    config_file = out / "checkpoint" / "config.json"
    config = json.loads(config_file.read_text())
    for newer in ("ema_window", "param_dtype"):
        del config[newer]
    config_file.write_text(json.dumps(config))
    result = CliRunner().invoke(load_tool("train"), [*as_argv(options), "--resume"])
    assert result.exit_code == 1
    assert result.output == ("Error: --resume: the run being resumed was made by a minqr without --ema-window, "
                             "--param-dtype (its checkpoint has no value for them): start it afresh with "
                             "--overwrite instead of --resume\n")


@pytest.mark.parametrize("damage", ["state.pt cut short", "config.json not JSON", "state.pt of another layout"])
def test_a_damaged_checkpoint_is_one_line_that_names_the_file(inputs, tmp_path, monkeypatch, damage):
    options = resume_options(inputs, tmp_path / "run", save_every=2)
    train_until_checkpoint(options, 2, monkeypatch)
    folder = tmp_path / "run" / "checkpoint"
    start_afresh = "the checkpoint is damaged: start the run afresh with --overwrite instead of --resume"
    if damage == "state.pt cut short":
        (folder / "state.pt").write_bytes((folder / "state.pt").read_bytes()[:50_000])
        problem = f"{folder / 'state.pt'} is not a file torch.load can read (a zip archive cut short): {start_afresh}"
    elif damage == "config.json not JSON":
        (folder / "config.json").write_text('{"head": ')
        problem = f"{folder / 'config.json'} is not valid JSON (Expecting value: line 1 column 10 (char 9)): {start_afresh}"
    else:
        torch.save({"model": {}}, folder / "state.pt")
        problem = (f"{folder / 'state.pt'} is not a checkpoint this run can continue from: it has no step, position, "
                   f"optimizer, average, scheduler, rng_states, compute, data; {start_afresh}")
    result = CliRunner().invoke(load_tool("train"), [*as_argv(options), "--resume"])
    assert result.exit_code == 1
    assert result.output == f"Error: --resume: {problem}\n"


def test_resume_refuses_other_training_pairs(inputs, tmp_path, monkeypatch):
    """The data file is named by an option, but it can change between the runs (or render otherwise:
    a chat template that writes today's date): the same number of pairs resumed the data position
    over other pairs without a word."""
    data = tmp_path / "train.jsonl"
    shutil.copy(inputs["data"], data)
    options = resume_options({**inputs, "data": str(data)}, tmp_path / "run", save_every=2)
    train_until_checkpoint(options, 2, monkeypatch)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    records[0], records[1] = records[1], records[0]  # the same pairs, in another order: another run
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(load_tool("train"), [*as_argv(options), "--resume"])
    assert result.exit_code == 1 and result.output.splitlines()[-1] + "\n" == (
        f"Error: --resume: the training pairs differ from those the run in {tmp_path / 'run'} began with: the data "
        "file has changed since, or its texts render otherwise now (a chat template that writes today's date); give "
        "the data the run began with, or start it afresh with --overwrite instead of --resume\n"), result.output
    records[0], records[1] = records[1], records[0]  # as it began: it resumes
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert CliRunner().invoke(load_tool("train"), [*as_argv(options), "--resume"]).exit_code == 0


def test_resume_without_a_checkpoint_says_so(inputs, tmp_path):
    result = CliRunner().invoke(load_tool("train"), [*as_argv(resume_options(inputs, tmp_path / "run")), "--resume"])
    assert result.exit_code == 1
    assert result.output == (f"Error: --resume: {tmp_path / 'run'} holds no run to continue: drop --resume to start "
                             "one\n")


def test_a_full_disk_at_a_checkpoint_is_one_message_and_the_run_resumes_bit_for_bit(inputs, straight_run, tmp_path,
                                                                                 monkeypatch):
    """The second checkpoint's torch.save runs out of space half-way (on a disk that is then full): the
    run stops with one line, the first checkpoint is whole, and --resume finishes the run exactly."""
    options = resume_options(inputs, tmp_path / "run", save_every=2)
    real_save, saves = torch.save, []

    def full_on_the_second_save(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) == 2:
            Path(f).write_bytes(b"PK\x03\x04" + bytes(1000))  # what torch.save wrote before the disk filled
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 598")
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_on_the_second_save)
        patch.setattr(minqr.atomic, "_free_bytes", lambda path: 0)
        result = CliRunner().invoke(load_tool("train"), as_argv(options))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert (f"Error: cannot write {tmp_path / 'run' / 'checkpoint'}: no space left on device; free some space or "
            "write elsewhere (nothing was changed there)") in result.output
    assert load_checkpoint(tmp_path / "run").step == 2
    assert [p.name for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []
    result = CliRunner().invoke(load_tool("train"), as_argv({**options, "resume": True}))
    assert result.exit_code == 0, result.output
    assert_same_run(tmp_path / "run", straight_run)


def test_metrics_skip_a_torn_line_and_name_an_edited_one(tmp_path):
    """A kill mid-append cuts metrics.jsonl's last line, maybe inside a character: skipped. A line
    that parses but is no record was a KeyError traceback on --resume: now named."""
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    whole = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(whole + '{"step": 3, "note": "é'.encode()[:-1])  # cut inside the é
    assert read_metrics(path) == records
    for edited in ("{}", "[1]", "7", '{"step": "7"}', '{"step": true}'):
        path.write_bytes(whole + edited.encode() + b"\n")
        with pytest.raises(MinqrError) as caught:
            read_metrics(path)
        assert str(caught.value) == (f"{path}:3: not a record of minqr's metrics (a JSON object with the step, a whole "
                                     "number): the file was edited; remove that line, or the file to drop the run's log")


def test_a_run_whose_template_writes_the_date_resumes_another_day_bit_for_bit(tmp_path, monkeypatch):
    """Llama 3.2's chat template writes today's date into every conversation. A run renders its
    texts with the moment it began, recorded in its checkpoints, so that one resumed on another day
    reads the texts it began with (it read others before, and then was refused them)."""
    from datetime import datetime

    from minqr.models import chat_template

    inputs = write_run_inputs(tmp_path / "inputs", num_train=24)
    (Path(inputs["tokenizer"]) / "chat_template.jinja").write_text(
        "{%- set date_string = strftime_now('%d %b %Y %H:%M:%S.%f') %}Today Date: {{ date_string }}\n"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(24):
            question = [{"role": "user", "content": f"question {i}"}]
            f.write(json.dumps({"chosen": question + [{"role": "assistant", "content": "a good answer " * (i % 3)}],
                                "rejected": question + [{"role": "assistant", "content": "bad"}]}) + "\n")
    inputs = {**inputs, "data": str(tmp_path / "train.jsonl"), "eval_data": str(tmp_path / "train.jsonl")}

    class Then(datetime):  # the day the runs began
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 7, 23, 59, 59)

    class NextDay(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 8, 0, 0, 1)

    for module in (chat_template, minqr.training.loop):
        monkeypatch.setattr(module, "datetime", Then)
    straight = tmp_path / "straight"
    train(TrainConfig(**resume_options(inputs, straight)), progress=False)
    options = resume_options(inputs, tmp_path / "run", save_every=4)
    train_until_checkpoint(options, 4, monkeypatch)
    for module in (chat_template, minqr.training.loop):
        monkeypatch.setattr(module, "datetime", NextDay)
    train(TrainConfig(**options, resume=True), progress=False)
    assert_same_run(tmp_path / "run", straight)
    assert load_checkpoint(tmp_path / "run").data["rendered_at"] == "2026-12-07T23:59:59"


def test_a_checkpoint_of_a_minqr_before_the_data_digest_is_named_as_such(inputs, tmp_path, monkeypatch):
    options = resume_options(inputs, tmp_path / "run", save_every=2)
    train_until_checkpoint(options, 2, monkeypatch)
    state_file = tmp_path / "run" / "checkpoint" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    del state["data"]
    torch.save(state, state_file)
    with pytest.raises(MinqrError) as caught:
        train(TrainConfig(**options, resume=True), progress=False)
    assert str(caught.value) == (
        f"--resume: {state_file} was written by a minqr that did not yet record the digest of the training pairs, "
        "which --resume now checks: this minqr cannot continue that run; finish it with the minqr that began it, or "
        "start it afresh with --overwrite")
