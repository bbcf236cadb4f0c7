"""Where a mixture's likelihood puts the reward scale: the factor c* by which every kind's margin
would have to be multiplied for labelled pairs to be likeliest.

A Bradley–Terry reward's scale is fixed by the labels: a margin of d logits means the chosen side
wins with probability σ(d). Scale every kind's margin h_k(c_j) − h_k(r_j) of pair j by c (the pair
margin m_j of the data stays what it is) and ask which c the labels like best, under either of the
mixture's likelihoods (minqr/training/loss.py):

    per label         NLL(c) = −Σ_j log (1/N) Σ_k σ(c·d_jk − m_j)
    annotator-level   NLL(c) = −Σ_a log (1/N) Σ_k Π_{j∈D_a} σ(c·d_jk − m_j)

c* = argmin_c NLL(c). On the pairs a model was trained on, c* = 1 means its scale converged under
that likelihood; above 1 the run stopped while the scale was still growing (each step moves the
head's weights by about the learning rate, so the steps and --head-lr-scale bound how far the
scale can get); below 1 it overshot. On the synthetic task the truth says where a likelihood puts
the scale by itself: with the groups' exact rewards as the kinds, an annotator's own deviations
from their group look to a kind like label noise, and a likelihood answers noise with a smaller
scale, c* < 1 (docs/personal.md measures both).

The search: the NLL on a grid of scales spaced evenly in log c over SCALE_RANGE, then a golden-
section search in log c between the best grid point's neighbours. Each NLL is one pass over the
margins; `all_sum` sums the partial sums of several processes (training's pass is split over
them), so every process makes the same calls of it and finds the same c*.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minqr.distribution.personal import kind_margin_sums

SCALE_RANGE = (0.05, 20.0)  # c* is searched in here; an answer at an end means "this far or further"
GRID_POINTS = 17  # the coarse grid: neighbouring scales differ by a factor of about 1.45
TOLERANCE = 1e-3  # the golden-section search narrows its bracket to this, in log c (0.1%)


@dataclass(frozen=True)
class ScaleFit:
    """c* of labelled pairs under each likelihood (NaN: the labels do not depend on the scale)."""

    per_label: float
    annotator_level: float

    def describe(self, whose: str, trained_on: bool = True) -> str:
        """One line for a log; `whose` names the pairs ("the training pairs"), `trained_on` whether the
        model was trained on them (only then does c* say whether its scale settled)."""
        def factor(value):
            low, high = SCALE_RANGE
            if math.isnan(value):
                return "any number (the labels do not depend on the scale)"
            return f"{value:.2f}" if low < value < high else (f"{low:g} or less" if value <= low else f"{high:g} or more")
        reading = ("1: the scale settled; above: it was still growing; below: it overshot" if trained_on else
                   "1: these labels agree with the model's scale; above: they would have it surer; below: less sure")
        return (f"{whose} are likeliest with the kinds' margins times {factor(self.annotator_level)} by the "
                f"annotator-level likelihood and times {factor(self.per_label)} per label ({reading}; "
                "docs/personal.md)")


def scale_nll(differences: torch.Tensor, scale: float, annotator: torch.Tensor | None = None,
              num_annotators: int = 0, pair_margin: torch.Tensor | None = None, all_sum=None,
              weights: torch.Tensor | None = None) -> float:
    """The module docstring's NLL(scale), summed over the pairs (and processes): `differences` [P, N]
    are h_k(c_j) − h_k(r_j); `annotator` [P] indices in 0..num_annotators-1 for the annotator-level
    likelihood, None for the per-label one; pair_margin [P] or None; `weights` [N] the kinds' shares
    of the population (None: 1/N each, a mixture head's)."""
    n = differences.shape[1]
    log_w = torch.full((n,), -math.log(n), dtype=torch.float64) if weights is None else weights.double().log()
    log_w = log_w.to(differences.device)  # [N]
    if annotator is None:
        margins = scale * differences.double()  # [P, N]
        if pair_margin is not None:
            margins = margins - pair_margin.to(margins.device, torch.float64)[:, None]
        total = -torch.logsumexp(F.logsigmoid(margins) + log_w, dim=-1).sum()
        total = all_sum(total) if all_sum is not None else total
    else:  # an annotator's pairs multiply within each kind (the posteriors' sums), then the kinds are averaged
        sums = kind_margin_sums(scale * differences.double(), annotator, num_annotators, pair_margin)  # [A, N]
        sums = all_sum(sums) if all_sum is not None else sums
        total = -torch.logsumexp(sums + log_w, dim=-1).sum()
    return float(total)


def optimal_scale(differences: torch.Tensor, annotator: torch.Tensor | None = None, num_annotators: int = 0,
                  pair_margin: torch.Tensor | None = None, all_sum=None, weights: torch.Tensor | None = None) -> float:
    """c* of the module docstring within SCALE_RANGE, an end of it when the likelihood is best there,
    NaN when it is flat (arguments as scale_nll's). Every process makes the same calls of all_sum:
    the number of search steps is fixed in advance, never drawn from the values."""
    def nll(log_scale):
        return scale_nll(differences, math.exp(log_scale), annotator, num_annotators, pair_margin, all_sum, weights)

    low, high = (math.log(end) for end in SCALE_RANGE)
    step = (high - low) / (GRID_POINTS - 1)
    grid = [low + step * i for i in range(GRID_POINTS)]
    values = [nll(x) for x in grid]
    flat = max(values) - min(values) <= 1e-12 * (1.0 + abs(min(values)))  # decided after the search's calls
    best = min(range(GRID_POINTS), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, GRID_POINTS - 1)]  # the minimum lies in here
    ratio = (math.sqrt(5) - 1) / 2  # golden section: each step keeps this share of the bracket
    steps = math.ceil(math.log(TOLERANCE / (2 * step)) / math.log(ratio))  # the same count whatever the values
    x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
    f1, f2 = nll(x1), nll(x2)
    for _ in range(steps):
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - ratio * (b - a)
            f1 = nll(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + ratio * (b - a)
            f2 = nll(x2)
    found = (a + b) / 2
    if flat:
        return math.nan
    if found - low < TOLERANCE or high - found < TOLERANCE:  # at an end: as far as the search goes
        return SCALE_RANGE[0] if found - low < TOLERANCE else SCALE_RANGE[1]
    return math.exp(found)


def fit_scale(differences: torch.Tensor, annotator: torch.Tensor, num_annotators: int,
              pair_margin: torch.Tensor | None = None, all_sum=None, weights: torch.Tensor | None = None) -> ScaleFit:
    """The ScaleFit of labelled pairs: differences [P, N] (this process's pairs), each pair's
    annotator [P], pair margins [P] or None; `all_sum` and `weights` as scale_nll's."""
    return ScaleFit(per_label=optimal_scale(differences, None, 0, pair_margin, all_sum, weights),
                    annotator_level=optimal_scale(differences, annotator, num_annotators, pair_margin, all_sum,
                                                  weights))
