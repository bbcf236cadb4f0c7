"""Training end to end (minqr/training/loop.py, tools/train.py): the command line, the files a run leaves,
the objective of a step against the formula written out, the real HH-RLHF pairs, the NaN stop and
the offline demo. Resuming is in test_resume.py, torchrun in test_distributed.py.

Every run uses a tiny random GPT-2 (2 layers, 32 wide) written into a temporary folder, so a run
takes a second or two.
"""
import gzip
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file
from factories import load_tool, sigint_at_default, tiny_config, write_tiny_checkpoint, write_tiny_tokenizer
from test_pairs import SURROGATE_LINE, surrogate_error

import minqr.training.interrupt
import minqr.training.loop
import minqr.training.metrics
from minqr.synthetic.folder import make_synthetic_task
from minqr.training.interrupt import Interrupt
from minqr.errors import MinqrError
from minqr.models.hf_folder import DAMAGED
from minqr.models.reward import RewardModel
from minqr.models.tokenizer import load_tokenizer
from minqr.training.config import TrainConfig
from minqr.training.loss import ResponseBag
from minqr.training.loop import train
from minqr.training.metrics import read_metrics

TRAIN = load_tool("train")  # tools/train.py's command

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("tokens_per_s", "pairs_per_s")
TRAIN_KEYS = {"step", "loss", "accuracy", "lr", *TIMING_KEYS}
EVAL_KEYS = {"step", "eval_loss", "eval_accuracy", "eval_reward_mean", "eval_reward_std", "eval_margin"}

QUESTIONS = ["What is the capital of France?", "How do I bake bread at home?",
             "Can you help me write a poem about the sea?", "Tell me something rude."]
LIKED = [" Of course! The capital of France is Paris.", " Sure, mix flour, water and yeast.",
         " Happy to help: waves roll in."]
DISLIKED = [" No.", " I'd rather not.", " Go away, fox."]


def write_pairs(path: Path, count: int, seed: int) -> Path:
    """Pairs a model can learn: a liked reply beats a disliked one to the same question."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(count):
            prompt = f"\n\nHuman: {QUESTIONS[rng.integers(len(QUESTIONS))]} ({rng.integers(100)})\n\nAssistant:"
            f.write(json.dumps({"chosen": prompt + LIKED[rng.integers(len(LIKED))],
                                "rejected": prompt + DISLIKED[rng.integers(len(DISLIKED))]}) + "\n")
    return path


def write_run_inputs(folder: Path, dropout: float = 0.0, num_train: int = 40) -> dict:
    """A tiny checkpoint, its tokenizer, training and held-out pairs: TrainConfig's inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(n_positions=128, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    write_tiny_checkpoint(folder / "model", config)
    write_tiny_tokenizer(folder / "tokenizer")
    return {"model": str(folder / "model"), "tokenizer": str(folder / "tokenizer"),
            "data": str(write_pairs(folder / "train.jsonl", num_train, seed=1)),
            "eval_data": str(write_pairs(folder / "test.jsonl", 24, seed=2))}


def tiny_options(inputs: dict, out: Path, **overrides) -> dict:
    return {**inputs, "out": str(out), "max_length": 96, "batch_size": 8, "lr": 3e-3, "warmup": 0.1,
            "max_steps": 12, "eval_every": 6, "save_every": 6, "seed": 0, **overrides}


def as_argv(options: dict) -> list:
    argv = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_run_inputs(tmp_path_factory.mktemp("inputs"))


# ---- the command line ------------------------------------------------------------------------

def test_help_lists_every_option():
    result = CliRunner().invoke(TRAIN, ["--help"])
    assert result.exit_code == 0, result.output
    for option in ["--head", "--num-quantiles", "--objective", "--kappa", "--lam", "--margin", "--bag-coef",
                   "--head-lr-scale", "--head-weight-decay", "--center-coef", "--lm-coef",
                   "--model", "--data", "--eval-data", "--out", "--max-length", "--batch-size", "--grad-accum",
                   "--lr", "--weight-decay", "--warmup", "--epochs", "--max-steps", "--eval-every",
                   "--save-every", "--seed", "--device", "--dtype", "--param-dtype", "--master-weights", "--compile", "--resume",
                   "--no-shared-prefix", "--skip-bad", "--demo"]:
        assert option in result.output, option


@pytest.mark.parametrize("argv, exit_code, words", [
    (["--head", "medium"], 2, ["--head", "medium"]),
    (["--lr", "-1"], 1, ["--lr"]),
    (["--lr", "nan"], 2, ["'--lr'", "'nan' is not a finite number"]),
    (["--lr", "inf"], 2, ["'--lr'", "'inf' is not a finite number"]),
    (["--lr", "1e39"], 1, ["--lr must be positive and at most 1e+30 (got 1e+39"]),
    (["--num-quantiles", "100000"], 1, ["--num-quantiles", "num_quantiles=100000 must be an integer from 1 to 256"]),
    (["--warmup", "5"], 1, ["--warmup", "fraction"]),
    (["--head", "scalar", "--num-quantiles", "5"], 1, ["--num-quantiles", "scalar head"]),
    (["--objective", "paper", "--kappa", "0"], 1, ["--kappa", "kappa must be finite and > 0, got 0"]),
    (["--kappa", "1"], 1, ["--kappa", "objective 'mixture' has no hyper-parameter kappa"]),
    (["--objective", "median"], 2, ["--objective", "median"]),
    (["--head-lr-scale", "0"], 1, ["--head-lr-scale must be positive"]),
    (["--batch-size", "30", "--grad-accum", "4"], 1, ["--batch-size 30", "--grad-accum 4"]),
    (["--max-length", "200"], 1, ["--max-length 200", "128 positions"]),
    (["--batch-size", "64"], 1, ["--batch-size 64", "40 training pairs"]),
    (["--data", "no/such/file.jsonl"], 1, ["no/such/file.jsonl"]),
    (["--dropout", "1"], 1, ["--dropout is a probability in [0, 1) (got 1.0)"]),
])
def test_bad_options_are_named(inputs, tmp_path, argv, exit_code, words):
    result = CliRunner().invoke(TRAIN, as_argv(tiny_options(inputs, tmp_path / "run")) + argv)
    assert result.exit_code == exit_code, result.output
    for word in words:
        assert word in result.output


def test_an_out_folder_holding_a_run_needs_resume_or_overwrite(inputs, tmp_path):
    options = tiny_options(inputs, tmp_path / "run", max_steps=2)
    train(TrainConfig(**options), progress=False)
    with pytest.raises(ValueError) as refused:
        train(TrainConfig(**options), progress=False)
    assert str(refused.value) == (f"--out {tmp_path / 'run'} already holds a run with a checkpoint: add --resume to "
                                  "continue it, --overwrite to start afresh, or choose another --out")
    summary = train(TrainConfig(**options, overwrite=True), progress=False)
    assert summary.steps == 2 and len([r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]) == 2


def test_a_run_stopped_before_its_first_checkpoint_is_told_the_way_out(inputs, tmp_path):
    """Killed before its first checkpoint, a run leaves metrics but nothing to resume: neither command
    may send the user to the other (--resume says "run without", that says "add --resume")."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')  # what such a run leaves
    argv = as_argv(tiny_options(inputs, out, max_steps=2))
    fresh = CliRunner().invoke(TRAIN, argv)
    assert fresh.exit_code == 1
    assert fresh.output == (f"Error: --out {out} already holds a run that saved no checkpoint (nothing to resume): "
                            "add --overwrite to start afresh, or choose another --out\n")
    resumed = CliRunner().invoke(TRAIN, [*argv, "--resume"])
    assert resumed.exit_code == 1
    assert resumed.output == (f"Error: --resume: {out} holds no checkpoint to continue from (a run saves one every "
                              "--save-every steps, and this one was stopped before its first): start it afresh "
                              "with --overwrite instead of --resume\n")
    assert CliRunner().invoke(TRAIN, [*argv, "--overwrite"]).exit_code == 0


def test_a_tokenizer_with_more_ids_than_the_model_embeds_is_refused_before_training(inputs, tmp_path):
    small = tmp_path / "small"
    write_tiny_checkpoint(small, tiny_config(n_positions=128, vocab_size=200))
    result = CliRunner().invoke(TRAIN, as_argv(tiny_options({**inputs, "model": str(small)}, tmp_path / "run")))
    tokens = load_tokenizer(inputs["tokenizer"]).vocab_size
    assert result.exit_code == 1 and result.output.endswith(
        f"Error: --tokenizer {inputs['tokenizer']} has {tokens} ids but --model {small} embeds only 200: they do not "
        "belong together\n"), result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_never_writes_over_a_folder_that_is_not_a_run(inputs, tmp_path):
    """The --model folder itself, or a folder with model files of the user's (a downloaded
    checkpoint): refused, with --overwrite too, before any work, and every file stays as it was. A
    folder that holds a model minqr wrote (a run's or an export's) needs --overwrite, and so does a
    folder of other files (a run replaces its tensorboard/, curves.png, annotators.json, ...)."""
    argv = as_argv(tiny_options(inputs, tmp_path / "unused", max_steps=2))
    def with_out(out, *extra):
        given = list(argv)
        given[given.index("--out") + 1] = str(out)
        return CliRunner().invoke(TRAIN, [*given, *extra])
    model = Path(inputs["model"])
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for extra in ((), ("--overwrite",)):
        result = with_out(model, *extra)
        assert result.exit_code == 1 and result.output == (
            f"Error: --out {model} is the --model folder itself: training would write over the model it starts "
            "from; choose another --out\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": 1}')
    (mine / "notes.txt").write_text("mine")
    for extra in ((), ("--overwrite",)):
        result = with_out(mine, *extra)
        assert result.exit_code == 1 and result.output == (
            f"Error: --out {mine} holds model files that are not a minqr run's (config.json): training would write "
            "its model over them; choose another folder\n")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert (mine / "config.json").read_text() == '{"mine": 1}' and (mine / "notes.txt").read_text() == "mine"
    theirs = tmp_path / "theirs"
    (theirs / "tensorboard").mkdir(parents=True)
    files = {"tensorboard/events.mine": "mine", "curves.png": "plot", "annotators.json": '{"mine": 1}'}
    for name, text in files.items():
        (theirs / name).write_text(text)
    result = with_out(theirs)
    assert result.exit_code == 1 and result.output == (
        f"Error: --out {theirs} is not empty (annotators.json, curves.png, tensorboard) and holds no run of minqr's: "
        "a run writes its model, checkpoints and logs there, replacing files of the same names; choose another --out, "
        "or add --overwrite to train into it\n")
    assert {name: (theirs / name).read_text() for name in files} == files
    result = with_out(mine / "notes.txt")
    assert result.exit_code == 1 and result.output == (f"Error: --out {mine / 'notes.txt'} is a file, not a folder: a "
                                                       "run is a folder; choose another --out\n")
    # a model minqr wrote, without a log or checkpoint (an export, or a run's folder cleaned up): --overwrite
    run = tmp_path / "run"
    assert with_out(run).exit_code == 0
    for name in ("metrics.jsonl", "checkpoint", "curves.png"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = with_out(run)
    assert result.exit_code == 1 and result.output == (
        f"Error: --out {run} already holds a run of minqr's: add --overwrite to replace it, or choose another "
        "--out\n")
    assert with_out(run, "--overwrite").exit_code == 0


@pytest.mark.slow  # a real process trained, signalled and resumed: about 5 s of CPU each
@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_signal_finishes_the_step_saves_it_and_says_how_to_resume(inputs, tmp_path, sig, name):
    """A real SIGINT (Ctrl-C) or SIGTERM (kill, a job scheduler) to a real process: the step in
    progress is finished and checkpointed, the exit code is the shell's for the signal (130 =
    128 + SIGINT, 143 = 128 + SIGTERM), and --resume continues to the end from exactly there."""
    out = tmp_path / "run"
    # the signal comes after at least three steps, while the process may take a few more before it
    # arrives (a busy machine); --resume then trains the rest in this process
    options = tiny_options(inputs, out, max_steps=150, save_every=1000, eval_every=1000)
    process = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), *as_argv(options)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_at_default)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or len(read_metrics(out / "metrics.jsonl")) < 3:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no steps within 2 minutes"
            time.sleep(0.05)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + sig, stderr
    stopped_at = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, stopped_at + 1))
    assert stderr.rstrip().endswith(f"Stopped: interrupted at step {stopped_at} of 150; its checkpoint is in "
                                    f"{out / 'checkpoint'}: continue with the same command plus --resume")
    assert f"{name}: stopping after this step" in stderr
    resumed = CliRunner().invoke(TRAIN, [*as_argv(options), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"trained steps {stopped_at + 1} to 150 in " in resumed.output
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == list(range(1, 151))
    again = CliRunner().invoke(TRAIN, [*as_argv(options), "--resume"])  # a finished run: nothing to train
    assert again.exit_code == 0 and "nothing left to train: the run had finished its 150 steps" in again.output


def test_the_interrupt_takes_both_signals_and_leaves_an_ignored_sigint_ignored(monkeypatch):
    """In one process (the real process's end is the slow test above, torchrun's in
    test_distributed): the first signal is recorded and the run goes on, a second Ctrl-C raises
    KeyboardInterrupt, the handlers before are back afterwards; the processes' summed flags decide
    the signal they stop for and its status (SIGTERM over Ctrl-C); and a SIGINT ignored from the
    start (a script's background job) is left ignored while SIGTERM is still taken."""
    said = []
    monkeypatch.setattr(minqr.training.interrupt, "say", said.append)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Ctrl-C as a terminal's job has it (a background job of a shell, `cmd &`, starts with it ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    at_start = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: before[signal.SIGTERM]}
    interrupt = Interrupt()
    with interrupt:
        assert interrupt.flags() == [0.0, 0.0]
        signal.raise_signal(signal.SIGINT)
        assert interrupt.received == signal.SIGINT and interrupt.flags() == [1.0, 0.0]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert said == ["Ctrl-C: stopping after this step and saving a checkpoint (press Ctrl-C again to stop at once, "
                    "losing the steps since the last checkpoint)"]
    assert {sig: signal.getsignal(sig) for sig in before} == at_start
    for summed, agreed in [([0.0, 0.0], None), ([1.0, 0.0], signal.SIGINT), ([0.0, 2.0], signal.SIGTERM),
                           ([1.0, 1.0], signal.SIGTERM)]:
        interrupt.agree(summed)
        assert interrupt.agreed == agreed
        if agreed is not None:
            assert interrupt.status == 128 + agreed
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        interrupt = Interrupt()
        with interrupt:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            assert interrupt.received is None
            signal.raise_signal(signal.SIGTERM)
            assert interrupt.received == signal.SIGTERM and interrupt.flags() == [0.0, 1.0]
            signal.raise_signal(signal.SIGTERM)  # torchrun's and the scheduler's, a moment apart: still stopping
            assert interrupt.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
    finally:
        signal.signal(signal.SIGINT, before[signal.SIGINT])
    assert said[1:] == ["SIGTERM: stopping after this step and saving a checkpoint"]


@pytest.mark.parametrize("extra,more", [({}, ""),
                                        ({"param_dtype": "bfloat16", "master_weights": True}, " and 1 more tensor"),
                                        ({"ema_window": 0.5}, " and 1 more tensor")])
def test_weights_that_are_not_finite_are_never_saved(inputs, tmp_path, monkeypatch, extra, more):
    """A step whose loss (computed before it) is finite can still leave weights that are not: here the
    optimizer's step is made to blow one weight up at step 3 (with --master-weights, its float32
    master, which the step rounds into the bf16 weight; with a weight average, which takes it in, the
    average too: 4 steps average over a window of 2 at most). The run stops before anything is saved,
    and the checkpoint of step 2 stays as it was."""
    real_make_optimizer = minqr.training.loop.make_optimizer

    def blowing_up(model, config, device, **options):
        optimizer = real_make_optimizer(model, config, device, **options)
        head = optimizer.param_groups[2]["params"][0]  # the head's weight, or its master

        def before_step(optimizer, args, kwargs):
            if optimizer.state[head].get("step") == 2:
                with torch.no_grad():
                    head[0, 0] = float("inf")

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    monkeypatch.setattr(minqr.training.loop, "make_optimizer", blowing_up)
    out = tmp_path / "run"
    with pytest.raises(MinqrError) as stopped:
        train(TrainConfig(**tiny_options(inputs, out, max_steps=4, save_every=1, **extra)), progress=False)
    assert str(stopped.value) == (
        f"training diverged at step 3: the weights are not finite after the optimizer step (score.weight{more}); "
        f"stopped. The last good checkpoint, of step 2, stays in {out / 'checkpoint'}. Lower --lr (now 0.003) "
        "and train again")
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 2
    assert not (out / "model.safetensors").exists()


def test_an_optimizer_moment_that_is_not_finite_stops_the_run(inputs, tmp_path, monkeypatch):
    """AdamW's second moment can overflow while every weight stays finite (a huge loss weight, no
    gradient clipping): the weight then stops moving, and a checkpoint holding the moment could not
    be resumed. The run stops as diverged, and the checkpoint of step 2 stays."""
    real_make_optimizer = minqr.training.loop.make_optimizer

    def overflowing(model, config, device, **options):
        optimizer = real_make_optimizer(model, config, device, **options)
        head = optimizer.param_groups[2]["params"][0]

        def after_step(optimizer, args, kwargs):
            if optimizer.state[head].get("step") == 3:
                optimizer.state[head]["exp_avg_sq"][0, 0] = float("inf")

        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(minqr.training.loop, "make_optimizer", overflowing)
    out = tmp_path / "run"
    with pytest.raises(MinqrError) as stopped:
        train(TrainConfig(**tiny_options(inputs, out, max_steps=4, save_every=1)), progress=False)
    assert str(stopped.value).startswith(
        "training diverged at step 3: the weights are not finite after the optimizer step (the optimizer's exp_avg_sq "
        f"of score.weight); stopped. The last good checkpoint, of step 2, stays in {out / 'checkpoint'}.")
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 2


def test_outputs_that_are_not_finite_stop_the_run(inputs, tmp_path, monkeypatch):
    """A head output of inf with finite weights (an overflow in the backbone under half precision,
    say): σ saturates, so the loss and the gradients stay finite and would train on silently. The
    run stops at that step, and the checkpoint before it stays."""
    real_pair_states, calls = RewardModel.pair_states, []

    def overflowing(self, batch):
        hidden, pooled_chosen, pooled_rejected, r_chosen, r_rejected = real_pair_states(self, batch)
        calls.append(1)
        if len(calls) == 3:  # the third step's forward
            r_chosen = r_chosen.clone()
            r_chosen[0, 0] = float("inf")
        return hidden, pooled_chosen, pooled_rejected, r_chosen, r_rejected

    monkeypatch.setattr(RewardModel, "pair_states", overflowing)
    out = tmp_path / "run"
    with pytest.raises(MinqrError) as stopped:
        train(TrainConfig(**tiny_options(inputs, out, max_steps=4, save_every=1, eval_every=0)), progress=False)
    assert str(stopped.value) == (
        "training diverged at step 3: the head's outputs are not finite (1 of the step's responses); stopped. "
        f"The last good checkpoint, of step 2, stays in {out / 'checkpoint'}. Lower --lr (now 0.003) and train again")
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 2


def test_cheap_checks_come_before_the_data_is_read(inputs, tmp_path):
    """A --max-length the model cannot take is reported from the model's config, before a data
    file is read (this one would fail at its first line)."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text("not json\n")
    result = CliRunner().invoke(TRAIN, as_argv(tiny_options(inputs, tmp_path / "run", data=str(broken),
                                                                 max_length=500)))
    assert result.exit_code == 1
    assert result.output == "Error: --max-length 500 is more than the model's 128 positions: lower it\n"


def test_every_missing_input_is_named_in_one_message(tmp_path, offline_hub):
    result = CliRunner().invoke(TRAIN, ["--model", "gpt2", "--data", "hh-rlhf:helpful-base",
                                             "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == "Error: 3 inputs cannot be had:"
    assert lines[1].startswith("  --model: model 'gpt2' (not a local folder) is not in the Hugging Face cache")
    assert lines[2].startswith("  --data: hh-rlhf:helpful-base (train) is not in the Hugging Face cache")
    assert lines[3].startswith("  --data (its test split): hh-rlhf:helpful-base (test) is not in the Hugging Face")


def test_the_plan_and_heavy_truncation_are_said_before_training(inputs, tmp_path):
    result = CliRunner().invoke(TRAIN, as_argv(tiny_options(inputs, tmp_path / "run", max_length=4,
                                                                 max_steps=2)))
    assert result.exit_code == 0, result.output
    assert ("plan: 2 steps of 8 pairs (0.40 epochs of 40 pairs); GPT-2 of 0.0M parameters + 0.0M of the "
            "response-bag layer (training only); head of 20 outputs trained by mixture; on cpu x 1 process") in result.output
    assert ("train: 40 pairs (100%) cut from the left to --max-length 4. Warning: most texts lose their beginning, "
            "and what a response answers may be cut away; raise --max-length if the model's positions allow") in result.output


def test_a_lone_surrogate_is_bad_data_with_its_line(inputs, tmp_path):
    """Valid JSON holding what no tokenizer takes: an error naming the line, skipped with --skip-bad."""
    data = tmp_path / "train.jsonl"
    lines = Path(inputs["data"]).read_text().splitlines()
    data.write_text("\n".join(lines[:4] + [SURROGATE_LINE] + lines[4:]) + "\n")
    argv = as_argv(tiny_options({**inputs, "data": str(data)}, tmp_path / "run", max_steps=2))
    result = CliRunner().invoke(TRAIN, argv)
    assert result.exit_code == 1 and result.output == surrogate_error(data, 5)
    result = CliRunner().invoke(TRAIN, argv + ["--skip-bad"])
    assert result.exit_code == 0, result.output
    assert f"train: {len(lines)} pairs from {data}; dropped 0 identical, skipped 0 malformed lines and 1 with bad " \
           f"fields (first: {surrogate_error(data, 5)[7:].partition('. Fix')[0]})" in result.output


def test_a_damaged_backbone_is_one_line_that_names_the_file(inputs, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(inputs["model"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # the last byte lost in a copy
    result = CliRunner().invoke(TRAIN, as_argv(tiny_options({**inputs, "model": str(model)}, tmp_path / "run")))
    assert result.exit_code == 1
    assert result.output.endswith(f"Error: {weights}: cut short at {weights.stat().st_size:,} bytes: 1 of its 28 tensors end "
                             f"beyond that, the first transformer.wte.weight; {DAMAGED}\n")


# ---- a run and what it leaves ----------------------------------------------------------------

@pytest.mark.parametrize("head", ["scalar", "quantile"])
def test_training_run_writes_a_reward_model_that_learnt(inputs, tmp_path, head):
    out = tmp_path / head
    options = tiny_options(inputs, out, head=head, max_steps=20, eval_every=10, save_every=10)
    result = CliRunner().invoke(TRAIN, as_argv(options))
    assert result.exit_code == 0, result.output
    assert "held-out pair accuracy" in result.output and str(out) in result.output

    for name in ["config.json", "model.safetensors", "tokenizer.json", "training_args.json", "metrics.jsonl",
                 "curves.png", "checkpoint/state.pt", "checkpoint/config.json"]:
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21)) and all(set(r) == TRAIN_KEYS for r in steps)
    assert [r["step"] for r in evals] == [10, 20] and all(set(r) == EVAL_KEYS for r in evals)
    losses = [r["loss"] for r in steps]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    # warmup (2 steps) up to the peak, then cosine decay towards 0
    lrs = [r["lr"] for r in steps]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(options["lr"]) and all(np.diff(lrs[2:]) < 0)
    assert lrs[-1] < 0.02 * options["lr"]

    # The saved model is the trained one: scoring the held-out pairs afresh, one text at a time,
    # gives the accuracy and reward statistics of the last evaluation.
    model = RewardModel.from_pretrained(out)
    assert model.head_config.head == head and model.num_quantiles == (1 if head == "scalar" else 20)
    tokenizer = load_tokenizer(out)
    chosen, rejected = score_pairs(model, tokenizer, options["eval_data"], options["max_length"])
    mu_chosen, mu_rejected = chosen.mean(-1), rejected.mean(-1)
    rewards = np.concatenate([mu_chosen, mu_rejected])
    final = evals[-1]
    assert final["eval_accuracy"] == pytest.approx(np.mean(mu_chosen > mu_rejected), abs=1e-9)
    assert final["eval_accuracy"] > 0.8
    assert final["eval_reward_mean"] == pytest.approx(rewards.mean(), abs=1e-5)
    assert final["eval_reward_std"] == pytest.approx(rewards.std(), abs=1e-5)
    assert final["eval_margin"] == pytest.approx(np.mean(mu_chosen - mu_rejected), abs=1e-5)
    saved = json.loads((out / "config.json").read_text())["minqr"]
    assert saved["reward_mean"] == final["eval_reward_mean"] and saved["reward_std"] == final["eval_reward_std"]
    args = json.loads((out / "training_args.json").read_text())
    assert args["head"] == head and args["lr"] == options["lr"] and args["total_steps"] == 20


def score_pairs(model, tokenizer, path, max_length):
    """[P, N] rewards of the chosen and the rejected texts, each text run alone (no padding)."""
    chosen, rejected = [], []
    with torch.no_grad():
        for line in Path(path).read_text().splitlines():
            pair = json.loads(line)
            for text, scores in ((pair["chosen"], chosen), (pair["rejected"], rejected)):
                ids = torch.tensor([tokenizer.encode(text)[-max_length:]])
                scores.append(model(ids)[0].double().numpy())
    return np.array(chosen), np.array(rejected)


# ---- the objective of a step, written out --------------------------------------------------

def quantile_loss_float64(q_c: np.ndarray, q_r: np.ndarray, kappa: float, lam: float, margin: float) -> np.ndarray:
    """The paper loss (docs/design.md#paper-loss) for one pair at a time, in float64 loops: [N], [N] -> scalar."""
    n = len(q_c)
    tau = (2 * np.arange(n) + 1) / (2 * n)
    pair_term = np.logaddexp(0.0, -(q_c.mean() - q_r.mean()))

    def rho(u, t):
        huber = 0.5 * u * u if abs(u) <= kappa else kappa * (abs(u) - 0.5 * kappa)
        return abs(t - (u < 0)) * huber / kappa

    quantile_term = 0.5 * sum(rho((q_r[j] + margin) - q_c[i], tau[i]) / n + rho((q_c[j] - margin) - q_r[i], tau[i]) / n
                              for i in range(n) for j in range(n))
    return pair_term + lam * quantile_term


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def objective_float64(config, q_c: np.ndarray, q_r: np.ndarray) -> float:
    """minqr/objectives/'s objectives for one pair, written out in float64."""
    if config.objective == "paper":
        return quantile_loss_float64(q_c, q_r, config.kappa, config.lam, config.margin)
    if config.objective in ("bradley_terry", "mixture"):  # bradley_terry: the mixture of one kind
        return -math.log(np.mean([sigmoid(a - b) for a, b in zip(q_c, q_r)]))
    assert config.objective == "independent"
    return -math.log(np.mean([sigmoid(a - b) for a in q_c for b in q_r]))


def bag_loss_float64(layer, pooled: torch.Tensor, response: list) -> float:
    """The response bag-of-words auxiliary for one response: the mean logistic loss over the tokens
    the response holds plus the mean over all the others."""
    logits = (layer.weight.double() @ pooled.double() + layer.bias.double()).numpy()
    present = np.zeros(len(logits), dtype=bool)
    present[response] = True
    softplus = np.logaddexp(0.0, logits)
    return float(np.mean(softplus[present] - logits[present]) + np.mean(softplus[~present]))


@pytest.mark.parametrize("overrides", [
    dict(head="scalar"),
    dict(head="quantile", num_quantiles=5, objective="paper", kappa=0.5, margin=0.3, grad_accum=2),
    dict(head="quantile", center_coef=0.3, lm_coef=0.5, grad_accum=4, shared_prefix=False),
    dict(head="quantile", num_quantiles=3, objective="independent", bag_coef=2.0),
    dict(head="quantile", num_quantiles=7, bag_coef=0.5, shared_prefix=False, grad_accum=2),
])
def test_first_step_loss_is_the_objective(inputs, tmp_path, overrides):
    """The logged loss of step 1 is the objective of the module docstring, computed here from the
    untrained model with one text at a time: the whole training set is one batch (its mean does
    not depend on how the trainer orders, packs and splits the pairs)."""
    options = tiny_options(inputs, tmp_path / "run", batch_size=40, max_steps=1, **overrides)
    config = TrainConfig(**options)
    train(config, progress=False)
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]

    torch.manual_seed(config.seed)  # the trainer initialises the head (and the bag layer) right after seeding
    model = RewardModel.from_backbone(config.model, head=config.head, num_quantiles=config.num_quantiles,
                                      objective=config.objective, kappa=config.kappa, lam=config.lam,
                                      margin=config.margin)
    if config.bag_coef:
        ResponseBag.attach(model)
    tokenizer = load_tokenizer(config.tokenizer)
    pair_losses, centring, lm_token_losses, right = [], [], [], 0
    with torch.no_grad():
        for line in Path(config.data).read_text().splitlines():
            pair = json.loads(line)
            c, r = (tokenizer.encode(pair[side])[-config.max_length:] for side in ("chosen", "rejected"))
            hidden_c = model.transformer(torch.tensor([c]))[0]  # [len(c), n_embd]
            hidden_r = model.transformer(torch.tensor([r]))[0]
            q_c = model.score(hidden_c[-1]).double().numpy()
            q_r = model(torch.tensor([r]))[0].double().numpy()
            pair_losses.append(objective_float64(config, q_c, q_r))
            if config.bag_coef:
                for text, ids, hidden in ((pair["chosen"], c, hidden_c), (pair["rejected"], r, hidden_r)):
                    # the response: what follows the last "\n\nAssistant:" (a clean token boundary here)
                    start = len(tokenizer.encode(text[: text.rindex("\n\nAssistant:") + len("\n\nAssistant:")]))
                    pair_losses[-1] += config.bag_coef * bag_loss_float64(model.response_bag, hidden[-1], ids[start:])
            centring.append((q_c.mean() + q_r.mean()) ** 2)
            right += q_c.mean() > q_r.mean()
            # the chosen response: what follows its last "\n\nAssistant:" (a clean token boundary here),
            # each token predicted from the tokens before it
            text = pair["chosen"]
            start = len(tokenizer.encode(text[: text.rindex("\n\nAssistant:") + len("\n\nAssistant:")]))
            for t in range(max(start, 1), len(c)):
                logits = model.transformer.lm_logits(hidden_c[t - 1]).double()
                lm_token_losses.append(float(-F.log_softmax(logits, -1)[c[t]]))
    expected = np.mean(pair_losses) + config.center_coef * np.mean(centring)
    if config.lm_coef:
        expected += config.lm_coef * np.mean(lm_token_losses)
    assert logged["loss"] == pytest.approx(expected, rel=2e-5)
    assert logged["accuracy"] == right / 40


def test_bfloat16_autocast_trains_and_keeps_float32_weights(inputs, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**tiny_options(inputs, out, dtype="bfloat16", max_steps=12)), progress=False)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert all(math.isfinite(v) for v in losses) and np.mean(losses[-3:]) < np.mean(losses[:3])
    model = RewardModel.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ---- real data -------------------------------------------------------------------------------

@pytest.mark.slow  # real pairs through the real GPT-2 tokenizer, a model over 50,257 ids: about 3 s of CPU each
@pytest.mark.parametrize("head", ["scalar", "quantile"])
def test_training_on_real_hh_pairs(hh_pairs_path, gpt2_tokenizer_dir, tmp_path, head):
    """48 real HH-RLHF pairs, the real GPT-2 tokenizer, a tiny model over its 50,257 ids: four
    passes over the pairs bring the training loss down."""
    data = tmp_path / "hh.jsonl"
    with gzip.open(hh_pairs_path, "rt") as lines:
        data.write_text("".join(islice(lines, 48)))
    write_tiny_checkpoint(tmp_path / "model", tiny_config(vocab_size=50257, n_positions=128))
    out = tmp_path / "run"
    summary = train(TrainConfig(model=str(tmp_path / "model"), tokenizer=str(gpt2_tokenizer_dir), data=str(data),
                                out=str(out), head=head, max_length=128, batch_size=8, epochs=4, lr=2e-3,
                                eval_every=0, save_every=0), progress=False)
    assert summary.steps == 24 and summary.final_eval is None  # a file as --data: no held-out split
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert np.mean(losses[-6:]) < np.mean(losses[:6]), losses
    assert all(math.isfinite(v) for v in losses)
    assert (out / "model.safetensors").is_file() and (out / "checkpoint" / "state.pt").is_file()
    assert "reward_mean" not in json.loads((out / "config.json").read_text())["minqr"]


# ---- divergence ------------------------------------------------------------------------------

def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(inputs, tmp_path):
    out = tmp_path / "run"
    # an absurd learning rate: the first update throws the weights to ~1e30, the next loss is NaN
    options = tiny_options(inputs, out, lr=1e30, head_lr_scale=1.0, warmup=0.0, save_every=1)
    result = CliRunner().invoke(TRAIN, as_argv(options))
    assert result.exit_code == 1
    assert "diverged at step 2" in result.output and "nan" in result.output
    assert "checkpoint, of step 1" in result.output and "--lr" in result.output
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 1
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert all(torch.isfinite(t).all() for t in state["model"].values())


# ---- the offline demo ------------------------------------------------------------------------

@pytest.mark.slow  # the whole demo: 600 steps
def test_demo_runs_offline_and_reaches_80_percent(tmp_path):
    """The whole default demo of the quantile head (10-30 s): held-out accuracy of at least 0.8,
    printed beside the task's Bayes-optimal accuracy."""
    out = tmp_path / "demo" / "quantile"
    result = CliRunner().invoke(TRAIN, ["--demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = tmp_path / "demo" / "demo-data"
    bayes = json.loads((data / "task.json").read_text())["bayes_accuracy"]
    assert f"Bayes-optimal accuracy of the synthetic task is {bayes:.3f}" in result.output
    args = json.loads((out / "training_args.json").read_text())
    assert args["model"] == str(data / "model") and args["eval_data"] == str(data / "test.jsonl")
    final = read_metrics(out / "metrics.jsonl")[-1]
    assert final["step"] == args["max_steps"] and 0.8 <= final["eval_accuracy"] <= bayes + 0.03
    # a second demo reuses the task, takes the options given over the demo's, and replaces its run
    # only when told to
    stamp = (data / "train.jsonl").stat().st_mtime_ns
    again = ["--demo", "--out", str(out), "--max-steps", "2", "--eval-every", "0"]
    result = CliRunner().invoke(TRAIN, again)
    assert result.exit_code == 1 and "already holds a run with a checkpoint" in result.output
    result = CliRunner().invoke(TRAIN, [*again, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (data / "train.jsonl").stat().st_mtime_ns == stamp
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 2]  # 2 steps, the final evaluation


def test_the_demo_never_writes_into_a_folder_named_for_data(tmp_path):
    """--demo --data DIR/mine.jsonl where DIR holds no synthetic task: refused, and every file in DIR
    stays (the demo makes its task only in its own folder, OUT/../demo-data)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "mine.jsonl").write_text('{"chosen": "a", "rejected": "b"}\n')
    (folder / "notes.txt").write_text("mine")
    out = tmp_path / "runs" / "run"
    result = CliRunner().invoke(TRAIN, ["--demo", "--data", str(folder / "mine.jsonl"), "--out", str(out)])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: --demo --data {folder / 'mine.jsonl'}: its folder holds no synthetic task (task.json), and --demo "
        "makes its task only in a folder of its own, never in one named for data. Make a task there with "
        f"`minqr synthetic --out {folder}`, or leave out --data (the demo then makes its task in "
        f"{tmp_path / 'runs' / 'demo-data'})\n")
    assert sorted(p.name for p in folder.iterdir()) == ["mine.jsonl", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"
    typo = CliRunner().invoke(TRAIN, ["--demo", "--data", str(folder / "mnie.jsonl"), "--out", str(out)])
    assert typo.exit_code == 1 and typo.output.startswith(
        f"Error: --demo --data {folder / 'mnie.jsonl'}: its folder holds no synthetic task (task.json) (mnie.jsonl "
        "does not exist there either), and --demo"), typo.output


def test_a_demo_whose_task_another_demo_is_making_is_told_to_wait(tmp_path):
    """Two demo runs beside each other share OUT/../demo-data: while one makes it, the other is told
    who makes it (it failed with a message about an --out the user never gave)."""
    from minqr.lock import hold_output

    out = tmp_path / "runs" / "b"
    with hold_output(tmp_path / "runs" / "demo-data", "the demo's task folder"):
        result = CliRunner().invoke(TRAIN, ["--demo", "--max-steps", "2", "--out", str(out)])
    assert result.exit_code == 1 and result.output.startswith(
        f"Error: the demo's task folder {tmp_path / 'runs' / 'demo-data'} is in use by pid "), result.output
    assert not (tmp_path / "runs" / "demo-data").exists()


def test_the_demo_takes_a_task_in_the_current_folder(tmp_path, monkeypatch):
    """--data train.jsonl, a bare name: the task in the current folder (it used to be refused as
    naming no folder; where there is no task, preparing the demo's data refuses, above)."""
    monkeypatch.chdir(tmp_path)
    assert TrainConfig.from_options(demo=True, data="train.jsonl").data == "train.jsonl"


@pytest.mark.parametrize("content, why", [('{"variant": "demo"}', "it has no bayes_accuracy, a number"),
                                          ("{not json", "Expecting property name")])
def test_the_demo_refuses_a_task_json_it_cannot_read(tmp_path, content, why):
    """A folder whose task.json is not a synthetic task's (a candidates folder's has no Bayes
    accuracy, a damaged one is no JSON): one line naming the file, no traceback."""
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"chosen": "a", "rejected": "b"}\n')
    (folder / "task.json").write_text(content)
    result = CliRunner().invoke(TRAIN, ["--demo", "--data", str(folder / "train.jsonl"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and result.output.startswith(
        f"Error: --demo: {folder / 'task.json'} is not the task.json of a synthetic task ("), result.output
    assert why in result.output and result.output.endswith(
        f"make the task again with `minqr synthetic --out {folder}`, or leave out --data\n")


def test_a_demo_does_not_replace_a_run_without_overwrite(tmp_path):
    """A repeat of a run into the same --out is refused, with --demo as without it."""
    inputs = write_run_inputs(tmp_path / "inputs")
    out = tmp_path / "run"
    assert CliRunner().invoke(TRAIN, as_argv(tiny_options(inputs, out, max_steps=2))).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    task = make_synthetic_task(tmp_path / "task", num_train=40, num_test=30)
    result = CliRunner().invoke(TRAIN, ["--demo", "--data", str(task / "train.jsonl"), "--out", str(out),
                                             "--max-steps", "3"])
    assert result.exit_code == 1
    assert result.output == (f"Error: --out {out} already holds a run with a checkpoint: add --resume to continue "
                             "it, --overwrite to start afresh, or choose another --out\n")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("data", [None, "hh-rlhf:harmless-base"])
def test_a_demo_config_without_the_demo_data_is_refused(tmp_path, data):
    """TrainConfig(demo=True) keeps the field defaults (hh-rlhf:helpful-base as the data), a hub
    data set, not a synthetic task. from_options fills in the demo's."""
    given = {"demo": True} if data is None else {"demo": True, "data": data}
    with pytest.raises(MinqrError, match=r"TrainConfig\.from_options\(demo=True"):
        TrainConfig(**given)
    config = TrainConfig.from_options(demo=True, out=str(tmp_path / "demo" / "quantile"))
    assert config.data == str(tmp_path / "demo" / "demo-data" / "train.jsonl")


def test_dropout_option_sets_the_backbones_dropout(tmp_path):
    """--dropout 0 on a checkpoint with dropout 0.1 trains exactly as the same weights saved with none
    (TRL's choice); --dropout 0.1 on that one changes the run; the saved config records what was used."""
    with_dropout = write_run_inputs(tmp_path / "with", dropout=0.1)
    without = write_run_inputs(tmp_path / "without", dropout=0.0)
    runs = {"off": (with_dropout, {"dropout": 0.0}), "plain": (without, {}), "on": (without, {"dropout": 0.1})}
    weights, configs = {}, {}
    for name, (inputs, extra) in runs.items():
        train(TrainConfig(**tiny_options(inputs, tmp_path / name, max_steps=3, **extra)))
        weights[name] = (tmp_path / name / "model.safetensors").read_bytes()
        configs[name] = json.loads((tmp_path / name / "config.json").read_text())
    assert weights["off"] == weights["plain"] and weights["on"] != weights["plain"]
    for name, p in (("off", 0.0), ("plain", 0.0), ("on", 0.1)):
        assert [configs[name][k] for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")] == [p, p, p], name


def test_tensorboard_logs_what_metrics_jsonl_holds(inputs, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="tensorboard, the optional extra minqr[tensorboard], is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = CliRunner().invoke(TRAIN, as_argv(tiny_options(inputs, out, max_steps=6, eval_every=3,
                                                                 report_to="tensorboard")))
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    records = read_metrics(out / "metrics.jsonl")
    expected = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                tag = "eval/" + key[5:] if key.startswith("eval_") else "train/" + key
                expected.setdefault(tag, []).append((record["step"], value))
    assert set(events.Tags()["scalars"]) == set(expected) and "eval/accuracy" in expected
    for tag, points in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [s for s, _ in points], tag
        np.testing.assert_allclose([v for _, v in logged], [v for _, v in points], rtol=1e-6, err_msg=tag)

    monkeypatch.setattr(minqr.training.metrics.importlib.util, "find_spec", lambda name: None)
    result = CliRunner().invoke(TRAIN, as_argv(tiny_options(inputs, tmp_path / "other", report_to="tensorboard")))
    assert result.exit_code == 1 and result.output == (
        "Error: --report-to tensorboard needs the tensorboard package, an optional extra of minqr: "
        "pip install 'minqr[tensorboard]' (or pip install tensorboard)\n")


def test_grad_checkpoint_trains_the_same_weights_with_less_saved_for_backward(tmp_path):
    """Activation checkpointing recomputes each block in the backward, dropout masks included: the
    same weights, bit for bit; and less is kept for the backward (counted with saved-tensor hooks)."""
    inputs = write_run_inputs(tmp_path / "inputs", dropout=0.1)
    for name, extra in (("plain", {}), ("checkpointed", {"grad_checkpoint": True})):
        train(TrainConfig(**tiny_options(inputs, tmp_path / name, max_steps=3, **extra)), progress=False)
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == \
        (tmp_path / "checkpointed" / "model.safetensors").read_bytes()

    model = RewardModel.from_pretrained(tmp_path / "plain").train()
    ids = torch.randint(0, model.transformer.config.vocab_size, (4, 64))

    def saved_bytes(checkpointed: bool) -> int:
        model.transformer.gradient_checkpointing = checkpointed
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids).sum().backward()
        return total
    plain, checkpointed = saved_bytes(False), saved_bytes(True)
    assert checkpointed < 0.7 * plain, (checkpointed, plain)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_training_a_llama_family_backbone(tmp_path, model_type):
    """tools/train.py --model takes a Llama-family folder: the run's saved model loads in transformers
    as its *ForSequenceClassification with minqr's outputs; checkpointing gives the same weights."""
    from factories import random_hf_llama

    inputs = write_run_inputs(tmp_path / "inputs")
    eos = load_tokenizer(inputs["tokenizer"]).eos_id
    random_hf_llama(model_type, max_position_embeddings=128, num_key_value_heads=2, eos_token_id=eos,
                    pad_token_id=eos, bos_token_id=eos).save_pretrained(tmp_path / "llama")
    options = tiny_options({**inputs, "model": str(tmp_path / "llama")}, tmp_path / "run", max_steps=3)
    result = CliRunner().invoke(TRAIN, as_argv(options))
    assert result.exit_code == 0, result.output
    assert f"{model_type} of 0.0M parameters" in result.output
    result = CliRunner().invoke(TRAIN, as_argv({**options, "out": str(tmp_path / "again"), "grad_checkpoint": True}))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()

    import transformers
    tokenizer = load_tokenizer(inputs["tokenizer"])
    texts = [QUESTIONS[0] + LIKED[0], QUESTIONS[1], DISLIKED[2]]
    tokens = tokenizer.encode_batch(texts)
    ids = torch.full((len(tokens), max(map(len, tokens))), eos)
    mask = torch.zeros_like(ids)
    for row, t in enumerate(tokens):
        ids[row, : len(t)], mask[row, : len(t)] = torch.tensor(t), 1
    with torch.no_grad():
        ours = RewardModel.from_pretrained(tmp_path / "run")(ids, mask)
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run").eval()
        theirs = hf(ids, attention_mask=mask).logits
    assert type(hf).__name__.endswith("ForSequenceClassification") and theirs.shape == (3, 21)
    with_mean = torch.cat([ours.mean(-1, keepdim=True), ours], dim=1)  # the mean row first
    torch.testing.assert_close(theirs, with_mean, atol=1e-4, rtol=1e-4)

    # --dropout is the family's attention dropout, recorded in the saved config
    result = CliRunner().invoke(TRAIN, as_argv({**options, "out": str(tmp_path / "drop"), "dropout": 0.1}))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "drop" / "config.json").read_text())["attention_dropout"] == 0.1
    assert (tmp_path / "drop" / "model.safetensors").read_bytes() != (tmp_path / "run" / "model.safetensors").read_bytes()


def test_bfloat16_parameters(inputs, tmp_path):
    """--param-dtype bfloat16 keeps the weights, gradients and AdamW's moments in bfloat16 (half the
    memory); the first step's loss is the float32 run's to bfloat16 rounding, and the saved model is
    bfloat16."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        train(TrainConfig(**tiny_options(inputs, out, max_steps=2, param_dtype=dtype)), progress=False)
        runs[dtype] = read_metrics(out / "metrics.jsonl")[0]["loss"]
        state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
        moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
        assert {m.dtype for m in moments} == {getattr(torch, dtype)}
        weights = load_file(out / "model.safetensors")
        assert {t.dtype for t in weights.values()} == {getattr(torch, dtype)}
    assert runs["bfloat16"] == pytest.approx(runs["float32"], rel=2e-2)
    assert runs["bfloat16"] != runs["float32"]  # it did compute in bfloat16


def test_deep_json_is_a_bad_line_and_a_mistyped_model_path_names_its_folder(inputs, tmp_path, monkeypatch):
    lines = Path(inputs["data"]).read_text().splitlines()
    deep = tmp_path / "deep.jsonl"
    deep.write_text("\n".join(lines[:4] + ['{"chosen": ' + "[" * 100_000 + "]" * 100_000 + "}"] + lines[4:]) + "\n")
    options = tiny_options(inputs, tmp_path / "run", data=str(deep), max_steps=2)
    result = CliRunner().invoke(TRAIN, as_argv(options))
    assert result.exit_code == 1, result.output
    assert f"Error: {deep}:5: malformed JSON (nested deeper than 100 levels at column 111)" in result.output
    result = CliRunner().invoke(TRAIN, as_argv(options) + ["--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "40 pairs from" in result.output and "skipped 1 malformed lines" in result.output
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    result = CliRunner().invoke(TRAIN, as_argv({**options, "model": "runs/dmeo/quantile", "out": "new"}))
    assert result.exit_code == 1 and result.output.startswith(
        "Error: --model: no such model folder: 'runs/dmeo/quantile' (runs/dmeo does not exist;"), result.output


def test_rendering_is_said_once_done_and_a_refusing_template_is_blamed(inputs, tmp_path):
    """"N conversations rendered with the tokenizer's chat template" comes after the rendering: a
    template that fails on the first pair stops the run before that line is printed."""
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(inputs["tokenizer"], tokenizer)
    (tokenizer / "chat_template.jinja").write_text(
        "{% for message in messages %}{{ message['content'] }}{% endfor %}{{ 1 / (messages | length - 2) }}")
    turns = [{"role": "user", "content": "Hi"}]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"chosen": turns + [{"role": "assistant", "content": f"Hello {k}."}],
                                        "rejected": turns + [{"role": "assistant", "content": "Go."}]}) + "\n"
                            for k in range(16)))
    options = tiny_options(inputs, tmp_path / "run", tokenizer=str(tokenizer), data=str(data), eval_data=str(data),
                           max_steps=1)
    result = CliRunner().invoke(TRAIN, as_argv(options))
    assert result.exit_code == 1
    assert "rendered with" not in result.output
    assert f"Error: {data}:1: the chat template of {tokenizer} refuses this conversation (ZeroDivisionError: " \
           "division by zero). The template decides this" in result.output, result.output
    (tokenizer / "chat_template.jinja").write_text("{% for message in messages %}{{ message['content'] }}{% endfor %}")
    result = CliRunner().invoke(TRAIN, as_argv(options))
    assert result.exit_code == 0, result.output
    assert "train: 16 conversations rendered with the tokenizer's chat template" in result.output


@pytest.mark.parametrize("cause", ["bag_coef", "margin"])
def test_a_divergence_names_a_huge_weight_or_margin_rather_than_the_learning_rate(inputs, tmp_path, cause):
    options = tiny_options(inputs, tmp_path / "run", max_steps=4, save_every=100, head="scalar")
    if cause == "bag_coef":
        options["bag_coef"], expected = 1e38, "The likely cause: --bag-coef 1e+38, far too large: lower it"
    else:
        data = tmp_path / "margins.jsonl"
        records = [json.loads(line) for line in Path(inputs["data"]).read_text().splitlines()]
        data.write_text("".join(json.dumps({**r, "margin": 1e38 if k % 2 else 1.0}) + "\n"
                                for k, r in enumerate(records)))
        options["data"], options["eval_data"] = str(data), str(data)
        expected = "The likely cause: the data's pair margins (up to 1e+38; rewards are of order 1), far too large"
    result = CliRunner().invoke(TRAIN, as_argv(options))
    assert result.exit_code == 1, result.output
    assert "training diverged at step" in result.output and expected in result.output, result.output
    assert "Lower --lr" not in result.output
