"""Held-out metrics of a reward model during training, over all processes:

    eval_loss          the head's objective alone, per pair (for all but paper, the negative
                       log-likelihood of the held-out labels)
    eval_accuracy      the share of pairs whose chosen response gets the larger expected reward
                       (a tie counts half: minqr/ranking.py)
    eval_reward_mean   the mean and the standard deviation of the expected reward over every
    eval_reward_std    held-out response (saved with the model, for users who normalise rewards)
    eval_margin        the mean of μ_c − μ_r

When the held-out pairs name their annotators and the head is a mixture, the personal metrics of
minqr/training/personal_metrics.py join them (`personal`: the tally of this evaluation).
`training_posteriors` is the pass over the training pairs that gives the final evaluation its
posteriors and annotators.json its content (the loop runs it after the last step when no
evaluation did).

The data's pair margins are left out: a margin is a training device that asks for a wider gap, not
part of the model, and without it eval_loss compares between runs and data sets with margins and
without.
"""
import math

import numpy as np
import torch

from minqr.data.batching import TokenizedPairs, evaluation_batches, scoring_batches
from minqr.device import autocast
from minqr.distribution.personal import Annotators, kind_margin_sums
from minqr.distribution.scale import ScaleFit, fit_scale
from minqr.models.reward import RewardModel
from minqr.progress import progress_bar
from minqr.ranking import ranking_credit
from minqr.training.distributed import Processes
from minqr.training.personal_metrics import PersonalEvaluation


@torch.no_grad()
def held_out_metrics(model: RewardModel, pairs: TokenizedPairs, batch_size: int, shared_prefix: bool,
                     procs: Processes, autocast_dtype, sharded: bool = False,
                     personal: PersonalEvaluation | None = None, log_posteriors: torch.Tensor | None = None) -> dict:
    """The metrics above of `model` on `pairs`, in batches of `batch_size` pairs. Each process scores
    every world_size-th batch, or, `sharded` (--fsdp), every batch, since each forward is then a
    collective that all take part in. With `personal` and the held-out annotators' `log_posteriors`
    [A, N], the personal metrics too. The model is left in training mode."""
    model.eval()
    tally = None if personal is None or log_posteriors is None else personal.tally(log_posteriors, procs.device)
    totals = np.zeros(5)  # loss, right, reward sum, reward square sum, margin sum
    share, shares = (0, 1) if sharded else (procs.rank, procs.world_size)
    for pair_indices in evaluation_batches(pairs.row_widths(shared_prefix), batch_size, share, shares):
        batch = pairs.batch(pair_indices, shared_prefix).to(procs.device)
        with autocast(procs.device, autocast_dtype):
            r_chosen, r_rejected = (r.float() for r in model.forward_pairs(batch))  # [B, N] each
            loss = model.head_config.loss(r_chosen, r_rejected, reduction="sum")  # no pair margins
        mu_chosen, mu_rejected = r_chosen.mean(-1), r_rejected.mean(-1)  # [B]
        rewards = torch.cat([mu_chosen, mu_rejected]).double()  # [2B]
        totals += [loss.item(), ranking_credit(mu_chosen, mu_rejected).sum().item(), rewards.sum().item(),
                   (rewards ** 2).sum().item(), (mu_chosen - mu_rejected).sum().item()]
        if tally is not None:
            tally.add(batch.annotators, r_chosen, r_rejected)
    loss, right, reward_sum, reward_square_sum, margin_sum = totals.tolist() if sharded else \
        procs.all_sum(totals.tolist())
    model.train()
    count = len(pairs)
    mean = reward_sum / (2 * count)
    metrics = {"eval_loss": loss / count, "eval_accuracy": right / count, "eval_reward_mean": mean,
               "eval_reward_std": math.sqrt(max(reward_square_sum / (2 * count) - mean ** 2, 0.0)),
               "eval_margin": margin_sum / count}
    if tally is not None:
        counts = tally.summed(procs, sharded)
        metrics.update(personal.metrics(counts))
        personal.tallied = counts.cpu()  # the per-annotator figures, for the run's eval_annotators.json
    return metrics


@torch.no_grad()
def training_posteriors(model: RewardModel, pairs: TokenizedPairs, batch_size: int, shared_prefix: bool,
                        procs: Processes, autocast_dtype, sharded: bool = False,
                        progress: bool = False) -> tuple[Annotators, ScaleFit]:
    """(posteriors, scale): the posteriors of the annotators of the training `pairs` (they name them)
    from one pass of `model` in eval mode, shared over the processes as held_out_metrics shares its
    batches, and where the same labels put the kinds' scale (minqr/distribution/scale.py); every
    process gets both. The pairs' margins count, as in annotators.json
    (minqr/distribution/personal.py). `progress`: a bar on process 0."""
    model.eval()
    differences, annotators, margins = [], [], []  # this process's pairs: [B, N], [B], [B] a batch
    share, shares = (0, 1) if sharded else (procs.rank, procs.world_size)
    # scoring's order (widest first, widths sorted: the least padding), each process every shares-th batch
    batches = scoring_batches(pairs.row_widths(shared_prefix), batch_size)[share::shares]
    for pair_indices in progress_bar(iterable=batches, desc="annotators", unit="batch",
                                     disable=not (progress and procs.is_main)):
        batch = pairs.batch(pair_indices, shared_prefix).to(procs.device)
        with autocast(procs.device, autocast_dtype):
            r_chosen, r_rejected = (r.float() for r in model.forward_pairs(batch))  # [B, N] each
        differences.append(r_chosen.double() - r_rejected.double())  # [B, N], as log_likelihood_sums takes them
        annotators.append(batch.annotators)
        if batch.pair_margins is not None:
            margins.append(batch.pair_margins)
    model.train()
    num_annotators = len(pairs.annotator_ids)
    empty = torch.zeros(0, model.num_quantiles, dtype=torch.float64, device=procs.device)  # a process without pairs
    differences = torch.cat(differences) if differences else empty
    annotators = torch.cat(annotators) if annotators else torch.zeros(0, dtype=torch.long, device=procs.device)
    margins = torch.cat(margins) if margins else None
    all_sum = None if sharded else procs.all_sum_tensor
    sums = kind_margin_sums(differences, annotators, num_annotators, margins)  # [A, N], this process's pairs
    if all_sum is not None:
        sums = all_sum(sums)
    counts = torch.bincount(torch.tensor(pairs.annotators, dtype=torch.long), minlength=num_annotators).tolist()
    posteriors = Annotators.from_sums(tuple(pairs.annotator_ids), sums, tuple(counts))  # the prior fitted to them
    return posteriors, fit_scale(differences, annotators, num_annotators, margins, all_sum)
