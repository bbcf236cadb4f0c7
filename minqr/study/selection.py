"""Best-of-N choices against the truth of the synthetic task's candidate sets
(minqr/synthetic/candidates.py): how much of what a perfect chooser gains does a model's choice gain?

For each statistic s (the mean, a quantile, a lower CVaR, ...), three choosers pick one candidate per
prompt: the model, by s of its learnt distribution (minqr best-of-n); the ORACLE, by s of the true
distribution; and a RANDOM choice (its expectation: the average over the candidates). Each pick is
measured in the truth: the statistic s itself (the true measure s targets), the population's mean
reward, the worst group's mean reward and the share of annotators harmed (for whom the pick is
worse than the reference reply, the anchor). The share of the oracle's gain that the model captures
is

    (s(model's picks) - s(random)) / (s(oracle's picks) - s(random)),  averaged over prompts,

s being relative to the reference the model's choice was made against: the anchor reply, or the
prompt's average candidate (best-of-n's group reference; the truth has both).

1 for a model that picks as well as the oracle in that measure, 0 for one no better than chance.

The spread of a candidate's learnt distribution (its std over the kinds, relative to the reference)
should flag where the groups disagree, a candidate the groups disagree on being one whose groups'
mean rewards differ by more than DISAGREEMENT logits: `spread_auroc` measures it for candidates,
for the mean's picks and for prompts.
"""
import numpy as np
import torch

from minqr.synthetic.candidates import true_statistic
from minqr.synthetic.truth import mixture_quantiles
from minqr.distribution.statistics import parse_statistic, statistic_values
from minqr.objectives.references import quantile_levels
from minqr.study.coverage import auroc

DISAGREEMENT = 1.0  # logits between the groups' mean rewards: a candidate the groups disagree on


def true_values(truth, statistic: str, reference: str = "reply") -> np.ndarray:
    """[Q, K] the true statistic of every candidate relative to the reference: "reply", the anchor;
    "group", the prompt's average candidate (best-of-n's --reference)."""
    s = parse_statistic(statistic)
    prefix = "relative_" if reference == "group" else ""
    return true_statistic(s.name, s.level, truth[prefix + "group_means"], truth[prefix + "group_stds"],
                          truth["group_weights"])


def atom_records(truth, statistics, num_atoms: int, reference: str = "reply") -> list:
    """The choices of a model that knew the truth but could say it only in `num_atoms` equally likely
    atoms (its quantiles at tau_i = (2i+1)/(2N)), relative to `reference`, as best-of-n's records:
    what a head of that many outputs loses to the oracle by its size alone."""
    prefix = "relative_" if reference == "group" else ""
    means, stds = truth[prefix + "group_means"], truth[prefix + "group_stds"]  # [Q, K, G]
    Q, K, G = means.shape
    levels = quantile_levels(num_atoms, dtype=torch.float64).numpy()
    atoms = torch.from_numpy(mixture_quantiles(means.reshape(Q * K, G), stds.reshape(Q * K, G),
                                               truth["group_weights"], levels))  # [Q*K, N]
    zero = torch.zeros_like(atoms)  # the atoms are relative to the reference already
    picks = {s: statistic_values(s, atoms, reference=zero).reshape(Q, K).argmax(1).numpy()  # [Q*K] -> [Q, K]
             for s in statistics}
    return [{"chosen": {s: int(p[q]) for s, p in picks.items()}} for q in range(Q)]


def picked(values: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """values [Q, K], picks [Q] -> [Q] the value of each prompt's pick."""
    return np.take_along_axis(values, picks[:, None], axis=1)[:, 0]


def measures(truth, picks: np.ndarray | None, target: np.ndarray) -> dict:
    """The truth's measures of picks [Q] (None: a uniformly random pick, in expectation), with
    `target` [Q, K] the true values of the statistic the picks were made by."""
    def of(values):
        return float(values.mean()) if picks is None else float(picked(values, picks).mean())
    return {"target": of(target), "mean_reward": of(truth["mean_reward"]),
            "worst_group": of(truth["group_means"].min(-1)), "share_harmed": of(truth["share_harmed"])}


def captured(model: dict, oracle: dict, random: dict) -> float | None:
    """The share of the oracle's gain over random, in the target measure, that the model gets; None
    where the oracle gains nothing (every prompt's candidates equal in that measure, to within 1e-9)."""
    gain = oracle["target"] - random["target"]
    return (model["target"] - random["target"]) / gain if gain > 1e-9 else None


def compare(truth, records: list, statistics, reference: str = "reply") -> dict:
    """For each statistic: the measures of the model's picks (best-of-n's `records`, made relative to
    `reference`), the oracle's (by the true statistic relative to the same reference) and random's,
    and the captured share; and `beyond_mean`, the same share measured from the
    oracle's choice by the MEAN instead of random (what the statistic adds to the true mean's choice,
    in its own measure; None where that choice is already the best in it, to within 1e-9)."""
    rows = {}
    by_mean = true_values(truth, "mean").argmax(1)
    for statistic in statistics:
        target = true_values(truth, statistic, reference)
        model = np.array([r["chosen"][statistic] for r in records])
        oracle = target.argmax(1)  # the earliest on a tie, as best-of-n
        rows[statistic] = {"model": measures(truth, model, target), "oracle": measures(truth, oracle, target),
                           "random": measures(truth, None, target)}
        row = rows[statistic]
        row["captured"] = captured(row["model"], row["oracle"], row["random"])
        mean_pick = measures(truth, by_mean, target)
        row["beyond_mean"] = captured(row["model"], row["oracle"], mean_pick)
    return rows


def spread_auroc(truth, records: list) -> dict | None:
    """How well the learnt spread (std = mean - mean_minus_std:1, from best-of-n's statistics)
    flags where the groups disagree, as AUROCs (None without both statistics):

    candidates   every candidate, the positives those the groups disagree on;
    mean's pick  each prompt's pick by the mean, the positives the picks the groups disagree on;
    favourites   each prompt, scored by its candidates' largest spread, the positives the prompts
                 whose groups' favourite candidates differ."""
    names = records[0]["statistics"]
    if "mean" not in names or "mean_minus_std:1" not in names:
        return None
    spread = [np.subtract(r["statistics"]["mean"], r["statistics"]["mean_minus_std:1"]) for r in records]
    means = truth["group_means"]  # [Q, K, G]
    disagree = (means.max(-1) - means.min(-1)) > DISAGREEMENT  # [Q, K]
    flat = np.concatenate(spread)
    pick = np.array([r["chosen"]["mean"] for r in records])
    at_pick = np.array([s[k] for s, k in zip(spread, pick)])
    picked_disagree = picked(disagree, pick)
    favourites = means.argmax(1)  # [Q, G]: each group's favourite candidate
    differ = (favourites != favourites[:, :1]).any(-1)
    largest = np.array([s.max() for s in spread])
    return {"candidates": auroc(flat[disagree.ravel()], flat[~disagree.ravel()]),
            "mean's pick": auroc(at_pick[picked_disagree], at_pick[~picked_disagree]),
            "favourites": auroc(largest[differ], largest[~differ]),
            "shares": {"candidates": float(disagree.mean()), "mean's pick": float(picked_disagree.mean()),
                       "favourites": float(differ.mean())}}
