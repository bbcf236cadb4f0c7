"""Candidate sets on the synthetic task: their truth against Monte-Carlo draws of annotators."""
import json

import numpy as np
import pytest

from minqr.synthetic.candidates import candidate_truth, make_candidate_sets, sample_candidate_sets, true_statistic
from minqr.synthetic.task import TASK_VARIANTS, render_dialogue
from minqr.errors import MinqrError

DRAWS = 400_000  # annotators a candidate: Monte-Carlo error about 0.01 on shares, 0.03 on rewards


def monte_carlo(task, counts, rng):
    """[M, V] tag counts -> rewards [M, S] of S annotators drawn afresh, and their groups [M, S]."""
    M = len(counts)
    group = rng.choice(len(task.groups), size=(M, DRAWS), p=task.group_weights)
    rewards = np.zeros((M, DRAWS))
    for m in range(M):  # one candidate at a time: [S, V] annotators would not fit for all at once
        tags = np.flatnonzero(counts[m])
        own = task.rewards[group[m][:, None], tags] + rng.normal(0, task.personal_std, (DRAWS, len(tags)))
        rewards[m] = own.sum(-1)
    return rewards, group


@pytest.mark.parametrize("variant", ["demo", "shifted"])
def test_truth_matches_monte_carlo(variant):
    task = TASK_VARIANTS[variant]
    rng = np.random.default_rng(7)
    sets = sample_candidate_sets(task, rng, num_prompts=3, num_candidates=4)
    counts = sets["counts"]  # [3, 4, V]
    flat = counts.reshape(12, -1)
    flat[0] = 0  # the anchor among them: a point mass at 0
    truth = candidate_truth(task, flat.reshape(3, 4, -1))
    rewards, group = monte_carlo(task, flat, rng)
    np.testing.assert_allclose(truth["mean_reward"].ravel(), rewards.mean(1), atol=0.05)
    for g in range(len(task.groups)):
        in_group = np.where(group == g, rewards, np.nan)
        np.testing.assert_allclose(truth["group_means"].reshape(12, -1)[:, g], np.nanmean(in_group, 1), atol=0.06)
    np.testing.assert_allclose(truth["share_harmed"].ravel(), (rewards < 0).mean(1), atol=0.005)
    assert truth["share_harmed"].ravel()[0] == 0  # the anchor is not worse than itself
    np.testing.assert_allclose(truth["preference"].ravel(), (1 / (1 + np.exp(-rewards))).mean(1), atol=0.005)

    means, stds, w = truth["group_means"], truth["group_stds"], task.group_weights
    np.testing.assert_allclose(true_statistic("mean", None, means, stds, w).ravel(), rewards.mean(1), atol=0.05)
    np.testing.assert_allclose(true_statistic("preference", None, means, stds, w), truth["preference"], atol=1e-12)
    ordered = np.sort(rewards, 1)
    # 0.3, not 0.25: in `shifted` a 25% group can leave a gap in the CDF exactly at 0.25, where any
    # point of the gap is a quantile
    for level in (0.1, 0.3):
        quantile = true_statistic("quantile", level, means, stds, w).ravel()
        np.testing.assert_allclose(quantile, np.quantile(rewards, level, axis=1), atol=0.06)
        tail = ordered[:, : int(level * DRAWS)].mean(1)  # the mean of the lowest alpha of the draws
        np.testing.assert_allclose(true_statistic("cvar", level, means, stds, w).ravel(), tail, atol=0.06)
    lam = 0.7
    np.testing.assert_allclose(true_statistic("mean_minus_std", lam, means, stds, w).ravel(),
                               rewards.mean(1) - lam * rewards.std(1), atol=0.06)


def test_truth_relative_to_the_average_candidate_matches_monte_carlo():
    """The same annotator judges all K candidates of a prompt: their rewards are drawn together."""
    task = TASK_VARIANTS["shifted"]
    rng = np.random.default_rng(3)
    counts = sample_candidate_sets(task, rng, num_prompts=2, num_candidates=5)["counts"]  # [2, 5, V]
    truth = candidate_truth(task, counts)
    w = task.group_weights
    for q in range(2):
        annotators = task.sample_annotators(rng, DRAWS)  # [S, V]
        rewards = annotators @ counts[q].T.astype(np.float64)  # [S, K]
        relative = rewards - rewards.mean(1, keepdims=True)
        means, stds = truth["relative_group_means"][q], truth["relative_group_stds"][q]  # [K, G]
        np.testing.assert_allclose(true_statistic("mean", None, means, stds, w), relative.mean(0), atol=0.03)
        np.testing.assert_allclose(true_statistic("quantile", 0.1, means, stds, w),
                                   np.quantile(relative, 0.1, axis=0), atol=0.06)
        np.testing.assert_allclose(true_statistic("preference", None, means, stds, w),
                                   (1 / (1 + np.exp(-relative))).mean(0), atol=0.005)


def test_cvar_of_one_gaussian_in_float64():
    """A single group: CVaR_alpha of N(m, s^2) is m - s phi(z_alpha) / alpha, a closed form."""
    from scipy.stats import norm
    m, s, alpha = 1.3, 2.1, 0.2
    expected = m - s * norm.pdf(norm.ppf(alpha)) / alpha
    value = true_statistic("cvar", alpha, np.array([[m]]), np.array([[s]]), np.array([1.0]))
    assert value[0] == pytest.approx(expected, abs=1e-9)
    with pytest.raises(MinqrError, match="no true statistic"):
        true_statistic("median", None, np.array([[m]]), np.array([[s]]), np.array([1.0]))


def test_candidate_file(tmp_path):
    folder = make_candidate_sets(tmp_path / "c", "shifted", num_prompts=5, num_candidates=3, seed=1)
    records = [json.loads(line) for line in (folder / "candidates.jsonl").read_text().splitlines()]
    truth = np.load(folder / "truth.npz")
    assert len(records) == 5 and all(len(r["candidates"]) == 3 for r in records)
    task = TASK_VARIANTS["shifted"]
    tags = truth["candidate_tags"]
    for q, record in enumerate(records):
        assert len(set(record["candidates"])) == 3  # distinct
        question = record["prompt"].removeprefix("\n\nHuman: ")
        for k, reply in enumerate(record["candidates"]):
            # the text says what the truth was computed from, in the task's dialogue format
            written = reply.removeprefix("\n\nAssistant: ").split()
            assert record["prompt"] + reply == render_dialogue(question, written if written != ["ok"] else [])
            assert sorted(written) == sorted(task.tags[v] for v in np.flatnonzero(tags[q, k])) or written == ["ok"]
            means = tags[q, k] @ task.rewards.T
            np.testing.assert_allclose(truth["group_means"][q, k], means)
    again = make_candidate_sets(tmp_path / "d", "shifted", num_prompts=5, num_candidates=3, seed=1)
    assert (again / "candidates.jsonl").read_text() == (folder / "candidates.jsonl").read_text()
    with pytest.raises(MinqrError, match="variant"):
        make_candidate_sets(tmp_path / "e", "nope")
