"""Candidate sets on the synthetic task: Q prompts with K candidate replies each, and the truth
about every candidate, so that a best-of-N choice can be scored against what the population
really thinks of it.

Best-of-N picks one of K replies to a prompt by some statistic of its reward (the mean, a low
quantile, a lower-tail CVaR, ...). On real data nobody knows which pick was best; on the synthetic
task (minqr/synthetic/task.py) the reward of a reply over the population of annotators is a known
mixture of Gaussians, one per annotator group, so each candidate's true statistics can be computed:

    mean_reward     [Q, K]     the population's mean reward
    group_means     [Q, K, G]  each group's mean reward (the worst group's is their minimum)
    group_stds      [Q, K, G]  each group's spread (personal deviations)
    share_harmed    [Q, K]     the share of annotators for whom the reply is worse than the
                               reference, the anchor reply "ok" (reward 0 for everyone)
    preference      [Q, K]     P(reply preferred to the reference) for a random annotator
    relative_group_means, relative_group_stds  [Q, K, G]
                               the Gaussian of each group for the reward relative to the prompt's
                               average candidate (the group reference of best-of-n), annotator by
                               annotator: r(y) - (1/K) sum_k r(y_k)

The reference is the anchor: its reward is 0 for every annotator, so a statistic of the reward
relative to it is that statistic of the reward itself, and `true_statistic` computes it exactly
(quantiles by bisection, the preference by Gauss-Hermite quadrature). The candidates are drawn
from the task's own responses, so a model trained on the task has seen their kind.

Files written by `make_candidate_sets(folder)` (`minqr candidates`):

    candidates.jsonl  {"prompt": ..., "candidates": [K replies], "reference": "\\n\\nAssistant: ok"}
                      a line, the input of `minqr best-of-n`
    truth.npz         the arrays above, row q for line q, and group_weights [G], candidate_tags
                      [Q, K, V] int8, tag_names [V]
    task.json         the task's parameters, Q, K and the seed
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import ndtr
from scipy.stats import norm

from minqr.atomic import atomic_dir, check_replaceable
from minqr.synthetic.task import (ANCHOR_REPLY, TASK_VARIANTS, SyntheticTask, expected_sigmoid, render_reply,
                                  sample_questions)
from minqr.synthetic.truth import mixture_quantiles
from minqr.errors import MinqrError
from minqr.options import check_options, option, seed_option

CANDIDATES_KIND = "a folder of candidate sets"  # what its .minqr-made marker says it is (minqr/atomic.py)
CANDIDATE_STREAM = 2  # the seed's stream for candidate sets (0 and 1 are the task's data and truth)


def sample_candidate_sets(task: SyntheticTask, rng: np.random.Generator, num_prompts: int,
                          num_candidates: int) -> dict:
    """Q prompts and K distinct candidate replies to each: {"questions": [Q] str, "replies": [Q][K]
    lists of tag indices, "counts": [Q, K, V] int8 tag counts}."""
    questions = sample_questions(rng, num_prompts)
    replies = []
    for _ in range(num_prompts):
        chosen = []
        while len(chosen) < num_candidates:  # distinct replies: a duplicate would be chosen twice over
            reply = task.sample_responses(rng, 1)[0]
            if reply not in chosen:
                chosen.append(reply)
        replies.append(chosen)
    counts = task.tag_counts([r for prompt in replies for r in prompt])
    counts = counts.reshape(num_prompts, num_candidates, -1)  # [Q*K, V] -> [Q, K, V]
    return {"questions": questions, "replies": replies, "counts": counts}


def candidate_truth(task: SyntheticTask, counts: np.ndarray) -> dict:
    """[Q, K, V] tag counts -> the truth arrays of the module docstring."""
    Q, K, V = counts.shape
    flat = counts.reshape(Q * K, V)  # [Q*K, V]
    means, stds = task.group_moments(flat)  # [Q*K, G] each
    w = task.group_weights
    with np.errstate(divide="ignore", invalid="ignore"):  # the anchor: a point mass at 0, harming no one
        below = np.where(stds > 0, ndtr(-means / stds), (means < 0).astype(np.float64))
    preference = task.preference_probability(flat, np.zeros_like(flat))  # against the anchor, no tags
    G = len(w)
    # relative to the prompt's average candidate, annotator by annotator: r(y) - mean_k r(y_k) is the
    # reward of the tag counts c(y) - mean_k c(y_k), so given the group it is Gaussian as well
    relative = counts - counts.mean(1, keepdims=True)  # [Q, K, V]
    relative_means, relative_stds = task.group_moments(relative.reshape(Q * K, V))  # [Q*K, G] each
    return {"mean_reward": (means @ w).reshape(Q, K), "group_means": means.reshape(Q, K, G),
            "group_stds": stds.reshape(Q, K, G), "share_harmed": (below @ w).reshape(Q, K),
            "preference": preference.reshape(Q, K), "group_weights": w,
            "relative_group_means": relative_means.reshape(Q, K, G),
            "relative_group_stds": relative_stds.reshape(Q, K, G)}


def true_statistic(name: str, level: float | None, means: np.ndarray, stds: np.ndarray,
                   weights: np.ndarray) -> np.ndarray:
    """A statistic of Gaussian mixtures, the distributions of a reward relative to a reference (the
    anchor: the reward itself; or the average candidate): means, stds [..., G], weights [G] -> [...]
    (preference: E[sigmoid(draw)], the chance that an annotator prefers the reply to the reference,
    a draw being that annotator's reward difference). `name` and `level` as in
    minqr.distribution.statistics.Statistic: mean, quantile (tau), cvar (lower tail, alpha),
    mean_minus_std (lambda), preference."""
    shape = means.shape[:-1]
    means, stds = means.reshape(-1, means.shape[-1]), stds.reshape(-1, stds.shape[-1])  # [M, G]
    mean = means @ weights
    if name == "mean":
        value = mean
    elif name == "quantile":
        value = mixture_quantiles(means, stds, weights, [level])[:, 0]
    elif name == "cvar":
        value = _lower_cvar(means, stds, weights, level)
    elif name == "mean_minus_std":
        variance = (stds ** 2 + means ** 2) @ weights - mean ** 2
        value = mean - level * np.sqrt(np.maximum(variance, 0.0))
    elif name == "preference":  # sum_g w_g E[sigmoid(m_g + s_g Z)], Z standard normal
        value = expected_sigmoid(means, stds) @ weights
    else:
        raise MinqrError(f"no true statistic {name!r}: mean, quantile, cvar, mean_minus_std or preference")
    return value.reshape(shape)


def _lower_cvar(means: np.ndarray, stds: np.ndarray, weights: np.ndarray, alpha: float) -> np.ndarray:
    """E[r | r in the lowest alpha of the mixture] = (E[r 1{r <= q}] + q (alpha - F(q))) / alpha,
    q the alpha-quantile; the second term takes the part of an atom (std 0) that lies in the tail."""
    q = mixture_quantiles(means, stds, weights, [alpha])  # [M, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(stds > 0, (q - means) / stds, np.where(means <= q, np.inf, -np.inf))  # [M, G]
    below = ndtr(z)  # P(r <= q | group)
    # E[r 1{r <= q} | group] = m Phi(z) - s phi(z) for a Gaussian (phi(inf) = 0 for an atom)
    partial = means * below - stds * norm.pdf(z)
    return ((partial @ weights) + q[:, 0] * (alpha - below @ weights)) / alpha


@dataclass
class CandidatesConfig:
    """The options of `minqr candidates` (make_candidate_sets)."""

    out: str = option(help="folder to write: candidates.jsonl, truth.npz, task.json; a new or empty one, or one "
                      "minqr wrote with --overwrite (replaced as a whole)")
    variant: str = option("demo", "the synthetic task (minqr synthetic's --variant)", TASK_VARIANTS)
    num_prompts: int = option(1000, "prompts", low=1)
    num_candidates: int = option(8, "candidate replies to each prompt", low=2, high=64)
    seed: int = seed_option("seed of the prompts and candidates")
    overwrite: bool = option(False, "replace --out if it holds anything (only a folder minqr wrote, with nothing "
                             "added since)", in_file=False)

    def __post_init__(self):
        check_options(self)  # every range and choice the fields declare


def make_candidate_sets(folder, variant: str = "demo", num_prompts: int = 1000, num_candidates: int = 8,
                        seed: int = 0, overwrite: bool = False) -> Path:
    """Write candidate sets of the task `variant` and their truth into `folder` (atomically, a folder
    that holds anything only with `overwrite`, as make_synthetic_task; the same arguments give the
    same files)."""
    CandidatesConfig(out=str(folder), variant=variant, num_prompts=num_prompts, num_candidates=num_candidates,
                     seed=seed, overwrite=overwrite)  # checks the ranges
    check_replaceable(folder, "--out", overwrite=overwrite, kind=CANDIDATES_KIND)  # before the work below
    task = TASK_VARIANTS[variant]
    sets = sample_candidate_sets(task, np.random.default_rng([seed, CANDIDATE_STREAM]), num_prompts, num_candidates)
    truth = candidate_truth(task, sets["counts"])
    truth |= {"candidate_tags": sets["counts"], "tag_names": np.array(task.tags)}
    summary = {"description": "minqr candidate sets on the synthetic task (see minqr/synthetic/candidates.py)",
               "variant": variant, "num_prompts": num_prompts, "num_candidates": num_candidates, "seed": seed,
               "reference": ANCHOR_REPLY, **task.to_dict()}
    with atomic_dir(folder, "--out", overwrite=overwrite, kind=CANDIDATES_KIND) as tmp:
        with open(tmp / "candidates.jsonl", "w") as f:
            for question, replies in zip(sets["questions"], sets["replies"]):
                record = {"prompt": f"\n\nHuman: {question}",
                          "candidates": [render_reply([task.tags[t] for t in reply]) for reply in replies],
                          "reference": render_reply([])}
                f.write(json.dumps(record) + "\n")
        with open(tmp / "truth.npz", "wb") as f:
            np.savez_compressed(f, **truth)
        (tmp / "task.json").write_text(json.dumps(summary, indent=2) + "\n")
    return Path(folder)
