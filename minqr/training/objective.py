"""The objective of a training step. It is the mean over the step's pairs of

    the head's objective on (h_c, h_r)                  minqr/objectives/, e.g. the mixture's
                                                        -log mean_i sigma(h_c,i - h_r,i)
    + bag_coef · the response bag-of-words auxiliary    RewardModel.response_bag_loss
    + center_coef · (μ_c + μ_r)²                        TRL's reward centring: keeps rewards near 0

plus lm_coef · (the mean token cross-entropy of the chosen responses), MOSS-RLHF's LM term, where
μ is a response's expected reward, the mean of its outputs. The scalar head is N = 1: the
Bradley–Terry loss −log σ(r_c − r_r). When the data gives pair margins m (its `margin` column, as in
TRL), the batch carries them and the head's objective compares r_c − r_r − m (the scalar head:
−log σ(r_c − r_r − m); where each objective takes m: minqr/objectives/references.py).

With `--annotator-likelihood` and data that names its annotators, the head's objective of a
mixture becomes, after one pass over the data by the per-label objective above (the warm start),
the annotator-level likelihood: each annotator's labels all come from one kind,

    L_a = −log Σ_k (1/N) Π_{j∈D_a} σ(h_k(c_j) − h_k(r_j) − m_j)

summed over the annotators. Its gradient with respect to pair j's outputs is that of
−Σ_k q_a(k) log σ(h_k(c_j) − h_k(r_j) − m_j) with q_a the annotator's posterior over the kinds
held fixed (AnnotatorLikelihood): a batch needs only its own pairs and q_a, which is cached from
the per-pair log-likelihoods of the last pass over the data (measured: as good as the exact
gradient). From a random start the annotator-level likelihood can settle in a bad optimum with many
labels per annotator; the warm start avoids it.

Neither processes nor gradient accumulation change the arithmetic beyond float rounding: every
micro-batch's loss is a sum over its pairs divided by the global batch size (times the number of
processes, which DistributedDataParallel's averaging divides back out).
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from minqr.data.batching import IGNORE_INDEX
from minqr.distribution.personal import check_personal, log_likelihood_sums, normalised
from minqr.errors import MinqrError
from minqr.models.reward import RewardModel
from minqr.training.config import TrainConfig


class PairObjective(nn.Module):
    """One micro-batch's contribution to the step's objective, as a module, so that
    DistributedDataParallel sees a `forward` (it synchronises gradients around that call).

    Returns the loss to backpropagate (already divided by the global batch, see the module
    docstring) and the expected rewards μ_c, μ_r `[B]` for the accuracy.
    """

    def __init__(self, model: RewardModel, config: TrainConfig,
                 annotator_likelihood: "AnnotatorLikelihood | None" = None):
        super().__init__()
        self.model = model
        self.config = config
        self.annotator_likelihood = annotator_likelihood

    def forward(self, batch, pairs_in_step: int, lm_tokens_in_step: float):
        c = self.config
        # the head's objective (+ the response bag auxiliary), summed over the pairs; float32 [B, N] outputs
        loss, r_chosen, r_rejected, *hidden = self.model.pair_loss(batch, "sum", c.bag_coef,
                                                                   return_hidden=c.lm_coef > 0)
        if self.annotator_likelihood is not None:
            per_annotator = self.annotator_likelihood(r_chosen, r_rejected, batch.annotators, batch.pair_margins)
            if per_annotator is not None:  # after the warm start: it replaces the per-label objective
                per_label = self.model.head_config.loss(r_chosen, r_rejected, reduction="sum",
                                                        pair_margin=batch.pair_margins)
                loss = loss - per_label + per_annotator.sum()
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


class AnnotatorLikelihood:
    """The annotator-level likelihood's per-pair terms, −Σ_k q_a(k) log σ(h_k(c_j) − h_k(r_j) − m_j),
    with q_a cached from the last pass over the training pairs (module docstring).

    Every call adds its pairs' log σ(·) [B, N] (detached, float64) to its annotators' running sums
    [A, N]; once the calls have seen `num_pairs` pairs (this process's share of a pass), the sums
    (added over the processes) become the cache, and the next pass starts new ones. Before the first
    cache a call returns None: the per-label objective trains meanwhile (the warm start)."""

    def __init__(self, num_annotators: int, num_kinds: int, num_pairs: int, objective: str):
        try:
            check_personal(objective, num_kinds)  # only a mixture's outputs are kinds
        except MinqrError as error:
            raise MinqrError(f"--annotator-likelihood: {error}") from None
        if num_annotators < 1:
            raise MinqrError("--annotator-likelihood needs training data that names its annotators (an 'annotator' "
                             "field, or the one --annotator-field names); --data names none")
        self.num_annotators, self.num_pairs = num_annotators, num_pairs
        self.running = torch.zeros(num_annotators, num_kinds, dtype=torch.float64)  # [A, N]
        self.seen = 0
        self.log_posterior = None  # [A, N] log q_a from the last pass; None during the warm start

    def __call__(self, r_chosen: torch.Tensor, r_rejected: torch.Tensor, annotators: torch.Tensor,
                 pair_margin: torch.Tensor | None) -> torch.Tensor | None:
        """Raw outputs [B, N] each, annotator indices [B], margins [B] or None -> per-pair terms [B]
        (float32, with gradients), or None during the warm start."""
        if annotators is None:
            raise MinqrError("--annotator-likelihood: a training batch has no annotator ids")
        margins = r_chosen - r_rejected
        if pair_margin is not None:
            margins = margins - pair_margin[:, None]
        log_sigma = F.logsigmoid(margins)  # [B, N]
        terms = None
        if self.log_posterior is not None:
            q = self.log_posterior.to(margins.device)[annotators.to(margins.device)].exp().to(margins.dtype)  # [B, N]
            terms = -(q * log_sigma).sum(-1)
        with torch.no_grad():
            self.running = self.running.to(margins.device)
            self.running += log_likelihood_sums(r_chosen.detach(), r_rejected.detach(), annotators.to(margins.device),
                                                self.num_annotators, pair_margin)
        self.seen += len(annotators)
        if self.seen >= self.num_pairs:  # a pass is over: its sums are the cache
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(self.running)
            self.log_posterior, self.running = normalised(self.running), torch.zeros_like(self.running)
            self.seen = 0
        return terms
