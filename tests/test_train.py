"""Training end to end (minqr/train.py, tools/train.py): the command line, the files a run leaves,
the objective of a step against the formula written out, the real HH-RLHF pairs, the NaN stop and
the offline demo. Resuming is in test_resume.py, torchrun in test_distributed.py.

Every run uses a tiny random GPT-2 (2 layers, 32 wide) written into a temporary folder, so a run
takes a second or two.
"""
import gzip
import importlib.util
import json
import math
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from factories import tiny_config, write_tiny_checkpoint, write_tiny_tokenizer
from test_data import SURROGATE_LINE, surrogate_error
from minqr.checkpoint import DAMAGED
from minqr.errors import MinqrError
from minqr.metrics import read_metrics
from minqr.reward import RewardModel
from minqr.tokenizer import load_tokenizer
from minqr.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("tokens_per_s", "pairs_per_s")
TRAIN_KEYS = {"step", "loss", "accuracy", "lr", *TIMING_KEYS}
EVAL_KEYS = {"step", "eval_loss", "eval_accuracy", "eval_reward_mean", "eval_reward_std", "eval_margin"}

QUESTIONS = ["What is the capital of France?", "How do I bake bread at home?",
             "Can you help me write a poem about the sea?", "Tell me something rude."]
LIKED = [" Of course! The capital of France is Paris.", " Sure, mix flour, water and yeast.",
         " Happy to help: waves roll in."]
DISLIKED = [" No.", " I'd rather not.", " Go away, fox."]


def load_cli():
    """tools/train.py's click command (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "tools" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


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
    result = CliRunner().invoke(load_cli(), ["--help"])
    assert result.exit_code == 0, result.output
    for option in ["--head", "--num-quantiles", "--kappa", "--lam", "--margin", "--center-coef", "--lm-coef",
                   "--model", "--data", "--eval-data", "--out", "--max-length", "--batch-size", "--grad-accum",
                   "--lr", "--weight-decay", "--warmup", "--epochs", "--max-steps", "--eval-every",
                   "--save-every", "--seed", "--device", "--dtype", "--compile", "--resume",
                   "--no-shared-prefix", "--skip-bad", "--demo"]:
        assert option in result.output, option


@pytest.mark.parametrize("argv, exit_code, words", [
    (["--head", "medium"], 2, ["--head", "medium"]),
    (["--lr", "-1"], 1, ["--lr"]),
    (["--lr", "nan"], 1, ["--lr"]),
    (["--warmup", "5"], 1, ["--warmup", "fraction"]),
    (["--head", "scalar", "--num-quantiles", "5"], 1, ["--num-quantiles", "scalar head"]),
    (["--kappa", "0"], 1, ["--kappa", "kappa=0"]),
    (["--batch-size", "30", "--grad-accum", "4"], 1, ["--batch-size 30", "--grad-accum 4"]),
    (["--max-length", "200"], 1, ["--max-length 200", "128 positions"]),
    (["--batch-size", "64"], 1, ["--batch-size 64", "40 training pairs"]),
    (["--data", "no/such/file.jsonl"], 1, ["no/such/file.jsonl"]),
])
def test_bad_options_are_named(inputs, tmp_path, argv, exit_code, words):
    result = CliRunner().invoke(load_cli(), as_argv(tiny_options(inputs, tmp_path / "run")) + argv)
    assert result.exit_code == exit_code, result.output
    for word in words:
        assert word in result.output


def test_an_out_folder_holding_a_run_needs_resume_or_overwrite(inputs, tmp_path):
    options = tiny_options(inputs, tmp_path / "run", max_steps=2)
    train(TrainConfig(**options), progress=False)
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train(TrainConfig(**options), progress=False)
    summary = train(TrainConfig(**options, overwrite=True), progress=False)
    assert summary.steps == 2 and len([r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]) == 2


def test_a_lone_surrogate_is_bad_data_with_its_line(inputs, tmp_path):
    """Valid JSON holding what no tokenizer takes: an error naming the line, skipped with --skip-bad."""
    data = tmp_path / "train.jsonl"
    lines = Path(inputs["data"]).read_text().splitlines()
    data.write_text("\n".join(lines[:4] + [SURROGATE_LINE] + lines[4:]) + "\n")
    argv = as_argv(tiny_options({**inputs, "data": str(data)}, tmp_path / "run", max_steps=2))
    result = CliRunner().invoke(load_cli(), argv)
    assert result.exit_code == 1 and result.output == surrogate_error(data, 5)
    result = CliRunner().invoke(load_cli(), argv + ["--skip-bad"])
    assert result.exit_code == 0, result.output
    assert f"train: {len(lines)} pairs from {data}; dropped 0 identical, skipped 0 malformed lines and 1 with bad " \
           f"fields (first: {surrogate_error(data, 5)[7:].partition('. Fix')[0]})" in result.output


def test_a_damaged_backbone_is_one_line_that_names_the_file(inputs, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(inputs["model"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # the last byte lost in a copy
    result = CliRunner().invoke(load_cli(), as_argv(tiny_options({**inputs, "model": str(model)}, tmp_path / "run")))
    assert result.exit_code == 1
    assert result.output.endswith(f"Error: {weights}: cut short at {weights.stat().st_size:,} bytes: 1 of its 28 tensors end "
                             f"beyond that, the first transformer.wte.weight; {DAMAGED}\n")


# ---- a run and what it leaves ----------------------------------------------------------------

@pytest.mark.parametrize("head", ["scalar", "quantile"])
def test_training_run_writes_a_reward_model_that_learnt(inputs, tmp_path, head):
    out = tmp_path / head
    options = tiny_options(inputs, out, head=head, max_steps=20, eval_every=10, save_every=10)
    result = CliRunner().invoke(load_cli(), as_argv(options))
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
    assert model.head_config.kind == head and model.num_quantiles == (1 if head == "scalar" else 10)
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
    """DESIGN.md's loss for one pair at a time, in float64 loops: [N], [N] -> scalar."""
    n = len(q_c)
    tau = (2 * np.arange(n) + 1) / (2 * n)
    pair_term = np.logaddexp(0.0, -(q_c.mean() - q_r.mean()))

    def rho(u, t):
        huber = 0.5 * u * u if abs(u) <= kappa else kappa * (abs(u) - 0.5 * kappa)
        return abs(t - (u < 0)) * huber / kappa

    quantile_term = 0.5 * sum(rho((q_r[j] + margin) - q_c[i], tau[i]) / n + rho((q_c[j] - margin) - q_r[i], tau[i]) / n
                              for i in range(n) for j in range(n))
    return pair_term + lam * quantile_term


@pytest.mark.parametrize("overrides", [
    dict(head="scalar"),
    dict(head="quantile", num_quantiles=5, kappa=0.5, margin=0.3, grad_accum=2),
    dict(head="quantile", center_coef=0.3, lm_coef=0.5, grad_accum=4, shared_prefix=False),
])
def test_first_step_loss_is_the_objective(inputs, tmp_path, overrides):
    """The logged loss of step 1 is the objective of the module docstring, computed here from the
    untrained model with one text at a time: the whole training set is one batch (its mean does
    not depend on how the trainer orders, packs and splits the pairs)."""
    options = tiny_options(inputs, tmp_path / "run", batch_size=40, max_steps=1, **overrides)
    config = TrainConfig(**options)
    train(config, progress=False)
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]

    torch.manual_seed(config.seed)  # the trainer initialises the head right after seeding
    model = RewardModel.from_backbone(config.model, head=config.head, num_quantiles=config.num_quantiles)
    tokenizer = load_tokenizer(config.tokenizer)
    pair_losses, centring, lm_token_losses, right = [], [], [], 0
    with torch.no_grad():
        for line in Path(config.data).read_text().splitlines():
            pair = json.loads(line)
            c, r = (tokenizer.encode(pair[side])[-config.max_length:] for side in ("chosen", "rejected"))
            hidden_c = model.transformer(torch.tensor([c]))[0]  # [len(c), n_embd]
            q_c = model.score(hidden_c[-1]).double().numpy()
            q_r = model(torch.tensor([r]))[0].double().numpy()
            pair_losses.append(quantile_loss_float64(q_c, q_r, config.kappa, config.lam, config.margin))
            centring.append((q_c.mean() + q_r.mean()) ** 2)
            right += q_c.mean() > q_r.mean()
            # the chosen response: the tokens after the prefix the two texts share (at least one token
            # of each text is its own), each predicted from the tokens before it
            shared = 0
            while shared < min(len(c), len(r)) - 1 and c[shared] == r[shared]:
                shared += 1
            for t in range(max(shared, 1), len(c)):
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
    options = tiny_options(inputs, out, lr=1e30, warmup=0.0, save_every=1)
    result = CliRunner().invoke(load_cli(), as_argv(options))
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
    result = CliRunner().invoke(load_cli(), ["--demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = tmp_path / "demo" / "demo-data"
    bayes = json.loads((data / "task.json").read_text())["bayes_accuracy"]
    assert f"Bayes-optimal accuracy of the synthetic task is {bayes:.3f}" in result.output
    args = json.loads((out / "training_args.json").read_text())
    assert args["model"] == str(data / "model") and args["eval_data"] == str(data / "test.jsonl")
    final = read_metrics(out / "metrics.jsonl")[-1]
    assert final["step"] == args["max_steps"] and 0.8 <= final["eval_accuracy"] <= bayes + 0.03
    # a second demo reuses the task, takes the options given over the demo's, and replaces its run
    stamp = (data / "train.jsonl").stat().st_mtime_ns
    result = CliRunner().invoke(load_cli(), ["--demo", "--out", str(out), "--max-steps", "2", "--eval-every", "0"])
    assert result.exit_code == 0, result.output
    assert (data / "train.jsonl").stat().st_mtime_ns == stamp
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 2]  # 2 steps, the final evaluation


@pytest.mark.parametrize("data", [None, "hh-rlhf:harmless-base", "train.jsonl"])
def test_a_demo_config_without_the_demo_data_is_refused(tmp_path, data):
    """TrainConfig(demo=True) keeps the field defaults (hh-rlhf:helpful-base as the data): the
    synthetic task would be written into the current folder. from_options fills in the demo's."""
    given = {"demo": True} if data is None else {"demo": True, "data": data}
    with pytest.raises(MinqrError, match=r"TrainConfig\.from_options\(demo=True"):
        TrainConfig(**given)
    config = TrainConfig.from_options(demo=True, out=str(tmp_path / "demo" / "quantile"))
    assert config.data == str(tmp_path / "demo" / "demo-data" / "train.jsonl")
