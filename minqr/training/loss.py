"""The loss of a training step, all of it, in `StepLoss.forward`. Over the pairs a process takes in a
step it is the mean of

    the head's objective on (h_c, h_r)                  minqr/objectives/, e.g. the mixture's
                                                        -log mean_i sigma(h_c,i - h_r,i)
    + bag_coef · the response bag-of-words auxiliary    ResponseBag, below
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
the per-pair log-likelihoods of the last pass over the data. With a linear model on the synthetic
task's tags, that cache gave the exact gradient's results, and from a random start the
annotator-level likelihood settled in a bad optimum at 100 labels per annotator, which the warm
start avoided.

Each term is reduced once: the per-pair terms are added up pair by pair and summed, the LM term is
summed over tokens, and each sum is divided by what the process's share of the step holds. So
neither gradient accumulation (micro-batches add their sums) nor processes (DistributedDataParallel
averages the processes' gradients) change the arithmetic beyond float rounding.

The model only computes: it returns the pooled states and the head's outputs, and knows nothing of
what training adds to them.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from minqr.data.batching import IGNORE_INDEX
from minqr.distribution.personal import check_personal, log_likelihood_sums, normalised
from minqr.errors import MinqrError
from minqr.models.reward import RewardModel


class ResponseBag(nn.Linear):
    """The response bag-of-words auxiliary: a linear map n_embd -> vocabulary from a response's
    pooled state to which tokens the response holds.

    Why: a head can only spread the outputs of a response on what its pooled (last-token) state
    encodes. Trained on preference labels alone, a small backbone keeps only what moves the expected
    reward; what annotators disagree about averages out of that, so the state forgets it, and the N
    outputs have nothing to separate on (measured on the synthetic task: the tags that split the
    annotators were not linearly decodable from the state). Asking the state to name its response's
    tokens keeps them all.

    `attach` puts the layer on the model as its submodule `response_bag`, so that the optimizer,
    the sharding, the weight average and the checkpoint carry it as one of the model's weights;
    `RewardModel.save_pretrained` writes the backbone and the head only, so it never leaves training.
    """

    @classmethod
    def attach(cls, model: RewardModel) -> "ResponseBag":
        config, weight = model.transformer.config, model.score.weight
        model.response_bag = cls(config.hidden_size, config.vocab_size, device=weight.device, dtype=weight.dtype)
        return model.response_bag

    def loss(self, pooled_chosen: torch.Tensor, pooled_rejected: torch.Tensor,
             response_ids: torch.Tensor) -> torch.Tensor:
        """Per pair [B]: its chosen plus its rejected response's loss.

        pooled_chosen, pooled_rejected [B, n_embd]; response_ids [2B, L] (the B chosen then the B
        rejected responses' tokens, IGNORE_INDEX padding). Per response, a multi-label logistic loss
        over the vocabulary against the set of its tokens, balanced: the mean over the response's
        tokens plus the mean over all other tokens, so that its size does not grow with the
        vocabulary (a 50k vocabulary and the demo's few hundred tokens take the same coefficient)."""
        logits = self(torch.cat([pooled_chosen, pooled_rejected])).float()  # [2B, V]
        vocab = logits.shape[1]
        present = torch.zeros(logits.shape[0], vocab + 1, device=logits.device)  # a last column for the padding
        present.scatter_(1, response_ids.masked_fill(response_ids == IGNORE_INDEX, vocab), 1.0)
        present = present[:, :vocab]  # [2B, V]: 1 where the token is in the response
        per_token = F.binary_cross_entropy_with_logits(logits, present, reduction="none")  # [2B, V]
        count = present.sum(1)
        per_response = ((per_token * present).sum(1) / count.clamp(min=1)
                        + (per_token * (1 - present)).sum(1) / (vocab - count).clamp(min=1))  # [2B]
        chosen, rejected = per_response.chunk(2)  # [B] each
        return chosen + rejected


class StepLoss(nn.Module):
    """One micro-batch's part of the step's loss, as a module, so that DistributedDataParallel sees a
    `forward` (it synchronises gradients around that call). The options are TrainConfig's."""

    def __init__(self, model: RewardModel, bag_coef: float = 0.0, center_coef: float = 0.0, lm_coef: float = 0.0,
                 annotator_likelihood: "AnnotatorLikelihood | None" = None):
        super().__init__()
        self.model = model
        self.bag_coef, self.center_coef, self.lm_coef = bag_coef, center_coef, lm_coef
        self.annotator_likelihood = annotator_likelihood

    def forward(self, batch, pairs: float, lm_tokens: float) -> tuple:
        """A PairBatch -> (loss, μ_c [B], μ_r [B]): the loss to backpropagate, the batch's part of the
        mean over `pairs` pairs and `lm_tokens` LM target tokens (this process's share of the step:
        the micro-batches' parts add up to it); the expected rewards, detached, for the accuracy."""
        model = self.model
        # hidden [R, T, n_embd], pooled [B, n_embd] each, the head's outputs [B, N] each
        hidden, pooled_chosen, pooled_rejected, r_chosen, r_rejected = model.pair_states(batch)
        # The objectives compute in float32 whatever the backbone's autocast dtype.
        r_chosen, r_rejected = r_chosen.float(), r_rejected.float()
        mu_chosen, mu_rejected = r_chosen.mean(-1), r_rejected.mean(-1)  # [B]

        # What the head is trained by: its objective, with the data's pair margins if it gave them.
        per_pair = model.head_config.loss(r_chosen, r_rejected, reduction="none", pair_margin=batch.pair_margins)
        if self.annotator_likelihood is not None:  # after its warm start, it replaces the per-label objective
            per_annotator = self.annotator_likelihood(r_chosen, r_rejected, batch.annotators, batch.pair_margins)
            per_pair = per_pair if per_annotator is None else per_annotator
        if self.bag_coef > 0:  # keep in the pooled state what the annotators disagree about (ResponseBag)
            per_pair = per_pair + self.bag_coef * model.response_bag.loss(pooled_chosen, pooled_rejected,
                                                                         batch.response_ids)
        if self.center_coef > 0:  # pin the rewards' offset, which the pairwise objectives leave free
            per_pair = per_pair + self.center_coef * (mu_chosen + mu_rejected) ** 2
        loss = per_pair.sum() / pairs

        if self.lm_coef > 0:  # keep the backbone a language model of the chosen responses
            targets = batch.chosen_lm_labels != IGNORE_INDEX  # [R, T]
            logits = model.transformer.lm_logits(hidden[targets])  # [targets, vocab]
            token_sum = F.cross_entropy(logits.float(), batch.chosen_lm_labels[targets], reduction="sum")
            loss = loss + self.lm_coef * token_sum / lm_tokens
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

    @classmethod
    def for_run(cls, config, head, pairs, world_size: int) -> "AnnotatorLikelihood | None":
        """The cache of a training run (TrainConfig `config`, the model's HeadConfig `head`, the
        TokenizedPairs of --data), or None without --annotator-likelihood."""
        if not config.annotator_likelihood:
            return None  # (TrainConfig refuses it with --resume: the cache is not in the checkpoint)
        return cls(len(pairs.annotator_ids), head.num_quantiles, max(1, len(pairs) // world_size), head.objective)

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
