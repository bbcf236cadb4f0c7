"""The objectives: what the N outputs of a response mean, and the formula that trains them.

A reward model reads a response's pooled (last-token) state x and puts out N numbers, h = W x with
W of shape [N, n_embd]. A preference pair gives h_c for the chosen response and h_r for the
rejected one, [N] each. The OBJECTIVE says what those numbers are and trains them accordingly; it
is part of the head, saved with it (config.json's `minqr` section), because what a user may read
out of the outputs depends on it.

The objectives, per pair (outputs [N]; batches are [B, N] and the loss is per pair, then reduced):

- `bradley_terry`, the scalar head (N = 1): L = -log sigma(h_c - h_r). One reward per response;
  its differences are log-odds of preference. Every objective below is exactly this at N = 1
  (`paper` with lam = 0), which the tests check.

- `mixture`: the label came from one of N equally likely KINDS of annotator, and kind i scores a
  response with output i. The likelihood of the label is the average over kinds:

      L = -log( (1/N) sum_i sigma(h_c,i - h_r,i) )

  With d_i = h_c,i - h_r,i and w = softmax_i(log sigma(d_i)) (how much each kind explains this
  label): dL/dh_c,i = -w_i sigma(-d_i) = -dL/dh_r,i. Output i is then kind i's reward, and over
  the population of annotators a response's reward takes each of the N values with probability
  1/N: SORTED, they are the quantiles of that distribution at tau_i = (2i+1)/(2N). Never sort
  inside the loss (kind i must stay kind i from one response to the next); sort at read-out. The
  mean of the outputs is the expected reward, unchanged by sorting, and ranks responses.

- `independent`: the two rewards of a pair are independent draws from each response's
  distribution (N atoms each), and the label is Bradley-Terry on the draws:

      L = -log( (1/N^2) sum_i sum_j sigma(h_c,i - h_r,j) )

  Sorted at read-out as well. It does not tie the outputs of two responses to a kind, so it cannot
  tell "the same people disagree" from "different people disagree".

- `paper`: the seed paper's loss, kept to reproduce it (docs/design.md#paper-loss): output i
  is the quantile at tau_i directly (read out raw), trained by Bradley-Terry on the means plus a
  quantile-Huber term whose targets are the PARTNER's quantiles shifted by a margin m:

      L = -log sigma(mean h_c - mean h_r) + lam * 1/2 * 1/N * sum_ij [rho_tau_i(u_ij) + rho_tau_i(v_ij)]
      u_ij = (h_r,j + m) - h_c,i,  v_ij = (h_c,j - m) - h_r,i   (targets detached)
      rho_tau(u) = |tau - 1{u<0}| * H_kappa(u) / kappa,  H_kappa the Huber function

  Measured on the synthetic task, where the truth is known, it ranks well but its spread does not
  follow the annotators' disagreement (docs/objectives.md#paper): partner-quantiles +- m are not
  samples of the response's own reward, which is what makes QR-DQN's targets identify a
  distribution.

Why a mixture identifies a distribution where pairs of single labels seem too little: each label
is one annotator's, and annotators of the same kind agree across pairs. A response that the kinds
rank differently makes the labels of its pairs inconsistent in a way that one scalar reward cannot
explain but N kinds can. What it cannot identify is a constant per output: kind i's rewards may all
be shifted by c_i without changing a single d_i. Spreads are therefore measured after aligning the
outputs on an anchor response whose reward is known to be 0 for everyone (the synthetic task has
one; minqr/study/analysis.py aligns by it).

A PAIR margin m (the data's `margin`, as in TRL and OpenRLHF: how much the chosen response should
beat the rejected one by) enters the pairwise comparisons: bradley_terry, mixture and independent
compare sigma(h_c,i - h_r,j - m), the formulas above on the chosen outputs shifted by -m; paper
takes it in its Bradley-Terry term on the means only, -log sigma(mean h_c - mean h_r - m), and
not in the quantile-Huber targets, which have their own hyper-parameter m, the `margin` above
(minqr/objectives/loss.py, pair_loss).

This module holds each objective's PyTorch reference: the formula, line by line, from which
autograd gives the gradients and against which the fused ops (minqr/objectives/ops.py, csrc/) are
tested. minqr/objectives/loss.py says which objectives there are and computes any of them;
minqr/models/head.py is the head as saved with a model.
"""
import math

import torch
import torch.nn.functional as F


def quantile_levels(n: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """tau_i = (2i+1)/(2N), i = 0..N-1: the midpoints of N equal probability bins."""
    if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return (2 * torch.arange(n, dtype=dtype, device=device) + 1) / (2 * n)


# ---------------------------------------------------------------------------------------------
# The references: each objective's formula in plain PyTorch. They compute in float32 (float64 for
# float64 inputs) and return per-pair losses [B] in that dtype, also for float16/bfloat16 inputs:
# a loss averaged in bfloat16 would lose the digits that training curves are read from.


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def bradley_terry_reference(h_chosen: torch.Tensor, h_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigma(h_c - h_r) per pair, [B, 1] outputs -> [B]."""
    dtype = _compute_dtype(h_chosen)
    return -F.logsigmoid(h_chosen.to(dtype) - h_rejected.to(dtype)).squeeze(1)


def mixture_reference(h_chosen: torch.Tensor, h_rejected: torch.Tensor) -> torch.Tensor:
    """-log((1/N) sum_i sigma(h_c,i - h_r,i)) per pair, [B, N] outputs -> [B].

    In log space, so that no sigma underflows: log sigma(d_i) is -softplus(-d_i), and the average
    over kinds is a logsumexp minus log N."""
    dtype = _compute_dtype(h_chosen)
    d = h_chosen.to(dtype) - h_rejected.to(dtype)  # [B, N]: kind i's reward difference
    return math.log(d.shape[1]) - torch.logsumexp(F.logsigmoid(d), dim=1)


def independent_reference(h_chosen: torch.Tensor, h_rejected: torch.Tensor) -> torch.Tensor:
    """-log((1/N^2) sum_ij sigma(h_c,i - h_r,j)) per pair, [B, N] outputs -> [B]."""
    dtype = _compute_dtype(h_chosen)
    n = h_chosen.shape[1]
    d = h_chosen.to(dtype)[:, :, None] - h_rejected.to(dtype)[:, None, :]  # [B, i, j]
    return 2 * math.log(n) - torch.logsumexp(F.logsigmoid(d).flatten(1), dim=1)


def _quantile_huber(u: torch.Tensor, tau: torch.Tensor, kappa: float) -> torch.Tensor:
    """rho_tau(u) = |tau - 1{u<0}| * H_kappa(u) / kappa, elementwise (tau broadcasts over u)."""
    weight = (tau - (u < 0).to(u.dtype)).abs()
    huber = torch.where(u.abs() <= kappa, 0.5 * u**2, kappa * (u.abs() - 0.5 * kappa))
    return weight * huber / kappa


def paper_reference(h_chosen: torch.Tensor, h_rejected: torch.Tensor, kappa: float = 1.0, lam: float = 1.0,
                    margin: float = 1.0) -> torch.Tensor:
    """The seed paper's loss per pair (module docstring), [B, N] outputs -> [B]."""
    dtype = _compute_dtype(h_chosen)
    q_c, q_r = h_chosen.to(dtype), h_rejected.to(dtype)
    n = q_c.shape[1]
    tau = quantile_levels(n, dtype=dtype, device=q_c.device)[:, None]  # [N, 1]: level of row i

    # Pairwise term on the expected rewards.
    d = q_c.mean(dim=1) - q_r.mean(dim=1)
    l_pair = -F.logsigmoid(d)  # softplus(-d)

    # Quantile-Huber term; [B, i, j] = quantile i against the (detached) target j.
    u = (q_r.detach() + margin)[:, None, :] - q_c[:, :, None]
    v = (q_c.detach() - margin)[:, None, :] - q_r[:, :, None]
    rho_c = _quantile_huber(u, tau, kappa).mean(dim=2).sum(dim=1)
    rho_r = _quantile_huber(v, tau, kappa).mean(dim=2).sum(dim=1)
    l_qr = 0.5 * (rho_c + rho_r)

    return l_pair + lam * l_qr


def paper_pair_margin_change(h_chosen: torch.Tensor, h_rejected: torch.Tensor,
                             pair_margin: torch.Tensor) -> torch.Tensor:
    """What pair margins m [B] change in the paper loss, per pair [B]: its Bradley-Terry term on the
    means, -log sigma(d), becomes -log sigma(d - m), with d = mean h_c - mean h_r (module docstring)."""
    dtype = _compute_dtype(h_chosen)
    d = h_chosen.to(dtype).mean(dim=1) - h_rejected.to(dtype).mean(dim=1)
    return F.logsigmoid(d) - F.logsigmoid(d - pair_margin.to(dtype))
