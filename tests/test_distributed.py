"""Several processes (torchrun, DistributedDataParallel over gloo on CPU): each takes its slice of
every global batch, and the step is the one a single process computes on the whole batch, so the
logged losses, accuracies and held-out metrics equal a one-process run's up to float rounding.
"""
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_train import ROOT, TIMING_KEYS, as_argv, tiny_options, write_run_inputs

from minqr.training.config import TrainConfig
from minqr.training.loop import train
from minqr.training.metrics import read_metrics


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
    return got


@pytest.mark.slow  # three training runs, two of them under torchrun
def test_torchrun_two_processes_match_one_process(tmp_path):
    inputs = write_run_inputs(tmp_path / "inputs", num_train=32)  # no dropout: masks would differ
    options = dict(max_steps=4, batch_size=8, eval_every=2, save_every=2, device="cpu")

    single = tmp_path / "single"
    train(TrainConfig(**tiny_options(inputs, single, **options)), progress=False)

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

    got = assert_same_run(double, single)
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
