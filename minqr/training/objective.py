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

Neither processes nor gradient accumulation change the arithmetic beyond float rounding: every
micro-batch's loss is a sum over its pairs divided by the global batch size (times the number of
processes, which DistributedDataParallel's averaging divides back out).
"""

import torch.nn as nn
import torch.nn.functional as F

from minqr.data.batching import IGNORE_INDEX
from minqr.models.reward import RewardModel
from minqr.training.config import TrainConfig


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
        loss, r_chosen, r_rejected, *hidden = self.model.pair_loss(batch, "sum", c.bag_coef,
                                                                   return_hidden=c.lm_coef > 0)
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
