"""Training a reward model on preference pairs: the loop behind `tools/train.py`.

    config = TrainConfig(head="quantile", data="hh-rlhf:helpful-base", out="runs/quantile")
    summary = train(config)

One optimizer step sees `batch_size` pairs (the global batch: all processes and all gradient
accumulation steps together). The pairs of a step have similar lengths (length-grouped batches in
a seeded order, minqr/batching.py) and, by default, each pair runs as one shared-prefix row. The
objective of a step is the mean over its pairs of

    qr_pairwise_loss(q_c, q_r; κ, λ, m)                 the pairwise + quantile-Huber loss (loss.py)
    + center_coef · (μ_c + μ_r)²                        TRL's reward centring: keeps rewards near 0
    + lm_coef · (mean token cross-entropy of the chosen responses)     MOSS-RLHF's LM term

where μ is a response's expected reward, the mean of its quantiles. The scalar head is N = 1 and
λ = 0: the Bradley–Terry loss −log σ(r_c − r_r).

Under `torchrun` each process takes its slice of every global batch, DistributedDataParallel
averages the gradients, and the step is the one a single process computes on the whole batch:
every micro-batch's loss is a sum over its pairs divided by the global batch size (times the
number of processes, which DDP's averaging divides back out), so neither the slicing nor the
accumulation changes the arithmetic beyond float rounding. Only process 0 writes files.

The run folder (`--out`) ends up holding the trained reward model (config.json, model.safetensors,
tokenizer files: what `RewardModel.from_pretrained` and transformers'
AutoModelForSequenceClassification load), `training_args.json`, `metrics.jsonl`, `curves.png` and
`checkpoint/`, from which `--resume` continues an interrupted run to the weights an uninterrupted
one reaches (bit for bit on CPU; see minqr/checkpointing.py).
"""
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from minqr import hub
from minqr.atomic import atomic_file
from minqr.batching import IGNORE_INDEX, length_grouped_batches, tokenize_pairs
from minqr.checkpoint import load_gpt2
from minqr.checkpointing import DataPosition, capture_rng_state, find_checkpoint, load_checkpoint, \
    remove_checkpoints, restore_rng_state, save_checkpoint
from minqr.data import read_pairs_file, resolve_source
from minqr.device import DTYPES, autocast, autocast_dtype, resolve_device
from minqr.errors import MinqrError
from minqr.head import HEAD_KINDS, OBJECTIVES, HeadConfig, objectives_help
from minqr.lock import hold_output
from minqr.metrics import CURVES_FILE, METRICS_FILE, MetricsLog, plot_curves, read_metrics
from minqr.progress import progress_bar
from minqr.reward import TRAINING_ARGS_FILE, RewardModel, ranking_credit
from minqr.tokenizer import load_tokenizer


def option(default, help: str, choices=None):
    """A TrainConfig field: its default and its help text live here, and tools/train.py builds its
    command-line options from them."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Every option of a training run. Defaults train GPT-2 (124M) on HH-RLHF helpful-base."""

    # the model and its loss
    head: str = option("quantile", "reward head: 'quantile' (N quantiles of the reward, the distributional "
                       "head) or 'scalar' (one reward, the Bradley-Terry baseline)", HEAD_KINDS)
    num_quantiles: int | None = option(None, "number of outputs N of the quantile head [default: 20 for mixture "
                                       "and independent, 10 (the paper's) for paper; the scalar head has 1]")
    objective: str | None = option(None, "how the N outputs are trained and what they mean (minqr/head.py): "
                                   + objectives_help() + " [default: mixture; the scalar head's is bradley_terry]",
                                   tuple(OBJECTIVES))
    kappa: float | None = option(None, "objective paper: Huber threshold κ of the quantile term [default: 1.0]")
    lam: float | None = option(None, "objective paper: weight λ of the quantile-Huber term [default: 1.0]")
    margin: float | None = option(None, "objective paper: margin m, the chosen response's quantiles are pulled "
                                  "towards the rejected one's plus m, and the rejected one's towards the chosen "
                                  "minus m [default: 1.0]")
    bag_coef: float | None = option(None, "weight of the response bag-of-words auxiliary: the pooled state of "
                                    "each response predicts which tokens the response holds "
                                    "(RewardModel.response_bag_loss), so that it keeps what annotators disagree "
                                    "about; its layer is not saved [default: 5 for mixture and independent, else 0]")
    head_lr_scale: float | None = option(None, "the head's learning rate is --lr times this [default: 2.5 for "
                                         "mixture and independent, else 1]")
    head_weight_decay: float | None = option(None, "AdamW weight decay of the head [default: 0 for mixture and "
                                             "independent, else --weight-decay]")
    center_coef: float = option(0.0, "weight of TRL's reward-centring term, mean((μ_c + μ_r)²) on the "
                                "expected rewards (e.g. 0.01)")
    lm_coef: float = option(0.0, "weight of MOSS-RLHF's language-model loss, the mean next-token "
                            "cross-entropy on the chosen response tokens")
    model: str = option("gpt2", "backbone: a local Hugging Face GPT-2 folder, or a hub name (gpt2, "
                        "gpt2-medium, ...) fetched through huggingface_hub")
    tokenizer: str | None = option(None, "tokenizer folder [default: the model folder]")
    # the data
    data: str = option("hh-rlhf:helpful-base", "training pairs: a .jsonl(.gz) file, a folder laid out "
                       "like hh-rlhf (with --subset), or hh-rlhf:SUBSET fetched through huggingface_hub")
    subset: str | None = option(None, "subset of a folder given as --data, e.g. helpful-base")
    eval_data: str | None = option(None, "held-out pairs, same forms as --data [default: the test split "
                                   "of --data when it is a folder or hh-rlhf:SUBSET; none for a file]")
    max_length: int = option(512, "tokens kept of each text, cut from the left so that the final "
                             "responses survive")
    shared_prefix: bool = option(True, "run the common prefix of a pair's two texts once (same rewards "
                                 "and gradients as two separate sequences, fewer tokens)")
    skip_bad: bool = option(False, "skip malformed data lines and count them instead of stopping")
    # the optimisation
    batch_size: int = option(32, "pairs per optimizer step, over all processes and accumulation steps")
    grad_accum: int = option(1, "split each step's batch into this many micro-batches run one after "
                             "the other (less memory, same result)")
    lr: float = option(1e-5, "peak learning rate of AdamW")
    weight_decay: float = option(0.01, "AdamW weight decay, on weight matrices only (not on biases "
                                 "and layer-norm gains)")
    warmup: float = option(0.05, "fraction of the steps spent warming the learning rate up linearly; "
                           "it then decays to 0 along a cosine")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    epochs: int = option(1, "passes over the training pairs")
    max_steps: int | None = option(None, "stop after this many optimizer steps [default: --epochs "
                                   "passes]; more steps than the epochs hold repeat the data")
    seed: int = option(0, "seed of the head's initialisation, the data order and dropout")
    # the run
    out: str | None = option(None, "run folder: the trained model, metrics.jsonl, curves.png, "
                             "checkpoint/ [default: runs/HEAD, or runs/demo/HEAD with --demo]")
    eval_every: int = option(200, "evaluate on the held-out pairs every this many steps (0: only at "
                             "the end)")
    save_every: int = option(200, "write checkpoint/ every this many steps (0: only at the end)")
    device: str = option("auto", "cpu, cuda, cuda:1, ...; auto: cuda when there is a GPU (under torchrun "
                         "each process its own), else cpu")
    dtype: str = option("auto", "compute precision; auto: bfloat16 autocast on GPU (the weights stay "
                        "float32), float32 on CPU", tuple(DTYPES))
    compile: bool = option(False, "torch.compile the backbone (faster steps after a slow first one)")
    resume: bool = option(False, "continue the run in --out from its checkpoint/: give the same "
                          "options as the first time, plus --resume")
    overwrite: bool = option(False, "start afresh even if --out already holds a run (its files are "
                             "replaced)")
    demo: bool = option(False, "offline demo: generate a synthetic preference task (minqr.synthetic) "
                        "with a tiny random GPT-2 and train on it; other options override its defaults")

    def __post_init__(self):
        # the head's own rules (HeadConfig.make): scalar is N = 1, bradley_terry; quantile defaults to
        # N = 10 and the default objective; kappa, lam and margin belong to the paper objective
        try:
            head = self.head_config()
        except MinqrError as error:
            raise MinqrError(f"options --head, --num-quantiles, --objective, --kappa, --lam, --margin: {error}") from None
        self.num_quantiles, self.objective = head.num_quantiles, head.objective
        self.kappa, self.lam, self.margin = (head.hyperparameters.get(name) for name in ("kappa", "lam", "margin"))
        for name, default in head.spec.training.items():  # what the objective needs unless told otherwise
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.head_weight_decay is None:
            self.head_weight_decay = self.weight_decay
        self.out = self.out or str(Path("runs") / self.head)
        if self.demo and Path(self.data).parent == Path("."):
            # the demo generates its task in the folder of `data`; a hub name such as the default
            # hh-rlhf:helpful-base, or a bare file name, would put it into the current folder
            raise MinqrError(f"--demo generates its synthetic task in the folder of --data, and --data "
                             f"{self.data!r} names none: leave --data out (in Python, build the config with "
                             "TrainConfig.from_options(demo=True, ...), which fills in the demo's data, model "
                             "and other options), or give --data FOLDER/train.jsonl")
        if self.dtype not in DTYPES:
            raise MinqrError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        problems = [f"--{name.replace('_', '-')} must be at least {low} (got {getattr(self, name)})"
                    for name, low in (("max_length", 1), ("batch_size", 1),
                                      ("grad_accum", 1), ("epochs", 1), ("eval_every", 0), ("save_every", 0))
                    if getattr(self, name) < low]
        problems += [f"--{name.replace('_', '-')} must be non-negative (got {getattr(self, name)})"
                     for name in ("center_coef", "lm_coef", "bag_coef", "weight_decay", "max_grad_norm")
                     if not getattr(self, name) >= 0]  # `not >=` also catches NaN
        if not self.head_weight_decay >= 0:
            problems.append(f"--head-weight-decay must be non-negative (got {self.head_weight_decay})")
        if not 0 < self.head_lr_scale < math.inf:
            problems.append(f"--head-lr-scale must be positive and finite (got {self.head_lr_scale})")
            self.head_lr_scale = 1.0  # so that the --lr check below says nothing about it
        if not 0 < self.lr * self.head_lr_scale <= MAX_LEARNING_RATE or not 0 < self.lr <= MAX_LEARNING_RATE:
            problems.append(f"--lr must be positive and at most {MAX_LEARNING_RATE:g} (got {self.lr}, and "
                            f"{self.lr * self.head_lr_scale:g} for the head): AdamW moves a weight by about the "
                            "learning rate each step, and float32 overflows beyond")
        if not 0 <= self.warmup < 1:
            problems.append(f"--warmup is a fraction of the steps, in [0, 1) (got {self.warmup})")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"--max-steps must be at least 1 (got {self.max_steps})")
        if self.batch_size % self.grad_accum:
            problems.append(f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}")
        if problems:
            raise MinqrError("; ".join(problems))

    def head_config(self) -> HeadConfig:
        return HeadConfig.make(self.head, self.num_quantiles, self.objective, kappa=self.kappa, lam=self.lam,
                               margin=self.margin)

    @classmethod
    def from_options(cls, **given) -> "TrainConfig":
        """A config from the options a user actually gave: with `demo=True` the demo's defaults fill
        in the rest (see `demo_defaults`), otherwise the field defaults."""
        if given.get("demo"):
            given = {**demo_defaults(given.get("head", "quantile"), given.get("out"), given.get("data")), **given}
        return cls(**given)


def demo_defaults(head: str, out=None, data=None) -> dict:
    """The demo: a tiny random-init GPT-2 on the synthetic task in OUT/../demo-data (made by
    minqr.synthetic on first use, 40,000 training pairs; its texts are a few dozen tokens), or in the
    folder of `data` (e.g. another variant, made by tools/synthetic.py). A model trained from
    scratch takes a far larger learning rate than a pretrained one being fine-tuned. 3,000 steps
    (96,000 pairs, 2.4 epochs) take one to two minutes on a 2-core CPU: that many were needed for
    the quantile head's N outputs to follow the annotators' disagreement (README)."""
    out = Path(out or Path("runs") / "demo" / head)
    data = Path(data).parent if data else out.parent / "demo-data"
    return dict(out=str(out), model=str(data / "model"), data=str(data / "train.jsonl"),
                eval_data=str(data / "test.jsonl"), max_length=128, batch_size=32, lr=2e-3, warmup=0.05,
                weight_decay=0.01, max_steps=3000, eval_every=1000, save_every=1000)


# What --resume may change: where and how fast the run computes, and how often it reports (--out
# names the run, however it is spelt). Everything else decides the weights: a change is an error.
# A change of device type, compute dtype or compile is allowed (a run must be able to move) but
# changes the float rounding, and a GPU draws other dropout masks: _Run._restore warns of it.
RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "eval_every", "save_every", "device", "compile")


# The largest learning rate accepted: AdamW's first step moves a weight by about 3 x lr / 0.1 (its
# bias correction), which must stay far below float32's 3.4e38.
MAX_LEARNING_RATE = 1e30
TRUNCATION_WARNING = (". Warning: most texts lose their beginning, and what a response answers may be cut away; "
                      "raise --max-length if the model's positions allow")


class TrainingDiverged(MinqrError):
    """The loss, the gradient or the weights became NaN or infinite: training stopped, the last
    good checkpoint stays."""


class TrainingInterrupted(MinqrError):
    """Ctrl-C (SIGINT) stopped the run after a finished step, whose checkpoint was saved."""


class Interrupt:
    """Ctrl-C while training: the first SIGINT asks the run to stop after the step in progress (and
    save it); a second one stops at once (KeyboardInterrupt). Used as a context manager around the
    loop; `requested` is this process's wish, `agreed` what the processes decided together."""

    def __init__(self):
        self.requested = self.agreed = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        _say("Ctrl-C: stopping after this step and saving a checkpoint (press again to stop at once, losing "
             "the steps since the last checkpoint)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only there can Python take a signal
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False


@dataclass
class TrainSummary:
    steps: int
    seconds: float
    out: Path
    final_eval: dict | None  # the last evaluation's metrics, None without held-out data
    bayes_accuracy: float | None = None  # the demo's task: the best accuracy any model can reach
    # under torchrun every process returns a summary; tools/train.py prints process 0's only
    rank: int = 0

    def __str__(self) -> str:
        lines = [f"trained {self.steps} steps in {self.seconds:.0f} s"]
        if self.final_eval:
            e = self.final_eval
            line = (f"held-out pair accuracy {e['eval_accuracy']:.3f} (loss {e['eval_loss']:.4f}, "
                    f"reward mean {e['eval_reward_mean']:.3f} ± {e['eval_reward_std']:.3f})")
            if self.bayes_accuracy is not None:
                line += f"; the Bayes-optimal accuracy of the synthetic task is {self.bayes_accuracy:.3f}"
            lines.append(line)
        lines += [f"reward model: {self.out} (RewardModel.from_pretrained, or transformers' "
                  "AutoModelForSequenceClassification)",
                  f"metrics: {self.out / METRICS_FILE}, curves: {self.out / CURVES_FILE}, "
                  f"resume from: {self.out / 'checkpoint'}"]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Processes: one, or several under torchrun


@dataclass
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextmanager
    def main_first(self):
        """Run the block in process 0 first and in the others after it: a download or a file that
        process 0 makes, the others then find in place (and it is announced once)."""
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main and self.world_size > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum each value over the processes (float64, so that counts stay exact)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def start_processes(device_option: str) -> Processes:
    """Join the process group when launched by torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_option, int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return Processes(0, 1, device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), world_size, device)


def stop_processes(procs: Processes, finished: bool = False) -> None:
    if procs.world_size > 1 and dist.is_initialized():
        if finished:
            # Process 0 still saves the model and draws the curves when the others are done. One
            # that tore its gloo connections down then and exited could abort ("terminate called
            # without an active exception"): leave together. Not after an error, where the others
            # may never arrive.
            dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The objective


class PairObjective(nn.Module):
    """One micro-batch's contribution to the step's objective, as a module, so that
    DistributedDataParallel sees a `forward` (it synchronises gradients around that call).

    Returns the loss to backpropagate (already divided by the global batch, see the module
    docstring) and the expected rewards μ_c, μ_r `[B]` for the accuracy.
    """

    def __init__(self, model: RewardModel, config: TrainConfig):
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, batch, pairs_in_step: int, lm_tokens_in_step: float):
        c = self.config
        # the head's objective (+ the response bag auxiliary), summed over the pairs; float32 [B, N] outputs
        loss, r_chosen, r_rejected, *hidden = self.model.pair_loss(batch, "sum", c.bag_coef, return_hidden=c.lm_coef > 0)
        mu_chosen, mu_rejected = r_chosen.mean(-1), r_rejected.mean(-1)  # [B]
        if c.center_coef > 0:
            loss = loss + c.center_coef * ((mu_chosen + mu_rejected) ** 2).sum()
        loss = loss / pairs_in_step
        if c.lm_coef > 0:
            targets = batch.chosen_lm_labels != IGNORE_INDEX  # [R, T]
            logits = self.model.transformer.lm_logits(hidden[0][targets])  # [targets, vocab]
            lm_sum = F.cross_entropy(logits.float(), batch.chosen_lm_labels[targets], reduction="sum")
            loss = loss + c.lm_coef * lm_sum / lm_tokens_in_step
        return loss, mu_chosen.detach(), mu_rejected.detach()


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to the peak, then cosine decay towards 0 (`step` counts from 0)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: RewardModel, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Decay pulls weights towards 0: right for matrices, wrong for biases and layer-norm gains
    # (whose neutral value is 1), which are the 1-dimensional parameters. The head has its own
    # learning rate and decay (--head-lr-scale, --head-weight-decay): its N rows must move apart,
    # which decay works against.
    head = model.score.weight
    params = [p for p in model.parameters() if p.requires_grad and p is not head]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
              {"params": [head], "weight_decay": config.head_weight_decay, "lr": config.lr * config.head_lr_scale}]
    return torch.optim.AdamW(groups, lr=config.lr, fused=device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# The run


def train(config: TrainConfig, progress: bool = True) -> TrainSummary:
    """Train a reward model as `config` says; see the module docstring for what lands in `out`."""
    procs = start_processes(config.device)
    finished = False
    try:
        # one run at a time in a run folder (minqr/lock.py); under torchrun process 0 holds it for all
        with hold_output(config.out, "--out", say=_say) if procs.is_main else nullcontext():
            summary = _Run(config, procs, progress).run()
        finished = True
        return summary
    finally:
        stop_processes(procs, finished)


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


class _Run:
    """One training run: set up in __init__, then `run()`. Attributes are the run's state."""

    def __init__(self, config: TrainConfig, procs: Processes, progress: bool):
        self.config, self.procs, self.progress = config, procs, progress
        self.out = Path(config.out)
        self.say = _say if procs.is_main else (lambda message: None)
        self.interrupt = Interrupt()
        self.autocast_dtype = autocast_dtype(config.dtype, procs.device)
        # what decides the float rounding without being an option of the run (see _restore)
        self.compute = {"device": procs.device.type, "dtype": str(self.autocast_dtype).removeprefix("torch."),
                        "compile": config.compile}
        # The cheap checks come first, then the model (a broken --model fails in a second), and the
        # data, which takes longest to read and tokenise, last.
        per_process = config.batch_size // procs.world_size
        if per_process * procs.world_size != config.batch_size or per_process % config.grad_accum:
            raise MinqrError(f"--batch-size {config.batch_size} must be a multiple of --grad-accum "
                             f"{config.grad_accum} × {procs.world_size} processes")
        self.micro_batch_size = per_process // config.grad_accum
        self.checkpoint = self._check_out_folder()
        self.bayes_accuracy = self._prepare_demo_data() if config.demo else None
        with procs.main_first():  # a hub download happens, and is announced, once
            self.model_path, train_file, eval_file = self._resolve_inputs()
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_path)

        torch.manual_seed(config.seed)  # the head's initialisation
        model = RewardModel(load_gpt2(self.model_path), config.head_config())
        if config.bag_coef > 0:
            model.add_response_bag()
        if config.max_length > model.transformer.config.n_positions:
            raise MinqrError(f"--max-length {config.max_length} is more than the model's "
                             f"{model.transformer.config.n_positions} positions: lower it")

        self.train_pairs = self._load_data(train_file, "train")
        self.eval_pairs = self._load_data(eval_file, "test") if eval_file is not None else None
        # Only full batches: every step then has the same global batch, however it is divided up.
        self.steps_per_epoch = len(self.train_pairs) // config.batch_size
        if self.steps_per_epoch == 0:
            raise MinqrError(f"--batch-size {config.batch_size} is more than the {len(self.train_pairs)} "
                             f"training pairs: lower it")
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.warmup_steps = round(config.warmup * self.total_steps)
        self.say(self._plan(model))
        self.model = model.to(procs.device).train()
        self.optimizer = make_optimizer(self.model, config, procs.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: learning_rate_factor(s, self.warmup_steps, self.total_steps))
        self.step, self.position = 0, DataPosition()
        self.saved_step = None  # the step of the checkpoint on disk
        # Each process draws its own dropout masks.
        torch.manual_seed(config.seed + 1 + procs.rank)
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        if config.compile:
            self.model.transformer.compile(dynamic=True)
        objective = PairObjective(self.model, config)
        self.objective = objective if procs.world_size == 1 else nn.parallel.DistributedDataParallel(
            objective, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)

    # -- set-up ------------------------------------------------------------------------------

    def _check_out_folder(self):
        """The checkpoint to resume from (None for a new run); refuse to clobber a run by mistake.
        Each refusal says what the folder holds and the one option that gets out."""
        config = self.config
        checkpoint = find_checkpoint(self.out)
        if config.resume:
            if checkpoint is None:
                raise MinqrError(f"--resume: {self.out} holds no checkpoint to continue from (a run saves one every "
                                 "--save-every steps, and this one was stopped before its first): start it afresh "
                                 "with --overwrite instead of --resume")
            checkpoint = load_checkpoint(self.out)
            check_same_options(checkpoint.config, asdict(config))
            return checkpoint
        if config.overwrite or config.demo:
            return None
        if checkpoint is not None:
            raise MinqrError(f"--out {self.out} already holds a run with a checkpoint: add --resume to continue "
                             "it, --overwrite to start afresh, or choose another --out")
        if (self.out / METRICS_FILE).exists():
            raise MinqrError(f"--out {self.out} already holds a run that saved no checkpoint (nothing to resume): "
                             "add --overwrite to start afresh, or choose another --out")
        return None

    def _resolve_inputs(self) -> tuple:
        """(model folder, training data file, held-out data file or None): local paths, hub names
        fetched. Every input that cannot be had is named, all in one message."""
        config = self.config

        def data_file(source, split):
            subset = None if Path(source).expanduser().is_file() else config.subset
            return resolve_source(source, split, subset)

        data_is_a_file = Path(config.data).expanduser().is_file()
        eval_source = config.eval_data or (None if data_is_a_file else config.data)
        eval_option = "--eval-data" if config.eval_data else "--data (its test split)"
        wanted = [("--model", lambda: hub.fetch_model(config.model)),
                  ("--data", lambda: data_file(config.data, "train")),
                  (eval_option, (lambda: data_file(eval_source, "test")) if eval_source else lambda: None)]
        found, problems = [], []
        for option, fetch in wanted:
            try:
                found.append(fetch())
            except MinqrError as error:
                problems.append(f"{option}: {error}")
        if len(problems) == 1:
            raise MinqrError(problems[0])
        if problems:
            raise MinqrError(f"{len(problems)} inputs cannot be had:\n  " + "\n  ".join(problems))
        if eval_source is None:
            self.say("no held-out data (--eval-data): no evaluation, and no reward mean/std for the saved config")
        return tuple(found)

    def _plan(self, model: RewardModel) -> str:
        """One line of what the run will cost, printed before it starts."""
        config, head = self.config, model.head_config
        backbone = sum(p.numel() for p in model.transformer.parameters())
        bag = "" if model.response_bag is None else (
            f" + {sum(p.numel() for p in model.response_bag.parameters()) / 1e6:.1f}M of the response-bag layer "
            "(training only)")
        return (f"plan: {self.total_steps:,} steps of {config.batch_size} pairs "
                f"({self.total_steps * config.batch_size / len(self.train_pairs):.2f} epochs of "
                f"{len(self.train_pairs):,} pairs); GPT-2 of {backbone / 1e6:.1f}M parameters{bag}; head of "
                f"{head.num_quantiles} outputs trained by {head.objective}; on {self.procs.device} "
                f"x {self.procs.world_size} process{'es' if self.procs.world_size > 1 else ''}")

    def _prepare_demo_data(self) -> float:
        """Make the synthetic task on first use (process 0; the others wait); its Bayes accuracy."""
        from minqr.synthetic import make_synthetic_task

        folder = Path(self.config.data).parent
        task_file = folder / "task.json"
        with self.procs.main_first():
            if not task_file.is_file():
                self.say(f"demo: generating the synthetic task in {folder}")
                make_synthetic_task(folder, seed=0)
        return json.loads(task_file.read_text())["bayes_accuracy"]

    def _load_data(self, path: Path, split: str):
        """Read and tokenise one data file; say what was dropped and what was cut."""
        config = self.config
        pairs, stats = read_pairs_file(path, skip_bad=config.skip_bad)
        self.say(f"{split}: {stats.summary()}")
        tokenized = tokenize_pairs(pairs, self.tokenizer, config.max_length)
        if tokenized.num_truncated:
            share = tokenized.num_truncated / len(tokenized)
            self.say(f"{split}: {tokenized.num_truncated:,} pairs ({share:.0%}) cut from the left to --max-length "
                     f"{config.max_length}" + (TRUNCATION_WARNING if share > 0.5 else ""))
        return tokenized

    def _restore(self, checkpoint) -> None:
        self.model.load_state_dict(checkpoint.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self.step, self.position = checkpoint.step, checkpoint.position
        self.saved_step = checkpoint.step
        rng_states = checkpoint.rng_states
        if len(rng_states) != self.procs.world_size:
            self.say(f"warning: the checkpoint was written by {len(rng_states)} processes and this run has "
                     f"{self.procs.world_size}: dropout masks will differ from an uninterrupted run")
        if self.procs.rank < len(rng_states):
            restore_rng_state(rng_states[self.procs.rank])
        changed = [f"{what} {checkpoint.compute[what]} -> {now}" for what, now in self.compute.items()
                   if checkpoint.compute[what] != now]
        if changed:
            self.say(f"warning: resuming with {', '.join(changed)}: the continuation is no longer bit-identical "
                     "to an uninterrupted run (the float rounding differs, and a GPU draws other dropout masks "
                     "than a CPU); resume as the run started for that")
        self.say(f"resuming at step {self.step} (epoch {self.position.epoch}, batch {self.position.batch}) "
                 f"from {checkpoint.folder}")

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> TrainSummary:
        config, procs = self.config, self.procs
        log = MetricsLog(self.out / METRICS_FILE, resume_step=self.step if self.checkpoint else None) \
            if procs.is_main else None
        if procs.is_main:
            if self.checkpoint is None:  # a fresh start: no checkpoint of an earlier run may linger
                remove_checkpoints(self.out)
            self._write_training_args()
        bar = progress_bar(total=self.total_steps, initial=self.step, desc=f"train {config.head}", unit="step",
                           disable=not (self.progress and procs.is_main))
        started = time.perf_counter()
        try:
            with self.interrupt:
                final_eval = self._loop(bar, log)
        finally:
            bar.close()
            if log:
                log.close()
        if final_eval is None and self.eval_pairs is not None:  # resumed from the final checkpoint
            final_eval = self._evaluate()
        if procs.is_main:
            self._save_model(final_eval)
            plot_curves(read_metrics(self.out / METRICS_FILE), self.out / CURVES_FILE)
        return TrainSummary(self.step, time.perf_counter() - started, self.out, final_eval, self.bayes_accuracy,
                            rank=procs.rank)

    def _loop(self, bar, log) -> dict | None:
        """The steps from self.step to the last; returns the last evaluation, if any."""
        config, final_eval = self.config, None
        while self.step < self.total_steps:
            batches = self._epoch_batches(self.position.epoch)
            for index in range(self.position.batch, len(batches)):
                record = self._train_step(batches[index])
                self.step += 1
                more_in_epoch = index + 1 < len(batches)
                self.position = DataPosition(self.position.epoch + (not more_in_epoch),
                                             index + 1 if more_in_epoch else 0)
                bar.update()
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}",
                                pairs_per_s=f"{record['pairs_per_s']:.1f}", refresh=False)
                if log:
                    log.write(record)
                last = self.step == self.total_steps
                if self.eval_pairs is not None and (last or _every(self.step, config.eval_every)):
                    final_eval = self._evaluate()
                    self.say(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in final_eval.items()
                                                               if k != "step"))
                    if log:
                        log.write(final_eval)
                if last or _every(self.step, config.save_every) or self.interrupt.agreed:
                    self._save_checkpoint()
                if self.interrupt.agreed:  # Ctrl-C: the step is finished and saved; stop here
                    raise TrainingInterrupted(
                        f"interrupted at step {self.step} of {self.total_steps}; its checkpoint is in "
                        f"{self.out / 'checkpoint'}: continue with the same command plus --resume")
                if last:
                    break
        return final_eval

    def _epoch_batches(self, epoch: int) -> list:
        widths = self.train_pairs.row_widths(self.config.shared_prefix)
        batches = length_grouped_batches(widths, self.config.batch_size, self.config.seed, epoch)
        return [b for b in batches if len(b) == self.config.batch_size]

    def _my_micro_batches(self, pair_indices: list) -> list:
        """This process's slice of a global batch, cut into --grad-accum micro-batches."""
        size = self.micro_batch_size
        start = self.procs.rank * size * self.config.grad_accum
        return [pair_indices[start + k * size : start + (k + 1) * size] for k in range(self.config.grad_accum)]

    def _train_step(self, pair_indices: list) -> dict:
        config, procs = self.config, self.procs
        started = time.perf_counter()
        micro_batches = [self.train_pairs.batch(ix, config.shared_prefix).to(procs.device)
                         for ix in self._my_micro_batches(pair_indices)]
        lm_tokens = 0.0
        if config.lm_coef > 0:
            (lm_tokens,) = procs.all_sum([sum(float((b.chosen_lm_labels != IGNORE_INDEX).sum())
                                              for b in micro_batches)])
        loss_sum = torch.zeros((), dtype=torch.float64, device=procs.device)
        right = torch.zeros((), dtype=torch.float64, device=procs.device)
        for k, batch in enumerate(micro_batches):
            # DDP averages the gradients in the last micro-batch's backward; the others only add up
            last = k == len(micro_batches) - 1
            with nullcontext() if last or procs.world_size == 1 else self.objective.no_sync():
                with autocast(procs.device, self.autocast_dtype):
                    loss, mu_chosen, mu_rejected = self.objective(batch, config.batch_size, max(lm_tokens, 1.0))
                (loss * procs.world_size).backward()
            loss_sum += loss.detach()
            right += ranking_credit(mu_chosen, mu_rejected).sum()
        real_tokens = sum(b.num_real_tokens for b in micro_batches)
        # the processes agree on a Ctrl-C here, so that all of them stop after the same step
        loss_value, right_value, real_tokens, interrupted = procs.all_sum(
            [loss_sum.item(), right.item(), real_tokens, float(self.interrupt.requested)])
        self.interrupt.agreed = interrupted > 0
        if not math.isfinite(loss_value):
            raise self._diverged(f"the loss is {loss_value}")
        if config.max_grad_norm > 0:
            grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise self._diverged(f"the gradient norm is {grad_norm}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        return {"step": self.step + 1, "loss": loss_value, "accuracy": right_value / config.batch_size,
                "lr": lr, "tokens_per_s": real_tokens / seconds, "pairs_per_s": config.batch_size / seconds}

    def _diverged(self, what: str, step: int | None = None) -> TrainingDiverged:
        if self.saved_step is None:
            kept = "No checkpoint was saved before it"
        else:
            kept = f"The last good checkpoint, of step {self.saved_step}, stays in {self.out / 'checkpoint'}"
        return TrainingDiverged(f"training diverged at step {step or self.step + 1}: {what}; stopped. {kept}. "
                                f"Lower --lr (now {self.config.lr:g}) and train again")

    def _check_weights(self) -> None:
        """Before anything is saved: every weight must be finite. A finite loss does not make the
        step after it good (a learning rate of inf turns every weight into NaN)."""
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
            raise self._diverged(f"the weights are not finite after the optimizer step ({bad[0]}{more})", self.step)

    @torch.no_grad()
    def _evaluate(self) -> dict:
        """Held-out metrics over all processes; each process scores every world_size-th batch."""
        config, procs = self.config, self.procs
        self.model.eval()
        widths = self.eval_pairs.row_widths(config.shared_prefix)
        batches = length_grouped_batches(widths, self.micro_batch_size, seed=0, epoch=0)
        totals = np.zeros(5)  # loss, right, reward sum, reward square sum, margin sum
        for pair_indices in batches[procs.rank :: procs.world_size]:
            batch = self.eval_pairs.batch(pair_indices, config.shared_prefix).to(procs.device)
            with autocast(procs.device, self.autocast_dtype):
                # the objective alone: for all but paper, the held-out negative log-likelihood of the labels
                loss, r_chosen, r_rejected = self.model.pair_loss(batch, "sum")  # float32 [B, N] outputs
            mu_chosen, mu_rejected = r_chosen.mean(-1), r_rejected.mean(-1)  # [B]
            rewards = torch.cat([mu_chosen, mu_rejected]).double()
            totals += [loss.item(), ranking_credit(mu_chosen, mu_rejected).sum().item(), rewards.sum().item(),
                       (rewards ** 2).sum().item(), (mu_chosen - mu_rejected).sum().item()]
        loss, right, reward_sum, reward_square_sum, margin_sum = procs.all_sum(totals.tolist())
        self.model.train()
        pairs = len(self.eval_pairs)
        mean = reward_sum / (2 * pairs)
        return {"step": self.step, "eval_loss": loss / pairs, "eval_accuracy": right / pairs,
                "eval_reward_mean": mean,
                "eval_reward_std": math.sqrt(max(reward_square_sum / (2 * pairs) - mean ** 2, 0.0)),
                "eval_margin": margin_sum / pairs}

    # -- files -------------------------------------------------------------------------------

    def _training_args(self) -> dict:
        return {**asdict(self.config), "processes": self.procs.world_size, "device": str(self.procs.device),
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "train_pairs": len(self.train_pairs),
                "eval_pairs": len(self.eval_pairs) if self.eval_pairs is not None else 0,
                "model_path": str(self.model_path), "torch": torch.__version__}

    def _write_training_args(self) -> None:
        with atomic_file(self.out / TRAINING_ARGS_FILE) as tmp:
            tmp.write_text(json.dumps(self._training_args(), indent=2) + "\n")

    def _save_checkpoint(self) -> None:
        self._check_weights()
        rng_states = [capture_rng_state()]
        if self.procs.world_size > 1:
            rng_states = [None] * self.procs.world_size
            dist.all_gather_object(rng_states, capture_rng_state())
        if self.procs.is_main:
            save_checkpoint(self.out, step=self.step, position=self.position, model=self.model,
                            optimizer=self.optimizer, scheduler=self.scheduler, rng_states=rng_states,
                            config=asdict(self.config), compute=self.compute)
        self.saved_step = self.step

    def _save_model(self, final_eval: dict | None) -> None:
        self._check_weights()
        reward_stats = None if final_eval is None else {
            "mean": final_eval["eval_reward_mean"], "std": final_eval["eval_reward_std"]}
        self.model.save_pretrained(self.out, tokenizer=self.tokenizer, training_args=self._training_args(),
                                   reward_stats=reward_stats)


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def check_same_options(saved: dict, given: dict) -> None:
    """--resume: the options that decide the weights must be those the run started with."""
    changed = [f"--{name.replace('_', '-')} {given.get(name)!r} (the run has {saved.get(name)!r})"
               for name in sorted(set(saved) | set(given))
               if name not in RESUME_MAY_CHANGE and saved.get(name) != given.get(name)]
    if changed:
        raise MinqrError("--resume: options differ from the run being resumed: " + ", ".join(changed)
                         + ". Give the options of the first run, with --resume added")
