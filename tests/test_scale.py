"""Where a mixture's likelihood puts the reward scale (minqr/distribution/scale.py): the search
against the likelihood written out in float64 loops on a fine grid, its consistency on labels drawn
from a known mixture, the synthetic task's groups, and the log line word for word."""
import math
import threading
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
    assert doubled.per_label == pytest.approx(fit.per_label / 2, rel=2e-3)  # two searches, each to 0.1%
    assert doubled.annotator_level == pytest.approx(fit.annotator_level / 2, rel=2e-3)


def test_at_the_ends_of_the_range_and_with_no_scale_at_all():
    agree = torch.ones(10, 2)  # every label agrees with every kind: the larger the scale the better
    assert optimal_scale(agree) == SCALE_RANGE[1] and optimal_scale(-agree) == SCALE_RANGE[0]
    near_end = torch.tensor([[1.0], [1.0], [1.0], [-1.0]]) / 15.0  # c* = 15 log 3 ≈ 16.5, in the top grid step
    assert optimal_scale(near_end) == pytest.approx(15 * math.log(3), rel=2e-3)
    assert math.isnan(optimal_scale(torch.zeros(10, 2)))  # zero margins: every scale alike
    fit = ScaleFit(per_label=SCALE_RANGE[1], annotator_level=SCALE_RANGE[0])
    assert fit.describe("the training pairs") == (
        "the training pairs are likeliest with the kinds' margins times 0.05 or less by the annotator-level "
        "likelihood and times 20 or more per label (1: the scale settled; above: it was still growing; below: it "
        "overshot; docs/personal.md)")
    assert ScaleFit(1.234, math.nan).describe("these", trained_on=False) == (
        "these are likeliest with the kinds' margins times any number (the labels do not depend on the scale) by "
        "the annotator-level likelihood and times 1.23 per label (1: these labels agree with the model's scale; "
        "above: they would have it surer; below: less sure; docs/personal.md)")


def test_split_over_processes_as_over_one_with_a_process_that_has_no_pairs():
    # three "processes" (threads) hold a third, two thirds and none of the pairs; all_sum adds their
    # partial sums as torch.distributed.all_reduce would, so each must find the one-process c*
    rng = np.random.default_rng(5)
    differences, who = drawn_labels(rng, 300, 3, 20, per_label=False)
    differences, who = torch.tensor(differences), torch.tensor(who)
    margins = torch.tensor(rng.uniform(-0.3, 0.3, size=300))
    expected = fit_scale(differences, who, 20, margins)
    shares = [slice(0, 100), slice(100, 300), slice(300, 300)]
    barrier, parts, found = threading.Barrier(3), [None] * 3, [None] * 3

    def process(rank):
        def all_sum(tensor):
            parts[rank] = tensor.clone()
            barrier.wait()
            total = sum(parts)
            barrier.wait()  # everyone has read the parts before the next call writes them
            return total
        part = shares[rank]
        found[rank] = fit_scale(differences[part], who[part], 20, margins[part], all_sum)

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert found[0] is not None and found[0] == found[1] == found[2]
    assert found[0].per_label == pytest.approx(expected.per_label, rel=1e-9)
    assert found[0].annotator_level == pytest.approx(expected.annotator_level, rel=1e-9)


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
