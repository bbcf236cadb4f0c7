"""Where a mixture's likelihood puts the reward scale (minqr/distribution/scale.py): the search
against the likelihood written out in float64 loops on a fine grid, its consistency on labels drawn
from a known mixture, the synthetic task's groups, and the log line word for word."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from minqr.distribution.scale import SCALE_RANGE, ScaleFit, fit_scale, optimal_scale, scale_nll
from minqr.synthetic.pools import group_rewards_scale, pool_pairs
from minqr.synthetic.task import TASK_VARIANTS


def loop_nll(differences, scale, annotator=None, margins=None, weights=None) -> float:
    """The module docstring's NLL(scale), one pair, kind and annotator at a time."""
    p, n = len(differences), len(differences[0])
    weights = [1.0 / n] * n if weights is None else weights
    def log_sigma(j, k):
        x = scale * differences[j][k] - (margins[j] if margins is not None else 0.0)
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))
    if annotator is None:
        return -sum(math.log(sum(weights[k] * math.exp(log_sigma(j, k)) for k in range(n))) for j in range(p))
    total = 0.0
    for a in sorted(set(annotator)):
        per_kind = [sum(log_sigma(j, k) for j in range(p) if annotator[j] == a) for k in range(n)]
        top = max(per_kind)
        total -= top + math.log(sum(weights[k] * math.exp(v - top) for k, v in enumerate(per_kind)))
    return total


def drawn_labels(rng, pairs: int, kinds: int, annotators: int, per_label: bool, weights=None):
    """Margins [P, N] of a known mixture, signed so that the label's chosen side comes first: each
    label drawn by a kind (a fresh one per label, or each annotator's own for all their labels)."""
    truth = rng.normal(0.0, 3.0, size=(pairs, kinds))
    who = rng.integers(annotators, size=pairs)
    kind_of = rng.choice(kinds, size=pairs if per_label else annotators, p=weights)
    kind = kind_of if per_label else kind_of[who]
    first_wins = rng.random(pairs) < 1.0 / (1.0 + np.exp(-truth[np.arange(pairs), kind]))
    return np.where(first_wins[:, None], truth, -truth), who


@pytest.mark.parametrize("level", ["per label", "annotator-level"])
@pytest.mark.parametrize("with_margins, weighted", [(False, False), (True, False), (False, True)])
def test_the_search_finds_the_minimum_of_the_written_out_likelihood(level, with_margins, weighted):
    rng = np.random.default_rng([with_margins, weighted, level == "per label"])
    weights = rng.dirichlet(np.ones(3)) if weighted else None
    differences, who = drawn_labels(rng, 48, 3, 6, level == "per label", weights)
    differences *= rng.uniform(0.3, 2.0)  # the scale to be found is not 1
    margins = rng.uniform(-0.5, 0.5, size=48) if with_margins else None
    annotator = who.tolist() if level == "annotator-level" else None
    grid = np.exp(np.linspace(math.log(0.1), math.log(10.0), 2001))  # neighbours 0.23% apart
    values = [loop_nll(differences.tolist(), c, annotator, margins, weights) for c in grid]
    expected = grid[int(np.argmin(values))]
    args = (torch.tensor(differences), None if annotator is None else torch.tensor(who), 6,
            None if margins is None else torch.tensor(margins), None,
            None if weights is None else torch.tensor(weights))
    assert optimal_scale(*args) == pytest.approx(expected, rel=3e-3)
    for c in (0.3, 1.0, 4.0):  # the NLL itself, to float64 rounding
        assert scale_nll(args[0], c, *args[1:]) == pytest.approx(
            loop_nll(differences.tolist(), c, annotator, margins, weights), rel=1e-10)


@pytest.mark.parametrize("per_label", [True, False])
def test_labels_drawn_at_scale_one_are_likeliest_near_it(per_label):
    # the likelihood that drew the labels is consistent: with many labels c* is near 1 ...
    rng = np.random.default_rng(int(per_label))
    differences, who = drawn_labels(rng, 20_000, 3, 500, per_label)
    fit = fit_scale(torch.tensor(differences), torch.tensor(who), 500)
    assert (fit.per_label if per_label else fit.annotator_level) == pytest.approx(1.0, abs=0.06)
    # ... and margins twice the truth's are likeliest halved
    doubled = fit_scale(torch.tensor(2 * differences), torch.tensor(who), 500)
    assert doubled.per_label == pytest.approx(fit.per_label / 2, rel=1e-3)
    assert doubled.annotator_level == pytest.approx(fit.annotator_level / 2, rel=1e-3)


def test_at_the_ends_of_the_range():
    agree = torch.ones(10, 2)  # every label agrees with every kind: the larger the scale the better
    assert optimal_scale(agree) == SCALE_RANGE[1] and optimal_scale(-agree) == SCALE_RANGE[0]
    fit = ScaleFit(per_label=SCALE_RANGE[1], annotator_level=SCALE_RANGE[0], pairs=10, annotators=2)
    assert fit.describe("the training pairs") == (
        "the training pairs are likeliest at at most 0.05x the model's reward scale by the annotator-level "
        "likelihood and at at least 20x per label (1: the scale converged; above: it was still growing; below: "
        "it overshot; docs/personal.md)")
    assert ScaleFit(1.234, 0.5, 10, 2).describe("these") == (
        "these are likeliest at 0.50x the model's reward scale by the annotator-level likelihood and at 1.23x "
        "per label (1: the scale converged; above: it was still growing; below: it overshot; docs/personal.md)")


def test_the_groups_rewards_take_a_smaller_scale_the_more_annotators_deviate():
    # the synthetic task's truth: annotators nearly the same as their group leave the scale near 1;
    # deviations of the demo's 0.5 and shifted's 1.0 per tag lower it (a kind sees them as label noise)
    scales = {}
    tasks = {"nearly none": replace(TASK_VARIANTS["demo"], personal_std=0.05), "demo": TASK_VARIANTS["demo"],
             "shifted": TASK_VARIANTS["shifted"]}
    for name, task in tasks.items():
        rng = np.random.default_rng(0)
        groups, rewards = task.sample_pool(rng, 400)
        pairs = pool_pairs(task, rng, rewards, np.repeat(np.arange(400), 20))
        scales[name] = group_rewards_scale(task, pairs, groups)
    assert scales["nearly none"]["annotator_level"] == pytest.approx(1.0, abs=0.05)
    assert scales["nearly none"]["per_label"] == pytest.approx(1.0, abs=0.05)
    for level in ("per_label", "annotator_level"):
        assert scales["shifted"][level] < scales["demo"][level] - 0.1 < scales["nearly none"][level] - 0.15
