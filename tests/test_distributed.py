"""Several processes (torchrun, DistributedDataParallel over gloo on CPU): each takes its slice of
every global batch, and the step is the one a single process computes on the whole batch, so the
logged losses, accuracies and held-out metrics equal a one-process run's up to float rounding. The
data names its annotators, so the personal held-out metrics (summed over the processes) and the
posteriors of annotators.json (a pass shared over them) are compared too.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import ROOT, TIMING_KEYS, as_argv, tiny_options, write_run_inputs

from minqr.distribution.personal import Annotators
from minqr.training.config import TrainConfig
from minqr.training.loop import train
from minqr.training.metrics import read_metrics
from minqr.training.personal_metrics import PERSONAL_EVAL_FILE


def with_annotators(inputs: dict, folder) -> dict:
    """The run inputs with annotator ids: the training pairs of three people, the held-out ones of
    two of them and of one stranger (8 held-out pairs each of the 24)."""
    labelled = dict(inputs)
    for key, ids in (("data", ["u0", "u1", "u2"]), ("eval_data", ["u0", "u1", "stranger"])):
        lines = open(inputs[key]).read().splitlines()
        path = os.path.join(folder, f"{key}-labelled.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({**json.loads(line), "annotator": ids[k % 3]}) + "\n"
                         for k, line in enumerate(lines))
        labelled[key] = path
    return labelled


def assert_same_run(run, single) -> list:
    """The run in folder `run` (several processes) logged and saved what the one-process run
    `single` did, to float rounding; returns its metrics.

    Step 1 runs the same weights on the same pairs: equal to float rounding. Later steps inherit
    weights that AdamW moved by ±lr wherever a gradient coordinate is ~0 and rounding decided its
    sign (a handful of the 40k coordinates), hence the absolute tolerance."""
    expected, got = (read_metrics(folder / "metrics.jsonl") for folder in (single, run))
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    assert got[0]["loss"] == pytest.approx(expected[0]["loss"], rel=1e-6)
    for a, b in zip(got, expected):
        for key in b:
            if key not in TIMING_KEYS:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=2e-4), (a["step"], key)
    weights, expected_weights = load_file(run / "model.safetensors"), load_file(single / "model.safetensors")
    assert weights.keys() == expected_weights.keys()
    differing = sum(int(((weights[n] - t).abs() > 1e-5).sum()) for n, t in expected_weights.items())
    assert differing < 0.01 * sum(t.numel() for t in expected_weights.values())
    # the posteriors of the training annotators and the final evaluation's per-annotator figures
    expected_annotators = Annotators.load(single)
    if expected_annotators is not None:
        annotators = Annotators.load(run)
        assert annotators.ids == expected_annotators.ids and annotators.pairs == expected_annotators.pairs
        torch.testing.assert_close(annotators.log_posteriors, expected_annotators.log_posteriors, rtol=1e-4,
                                   atol=1e-4)
    if (single / PERSONAL_EVAL_FILE).exists():
        expected_rows, rows = (json.loads((folder / PERSONAL_EVAL_FILE).read_text())["annotators"]
                               for folder in (single, run))
        assert [row["id"] for row in rows] == [row["id"] for row in expected_rows]
        for row, expected_row in zip(rows, expected_rows):
            assert row == {**expected_row, "personal_accuracy": pytest.approx(expected_row["personal_accuracy"]),
                           "population_accuracy": pytest.approx(expected_row["population_accuracy"])}
    return got


@pytest.mark.slow  # three training runs, two of them under torchrun
def test_torchrun_two_processes_match_one_process(tmp_path, capsys):
    inputs = with_annotators(write_run_inputs(tmp_path / "inputs", num_train=32), tmp_path)  # no dropout
    options = dict(max_steps=4, batch_size=8, eval_every=2, save_every=2, device="cpu")

    single = tmp_path / "single"
    train(TrainConfig(**tiny_options(inputs, single, **options)), progress=False)
    # where the training labels put the scale: a search whose every step sums over the processes
    scale_line = next(line for line in capsys.readouterr().err.splitlines() if "are likeliest with" in line)

    double = tmp_path / "double"
    # grad-accum 2 in each process exercises DDP's no_sync on the first micro-batch
    argv = as_argv(tiny_options(inputs, double, **options, grad_accum=2))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "tools" / "train.py"), *argv],
                            capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # only process 0 reports: the summary and each evaluation's line appear once
    assert result.stdout.count("trained 4 steps") == 1, result.stdout
    assert result.stderr.count("step 2: eval_loss") == 1, result.stderr

    assert result.stderr.count(scale_line) == 1, result.stderr
    got = assert_same_run(double, single)
    assert "eval_personal_accuracy" in got[-1] and (double / PERSONAL_EVAL_FILE).exists()
    # only process 0 wrote: one line per step and evaluation, one checkpoint
    assert len(got) == 4 + 2
    assert sorted(p.name for p in double.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == ["checkpoint"]


@pytest.mark.slow  # two torchrun jobs of two processes (test_cli covers the rule with RANK set by hand)
def test_under_torchrun_an_error_of_the_options_is_printed_once(tmp_path):
    """Every process checks the same options; process 0 alone says what is wrong, and the job
    fails. (torchrun then prints its own ChildFailedError traceback, which no child can prevent
    while it exits non-zero.)"""
    config = tmp_path / "c.json"
    config.write_text('{"seed": 3.7}')
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv, message in [(["--warmup", "5"], "Error: --warmup is a fraction of the steps, in [0, 1) (got 5.0)"),
                          (["--config", str(config)], "seed: '3.7' is not a valid integer")]:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(ROOT / "tools" / "train.py"), *argv],
                                capture_output=True, text=True, env=environment, timeout=300)
        assert result.returncode != 0
        assert (result.stdout + result.stderr).count(message) == 1, result.stdout + result.stderr


@pytest.mark.slow  # a torchrun job of two processes, signalled
@pytest.mark.parametrize("whom", ["one worker", "torchrun and its workers"])
def test_under_torchrun_one_process_signalled_stops_both_after_the_same_step(tmp_path, whom):
    """SIGTERM to one of the two processes (as a scheduler that kills one node's job would): the
    processes agree on it in the step's sum, so both finish that step, process 0 saves it and the
    job ends with the log and the checkpoint at the same step. The same when torchrun and the
    workers are all signalled (scancel, systemd): each worker then gets two SIGTERMs, torchrun's
    and its own, and the second must not kill it before the checkpoint."""
    inputs = write_run_inputs(tmp_path / "inputs")
    out = tmp_path / "run"
    argv = as_argv(tiny_options(inputs, out, max_steps=150, save_every=1000, eval_every=1000, device="cpu"))
    # process 0 takes 3 s to write the checkpoint (a big model's save): a process that left before it had
    # written would make torchrun SIGTERM process 0 in the middle (and SIGKILL it 30 s later)
    slow_save = tmp_path / "train_with_a_slow_save.py"
    slow_save.write_text("import time\n"
                         "import minqr.training.loop as loop\n"
                         "from minqr_cli.commands.train import train\n"
                         "save = loop.save_checkpoint\n"
                         "loop.save_checkpoint = lambda *args, **kwargs: (time.sleep(3), save(*args, **kwargs))[1]\n"
                         "train()\n")
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(slow_save), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or len(read_metrics(out / "metrics.jsonl")) < 3:
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "no steps within 2 minutes"
            time.sleep(0.05)
        workers = [int(pid) for task in Path(f"/proc/{job.pid}/task").iterdir()
                   for pid in (task / "children").read_text().split()]
        assert len(workers) == 2, workers
        for pid in ([max(workers)] if whom == "one worker" else [job.pid, *workers]):
            os.kill(pid, signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode != 0  # torchrun reports its workers' non-zero exits (143) as a failure
    stopped_at = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < 150
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, stopped_at + 1))
    assert stderr.count("SIGTERM: stopping after this step") == (1 if whom == "one worker" else 2), stderr
    assert stderr.count(f"Stopped: interrupted at step {stopped_at} of 150") >= 1, stderr
    if whom == "one worker":  # torchrun reports the workers' exits (signalled itself, it reports its signal)
        # The first exit to reach torchrun is a worker's own 143 after the agreed step; torchrun then sends
        # the other worker a SIGTERM of its own. Inside training that is a second request to stop (ignored),
        # so the save above is whole; once training has returned the handler is gone and the worker may die
        # of it (-15) on its way out. torchrun lists one or both exits, by when it looks.
        codes = re.findall(r"exitcode\s*: (-?\d+)", stderr)
        assert "143" in codes and set(codes) <= {"143", "-15"}, stderr


WAIT_SCRIPT = """
import functools, sys, time
from datetime import timedelta
import torch.distributed as dist
dist.init_process_group = functools.partial(dist.init_process_group, timeout=timedelta(seconds=2))
from minqr.training.distributed import start_processes, stop_processes
procs = start_processes("cpu")
if procs.rank == 0:
    time.sleep(5)  # a save longer than the process group's timeout (2 s here, 10 min with NCCL by default)
procs.wait_for_all()
print("waited", procs.rank)
stop_processes(procs, finished=True)
"""


@pytest.mark.slow  # two processes that wait 5 s
def test_the_processes_wait_for_process_0_longer_than_the_groups_timeout(tmp_path):
    """The other processes wait for process 0's save (an interrupt's checkpoint, the final model) or
    its files (a download) however long it takes: a barrier of the default group timed out after
    its timeout, and they left while process 0 was still writing."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}
    jobs = [subprocess.Popen([sys.executable, "-c", WAIT_SCRIPT], env={**environment, "RANK": str(rank),
                                                                       "LOCAL_RANK": str(rank)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [job.communicate(timeout=120) for job in jobs]
    for rank, (job, (stdout, stderr)) in enumerate(zip(jobs, results)):
        assert job.returncode == 0 and stdout.strip() == f"waited {rank}", stderr
