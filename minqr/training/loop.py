"""Training a reward model on preference pairs: the loop behind `tools/train.py`.

    config = TrainConfig(head="quantile", data="hh-rlhf:helpful-base", out="runs/quantile")
    summary = train(config)

One optimizer step sees `batch_size` pairs (the global batch: all processes and all gradient
accumulation steps together). The pairs of a step have similar lengths (length-grouped batches in
a seeded order, minqr/data/batching.py) and, by default, each pair runs as one shared-prefix row.
What a step minimises is minqr/training/loss.py's; the options are minqr/training/config.py's;
processes are minqr/training/distributed.py's.

The run folder (`--out`) ends up holding the trained reward model (config.json, model.safetensors,
tokenizer files: what `RewardModel.from_pretrained` and transformers'
AutoModelForSequenceClassification load), `training_args.json`, `metrics.jsonl`, `curves.png`,
`annotators.json` and `eval_annotators.json` when the data names annotators (docs/personal.md), and
`checkpoint/`, from which `--resume` continues an interrupted run to the weights an uninterrupted
one reaches (bit for bit on CPU; see minqr/training/resume.py).
"""
import json
import time
from contextlib import nullcontext
from datetime import datetime
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from minqr.atomic import atomic_file
from minqr.data.batching import IGNORE_INDEX, process_micro_batches, training_batches
from minqr.device import autocast, autocast_dtype
from minqr.distribution.personal import has_kinds
from minqr.errors import MinqrError
from minqr.lock import hold_output
from minqr.models.backbone import check_max_length, load_backbone
from minqr.models.gpt2 import GPT2
from minqr.models.reward import TRAINING_ARGS_FILE, RewardModel, check_vocabulary
from minqr.models.tokenizer import load_tokenizer
from minqr.progress import progress_bar, say
from minqr.study.personalize import save_annotators
from minqr.ranking import ranking_credit
from minqr.synthetic.demo import prepare_demo_data
from minqr.training.averaging import WeightAverage
from minqr.training.config import TrainConfig
from minqr.training.distributed import Processes, full_value, start_processes, stop_processes
from minqr.training.divergence import DivergenceCheck
from minqr.training.evaluation import held_out_metrics, training_posteriors
from minqr.training.inputs import load_pairs, resolve_inputs
from minqr.training.interrupt import Interrupt, TrainingInterrupted
from minqr.training.loss import AnnotatorLikelihood, ResponseBag, StepLoss
from minqr.training.master_weights import MasterWeightAdamW
from minqr.training.metrics import CURVES_FILE, METRICS_FILE, MetricsLog, plot_curves, read_metrics
from minqr.training.optimizer import learning_rate_factor, make_optimizer
from minqr.training.personal_metrics import PERSONAL_EVAL_FILE, PersonalEvaluation
from minqr.training.resume import (START_AFRESH, STATE_FILE, DataPosition, capture_rng_state, check_resumable,
                                   checkpoint_to_resume, data_digest, remove_checkpoints, restore_rng_state,
                                   save_checkpoint)


@dataclass
class TrainSummary:
    steps: int
    seconds: float
    out: Path
    final_eval: dict | None  # the last evaluation's metrics, None without held-out data
    bayes_accuracy: float | None = None  # the demo's task: the best accuracy any model can reach
    # under torchrun every process returns a summary; tools/train.py prints process 0's only
    rank: int = 0
    resumed_at: int = 0  # the step --resume continued from (0: a fresh run)

    def __str__(self) -> str:
        if self.resumed_at == self.steps > 0:
            lines = [f"nothing left to train: the run had finished its {self.steps} steps (--resume found its last "
                     "checkpoint); the model is saved again from it"]
        elif self.resumed_at:
            lines = [f"trained steps {self.resumed_at + 1} to {self.steps} in {self.seconds:.0f} s (resumed at step "
                     f"{self.resumed_at})"]
        else:
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
# The run


def train(config: TrainConfig, progress: bool = True) -> TrainSummary:
    """Train a reward model as `config` says; see the module docstring for what lands in `out`."""
    procs = start_processes(config.device)
    finished = False
    try:
        # one run at a time in a run folder (minqr/lock.py); under torchrun process 0 holds it for all
        with hold_output(config.out, "--out", say=say) if procs.is_main else nullcontext():
            summary = TrainingRun(config, procs, progress).run()
        finished = True
        return summary
    finally:
        stop_processes(procs, finished)


class TrainingRun:
    """One training run: checked and assembled in __init__, then `run()`. Attributes are the run's
    state. What can be refused is refused as early as it can be known: the options and the out
    folder first (`_check_setup`), then the model (a broken --model fails in a second,
    `_check_model`), and the data, which takes longest to read and tokenise, last (`_check_data`)."""

    def __init__(self, config: TrainConfig, procs: Processes, progress: bool):
        self.config, self.procs, self.progress = config, procs, progress
        self.out = Path(config.out)
        self.say = say if procs.is_main else (lambda message: None)
        self.interrupt = Interrupt()
        self.autocast_dtype = autocast_dtype(config.dtype, procs.device)
        # what decides the float rounding without being an option of the run (see _restore)
        self.compute = {"device": procs.device.type, "dtype": str(self.autocast_dtype).removeprefix("torch."),
                        "compile": config.compile}
        self.micro_batch_size, self.checkpoint = self._check_setup()
        self.bayes_accuracy = prepare_demo_data(config.data, config.out, procs, self.say) if config.demo else None
        with procs.main_first():  # a hub download happens, and is announced, once
            self.model_path, train_file, eval_file = resolve_inputs(config, self.say)
        self._refuse_model_as_out(self.model_path)  # again once a hub name has its cached copy
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_path)
        # a chat template may write today's date: the run renders its texts as on the day it began,
        # resumed or not (a resumed run on other texts is refused: check_resumable)
        self.rendered_at = datetime.now() if self.checkpoint is None else \
            datetime.fromisoformat(self.checkpoint.data["rendered_at"])
        if procs.world_size > 1:  # every process renders as process 0 does, to the second
            moment = [self.rendered_at]
            dist.broadcast_object_list(moment, src=0)
            self.rendered_at = moment[0]
        if self.tokenizer.chat_template is not None:
            self.tokenizer.chat_template.clock = self.rendered_at

        torch.manual_seed(config.seed)  # the head's initialisation
        model = RewardModel(load_backbone(self.model_path, dropout=config.dropout), config.head_config())
        model.transformer.gradient_checkpointing = config.grad_checkpoint
        if config.bag_coef > 0:
            ResponseBag.attach(model)
        self._check_model(model)

        self.train_pairs = load_pairs(train_file, "train", self.tokenizer, config, self.say)
        self.eval_pairs = load_pairs(eval_file, "test", self.tokenizer, config, self.say) if eval_file else None
        self.steps_per_epoch = self._check_data()
        self.data_digest = data_digest(self.train_pairs)  # a resumed run must train on the same pairs
        # held-out pairs that name their annotators: personal metrics too (minqr/training/personal_metrics.py)
        self.personal = PersonalEvaluation.for_run(self.train_pairs, self.eval_pairs, model.head_config, self.say,
                                                   cached=config.annotator_likelihood)
        # the training annotators' posteriors from the saved weights, and where their labels put the
        # scale (_training_annotators)
        self.final_annotators, self.final_scale = None, None
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.warmup_steps = round(config.warmup * self.total_steps)
        self.say(self._plan(model))
        # --master-weights: float32 copies of the bf16 weights are what AdamW steps on. Sharded, they are
        # the parameters themselves, kept float32, and FSDP2 casts them to bf16 for the compute;
        # unsharded, the optimizer holds them (MasterWeightAdamW).
        param_dtype = getattr(torch, config.param_dtype)
        sharded_masters = config.fsdp and config.master_weights
        self.model = model.to(procs.device, torch.float32 if sharded_masters else param_dtype).train()
        self.sharding = None  # FSDP2 and its sharded checkpoints: --fsdp runs only import them (0.75 s)
        if config.fsdp:  # before the optimizer, which must hold the sharded parameters
            from minqr.training import sharding
            self.sharding = sharding
            sharding.shard_model(self.model, compute_dtype=param_dtype if sharded_masters else None)
        self.optimizer = make_optimizer(self.model, config, procs.device,
                                        master_weights=config.master_weights and not config.fsdp)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: learning_rate_factor(s, self.warmup_steps, self.total_steps))
        self.average = self._weight_average()
        self.step, self.position = 0, DataPosition()
        self.divergence = DivergenceCheck(self.out, config, self.train_pairs.pair_margins, procs)
        # Each process draws its own dropout masks.
        torch.manual_seed(config.seed + 1 + procs.rank)
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        if config.compile:
            self.model.transformer.compile(dynamic=True)
        self.annotator_likelihood = AnnotatorLikelihood.for_run(config, self.model.head_config, self.train_pairs,
                                                                self.procs.world_size)
        objective = StepLoss(self.model, config.bag_coef, config.center_coef, config.lm_coef,
                             self.annotator_likelihood)
        self.objective = objective if procs.world_size == 1 or config.fsdp else nn.parallel.DistributedDataParallel(
            objective, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)

    # -- set-up ------------------------------------------------------------------------------

    def _check_setup(self) -> tuple:
        """(pairs of a micro-batch, the checkpoint to resume or None): what the options and the out
        folder allow with this many processes."""
        if self.config.fsdp and self.procs.world_size == 1:
            raise MinqrError("--fsdp shards the model over the processes that torchrun starts, and this is one "
                             "process: run it as torchrun --nproc_per_node N tools/train.py ... with N of at least "
                             "2, or drop --fsdp")
        config = self.config
        self._refuse_model_as_out(config.model)
        checkpoint = checkpoint_to_resume(self.out, asdict(config), resume=config.resume, overwrite=config.overwrite)
        return config.micro_batch_size(self.procs.world_size), checkpoint

    def _refuse_model_as_out(self, model) -> None:
        """--out may not be the folder of the model training starts from (a local path, or the cached
        copy of a hub model): the run would write over it."""
        if Path(model).exists() and Path(model).resolve() == self.out.resolve():
            raise MinqrError(f"--out {self.out} is the --model folder itself: training would write over the model it "
                             "starts from; choose another --out")

    def _check_model(self, model: RewardModel) -> None:
        """What the options ask of the backbone: ids for every token of --tokenizer, positions for
        --max-length, an LM head for --lm-coef."""
        tokenizer_from = (f"--tokenizer {self.config.tokenizer}" if self.config.tokenizer else
                          f"the tokenizer in {self.model_path}")
        check_vocabulary(self.tokenizer, model.transformer, tokenizer_from, f"--model {self.model_path}")
        check_max_length(model.transformer, self.config.max_length, "--max-length")
        if self.config.lm_coef > 0 and not hasattr(model.transformer, "lm_logits"):
            raise MinqrError(f"--lm-coef needs the backbone's language-model head, which minqr's "
                             f"{type(model.transformer).__name__} does not have; leave --lm-coef out")

    def _check_data(self) -> int:
        """The steps of an epoch: only full batches, so that every step has the same global batch,
        however it is divided up."""
        steps_per_epoch = len(self.train_pairs) // self.config.batch_size
        if steps_per_epoch == 0:
            raise MinqrError(f"--batch-size {self.config.batch_size} is more than the {len(self.train_pairs)} "
                             f"training pairs: lower it")
        return steps_per_epoch

    def _plan(self, model: RewardModel) -> str:
        """One line of what the run will cost, printed before it starts."""
        config, head = self.config, model.head_config
        backbone = sum(p.numel() for p in model.transformer.parameters())
        name = "GPT-2" if isinstance(model.transformer, GPT2) else model.transformer.config.model_type
        bag = "" if not config.bag_coef > 0 else (
            f" + {sum(p.numel() for p in model.response_bag.parameters()) / 1e6:.1f}M of the response-bag layer "
            "(training only)")
        return (f"plan: {self.total_steps:,} steps of {config.batch_size} pairs "
                f"({self.total_steps * config.batch_size / len(self.train_pairs):.2f} epochs of "
                f"{len(self.train_pairs):,} pairs); {name} of {backbone / 1e6:.1f}M parameters{bag}; head of "
                f"{head.num_quantiles} outputs trained by {head.objective}; on {self.procs.device} "
                f"x {self.procs.world_size} process{'es' if self.procs.world_size > 1 else ''}")


    def _weight_average(self) -> WeightAverage | None:
        """--ema-window: the average's time constant is that share of the steps. With --master-weights
        it averages the float32 masters, which keep what the bf16 weights round away."""
        config = self.config
        time_constant = config.ema_window * self.total_steps
        if config.ema_window > 0 and time_constant < 2:
            self.say(f"note: --ema-window {config.ema_window:g} of {self.total_steps} steps is less than 2 steps: "
                     "the weights are not averaged")
        if time_constant < 2:
            return None
        sources = self.optimizer.masters_by_weight() if isinstance(self.optimizer, MasterWeightAdamW) else None
        return WeightAverage(self.model, 1 - 1 / time_constant, self.warmup_steps, sources)

    def _restore(self, checkpoint) -> None:
        # a checkpoint is untrusted input: checked against this run before any of it is used
        check_resumable(checkpoint, model=self.model, optimizer=self.optimizer, average=self.average,
                        steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                        sharded=self.config.fsdp, data=self.data_digest)
        if checkpoint.model is None:  # a sharded checkpoint (--fsdp, which resuming cannot change)
            self.sharding.load_shards(checkpoint.folder, self.model, self.optimizer, self.average)
        try:  # what the checks above cannot foresee in torch's own loaders is still the checkpoint's fault
            if checkpoint.model is not None:
                self.model.load_state_dict(checkpoint.model)
                self.optimizer.load_state_dict(checkpoint.optimizer)
                if self.average:
                    self.average.load_state_dict(checkpoint.average)
            self.scheduler.load_state_dict(checkpoint.scheduler)
            if self.procs.rank < len(checkpoint.rng_states):
                restore_rng_state(checkpoint.rng_states[self.procs.rank])
        except torch.OutOfMemoryError:  # the device's, not the checkpoint's
            raise
        except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as error:
            raise MinqrError(f"--resume: {checkpoint.folder / STATE_FILE} is not a checkpoint this run can continue "
                             f"from: {type(error).__name__}: {str(error).splitlines()[0][:200]}; "
                             f"{START_AFRESH}") from None
        self.step, self.position = checkpoint.step, checkpoint.position
        self.divergence.saved_step = checkpoint.step
        if len(checkpoint.rng_states) != self.procs.world_size:
            self.say(f"warning: the checkpoint was written by {len(checkpoint.rng_states)} processes and this run "
                     f"has {self.procs.world_size}: dropout masks will differ from an uninterrupted run")
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
        log = MetricsLog(self.out / METRICS_FILE, resume_step=self.step if self.checkpoint else None,
                         report_to=config.report_to) if procs.is_main else None
        if procs.is_main:
            if self.checkpoint is None:  # a fresh start: no checkpoint of an earlier run may linger
                remove_checkpoints(self.out)
            self._write_training_args()
        bar = progress_bar(total=self.total_steps, initial=self.step, desc=f"train {config.head}", unit="step",
                           disable=not (self.progress and procs.is_main))
        started, resumed_at = time.perf_counter(), self.step
        try:
            with self.interrupt:
                final_eval = self._loop(bar, log)
        finally:
            bar.close()
            if log:
                log.close()
        if final_eval is None and self.eval_pairs is not None:  # resumed from the final checkpoint
            final_eval = self._evaluate(final=True)
        if self.average:  # the model to save is the average, which the last evaluation scored
            self.average.copy_into_model()
        self._check_weights()
        self._training_annotators()
        model = self._whole_model()
        if procs.is_main:
            self._save_model(model, final_eval)
            self._write_personal(final_eval)
            plot_curves(read_metrics(self.out / METRICS_FILE), self.out / CURVES_FILE)
        return TrainSummary(self.step, time.perf_counter() - started, self.out, final_eval, self.bayes_accuracy,
                            rank=procs.rank, resumed_at=resumed_at)

    def _loop(self, bar, log) -> dict | None:
        """The steps from self.step to the last; returns the last evaluation, if any."""
        config, final_eval = self.config, None
        while self.step < self.total_steps:
            batches = training_batches(self.train_pairs.row_widths(self.config.shared_prefix), self.config.batch_size,
                                           self.config.seed, self.position.epoch)
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
                    final_eval = self._evaluate(final=last)
                    scored = " (the weight average)" if self.average else ""
                    self.say(f"step {self.step}{scored}: " + ", ".join(
                        f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in final_eval.items()
                        if k != "step"))
                    if log:
                        log.write(final_eval)
                if last or _every(self.step, config.save_every) or self.interrupt.agreed is not None:
                    self._save_checkpoint()
                if self.interrupt.agreed is not None:  # Ctrl-C or SIGTERM: the step is finished and saved; stop here
                    # no process leaves while process 0 is still writing: torchrun answers the first exit
                    # by sending the others SIGTERM and, 30 s later, SIGKILL, which would cut a long save
                    self.procs.wait_for_all()
                    how = ("--annotator-likelihood runs cannot be resumed yet (its cached posteriors are not "
                           "checkpointed): run the command again with --overwrite to start afresh"
                           if config.annotator_likelihood else "continue with the same command plus --resume")
                    raise TrainingInterrupted(
                        f"interrupted at step {self.step} of {self.total_steps}; its checkpoint is in "
                        f"{self.out / 'checkpoint'}: {how}", self.interrupt.status)
                if last:
                    break
        return final_eval

    def _train_step(self, pair_indices: list) -> dict:
        config, procs = self.config, self.procs
        started = time.perf_counter()
        micro_batches = [self.train_pairs.batch(ix, config.shared_prefix).to(procs.device)
                         for ix in process_micro_batches(pair_indices, procs.rank, self.micro_batch_size,
                                                         config.grad_accum)]
        # What each process's loss is the mean over: its share of the step's pairs and LM target tokens.
        # DistributedDataParallel averages the processes' gradients, which makes it the step's mean.
        pairs, lm_tokens = config.batch_size // procs.world_size, 1.0
        if config.lm_coef > 0:
            (lm_tokens,) = procs.all_sum([sum(float((b.chosen_lm_labels != IGNORE_INDEX).sum())
                                              for b in micro_batches)])
            lm_tokens = max(lm_tokens, 1.0) / procs.world_size
        loss_sum = torch.zeros((), dtype=torch.float64, device=procs.device)
        right = torch.zeros((), dtype=torch.float64, device=procs.device)
        # responses whose outputs are not finite: σ saturates at ±inf, so the loss alone stays finite
        nonfinite = torch.zeros((), dtype=torch.float64, device=procs.device)
        for k, batch in enumerate(micro_batches):
            # DDP and FSDP average the gradients in the last micro-batch's backward; the others only add up
            last = k == len(micro_batches) - 1
            if config.fsdp:
                self.model.set_requires_gradient_sync(last)
            with nullcontext() if last or procs.world_size == 1 or config.fsdp else self.objective.no_sync():
                with autocast(procs.device, self.autocast_dtype):
                    loss, mu_chosen, mu_rejected = self.objective(batch, pairs, lm_tokens)
                loss.backward()
            loss_sum += loss.detach()
            right += ranking_credit(mu_chosen, mu_rejected).sum()
            nonfinite += (~torch.isfinite(mu_chosen)).sum() + (~torch.isfinite(mu_rejected)).sum()
        real_tokens = sum(b.num_real_tokens for b in micro_batches)
        # the processes agree on a Ctrl-C or SIGTERM here, so that all of them stop after the same step
        loss_value, right_value, real_tokens, nonfinite, *signals = procs.all_sum(
            [loss_sum.item(), right.item(), real_tokens, nonfinite.item(), *self.interrupt.flags()])
        loss_value /= procs.world_size  # the processes' means, summed
        self.interrupt.agree(signals)
        self.divergence.check_value("the loss", loss_value, self.step + 1)
        if nonfinite:
            raise self.divergence.error(f"the head's outputs are not finite ({int(nonfinite):,} of the step's "
                                        "responses)", self.step + 1)
        if config.max_grad_norm > 0:
            # with master weights, their float32 copies of the gradients: the norm and the scaling in float32
            clipped = self.optimizer.float32_gradients() if isinstance(self.optimizer, MasterWeightAdamW) \
                else self.model.parameters()
            grad_norm = float(full_value(nn.utils.clip_grad_norm_(clipped, config.max_grad_norm)))
            self.divergence.check_value("the gradient norm", grad_norm, self.step + 1)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if self.average:
            self.average.update(self.step + 1)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        return {"step": self.step + 1, "loss": loss_value, "accuracy": right_value / config.batch_size,
                "lr": lr, "tokens_per_s": real_tokens / seconds, "pairs_per_s": config.batch_size / seconds}

    def _check_weights(self) -> None:
        """Before anything is saved: every weight, the weight average and the optimizer's state (its
        moments, the masters of --master-weights) must be finite: a moment that overflowed stops its
        weight from moving, and a checkpoint holding it could not be resumed."""
        named = list(self.model.named_parameters()) + (self.average.named_averages() if self.average else [])
        names = {p: name for name, p in self.model.named_parameters()}
        if isinstance(self.optimizer, MasterWeightAdamW):  # its parameters are the float32 masters
            for weight, master in self.optimizer.masters_by_weight().items():
                names[master] = f"the float32 master of {names[weight]}"
                named.append((names[master], master))
        for group in self.optimizer.param_groups:  # the same order on every process
            for p in group["params"]:
                named += [(f"the optimizer's {key} of {names.get(p, 'a parameter')}", value)
                          for key, value in self.optimizer.state.get(p, {}).items()
                          if isinstance(value, torch.Tensor) and value.is_floating_point()]
        self.divergence.check_weights(named, self.step)

    def _evaluate(self, final: bool = False) -> dict:
        """Held-out metrics of the model, or of its weight average where the run keeps one; `final`:
        the run's last evaluation, of the weights it saves."""
        config, average = self.config, self.average
        with average.swapped_in() if average else nullcontext():
            if config.fsdp and average:  # the forwards must gather the average, not what a unit holds gathered
                self.sharding.reshard(self.model)
            log_posteriors = self._held_out_posteriors(final)
            metrics = held_out_metrics(self.model, self.eval_pairs, self.micro_batch_size, config.shared_prefix,
                                       self.procs, self.autocast_dtype, sharded=config.fsdp,
                                       personal=self.personal, log_posteriors=log_posteriors)
        if config.fsdp and average:  # and the training's next forward the weights again
            self.sharding.reshard(self.model)
        return {"step": self.step, **metrics}

    def _held_out_posteriors(self, final: bool):
        """The held-out annotators' log-posteriors [A, N] for the personal metrics, or None for none
        at this evaluation. The final evaluation's come from a pass of the weights it scores over the
        training pairs, which annotators.json is then saved from (no second pass); earlier ones use
        the annotator-level likelihood's cache once it has one, since a pass at each evaluation
        costs a scoring of most of the training pairs (docs/personal.md)."""
        if self.personal is None:
            return None
        if final:
            if self.train_pairs.annotators is None:  # nobody is known: everyone is the population
                return self.personal.log_posteriors(None)
            self.final_annotators, self.final_scale = training_posteriors(
                self.model, self.train_pairs, self.micro_batch_size, self.config.shared_prefix, self.procs,
                self.autocast_dtype, sharded=self.config.fsdp, progress=self.progress)
            return self.personal.log_posteriors(self.final_annotators.log_posteriors)
        cache = self.annotator_likelihood.log_posterior if self.annotator_likelihood is not None else None
        return None if cache is None else self.personal.log_posteriors(cache)

    # -- files -------------------------------------------------------------------------------

    def _training_args(self) -> dict:
        """training_args.json: the options as given (so that the file is a config for `minqr train
        --config`) and the facts of the run (config.RUN_FACTS), which a config file passes over."""
        return {**asdict(self.config), "processes": self.procs.world_size, "device_used": str(self.procs.device),
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
        write_shards = None
        if self.config.fsdp:  # every process writes its shards into the folder that process 0 is filling
            def write_shards(folder):
                self.sharding.save_shards(self.procs.broadcast(folder), self.model, self.optimizer, self.average)
        if self.procs.is_main:
            save_checkpoint(self.out, step=self.step, position=self.position, model=self.model,
                            optimizer=self.optimizer, scheduler=self.scheduler, rng_states=rng_states,
                            config=asdict(self.config), compute=self.compute,
                            data={"sha256": self.data_digest, "rendered_at": self.rendered_at.isoformat()},
                            average=self.average.state_dict() if self.average else None, write_shards=write_shards)
        elif write_shards:
            write_shards(None)
        self.divergence.saved_step = self.step

    def _whole_model(self) -> RewardModel | None:
        """The model to save: the model itself, or, sharded (--fsdp), an unsharded copy gathered on
        process 0's CPU (None in the others; every process must call this)."""
        if not self.config.fsdp:
            return self.model
        state = self.sharding.full_state_dict(self.model)
        if not self.procs.is_main:
            return None
        with torch.device("meta"):  # no memory, no init: the gathered tensors become the weights
            backbone = self.model.transformer
            whole = RewardModel(type(backbone)(backbone.config), self.model.head_config)
            if self.config.bag_coef > 0:
                ResponseBag.attach(whole)
        whole.load_state_dict(state, assign=True)
        return whole.to(getattr(torch, self.config.param_dtype))  # --master-weights: the masters' bf16 rounding

    def _save_model(self, model: RewardModel, final_eval: dict | None) -> None:
        reward_stats = None if final_eval is None else {
            "mean": final_eval["eval_reward_mean"], "std": final_eval["eval_reward_std"]}
        model.save_pretrained(self.out, tokenizer=self.tokenizer, training_args=self._training_args(),
                                   reward_stats=reward_stats)
        self._save_annotators(model)

    def _training_annotators(self) -> None:
        """The posteriors of the annotators the training data names, and where their labels put the
        scale, of the weights to be saved: the final evaluation's pass made them when it scored
        personal metrics, else one pass now, shared over the processes like it (every process must
        call this). A head without kinds has none."""
        head = self.model.head_config
        if self.final_annotators is not None or self.train_pairs.annotators is None or \
                not has_kinds(head.objective, head.num_quantiles):
            return
        if self.config.fsdp:  # the forwards must gather the saved weights, not what a unit holds gathered
            self.sharding.reshard(self.model)
        self.final_annotators, self.final_scale = training_posteriors(
            self.model, self.train_pairs, self.micro_batch_size, self.config.shared_prefix, self.procs,
            self.autocast_dtype, sharded=self.config.fsdp, progress=self.progress)

    def _save_annotators(self, model: RewardModel) -> None:
        """The posteriors of the annotators the training data names, beside the model
        (minqr/study/personalize.py)."""
        save_annotators(model, self.train_pairs, self.out, self.say, self.final_annotators, self.final_scale)

    def _write_personal(self, final_eval: dict | None) -> None:
        """The final evaluation's per-annotator figures in eval_annotators.json, and a line of them;
        a run without them removes the file of a run it replaced."""
        path = self.out / PERSONAL_EVAL_FILE
        if self.personal is None or final_eval is None or self.personal.tallied is None:
            if path.exists():
                path.unlink()
                self.say(f"removed {path}: the personal metrics of the run this one replaced")
            return
        self.personal.write(self.out, final_eval)
        self.say(self.personal.summary(final_eval) + f"; per annotator in {path}")


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0
