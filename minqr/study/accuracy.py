"""How well a reward model ranks the pairs, and how honest its preference probabilities are: pair
accuracy (with a Wilson interval), accuracy when ranking by one quantile q_k (risk-averse with
small k), P(chosen preferred) as the Bradley-Terry term, the quantiles or the model's own objective
read it, their negative log-likelihood (minqr/ranking.py) and their calibration.
"""
import math

import numpy as np
from scipy.special import expit, log_expit, logsumexp, ndtri

from minqr.objectives.pair_models import DRAWS, KINDS, MEANS, pair_model
from minqr.ranking import ranking_credit
from minqr.study.bootstrap import CONFIDENCE

CALIBRATION_BINS = 10


def pair_accuracy(chosen_reward, rejected_reward) -> float:
    """Share of pairs where the chosen response gets the higher reward; a tie counts half."""
    c, r = np.asarray(chosen_reward, dtype=np.float64), np.asarray(rejected_reward, dtype=np.float64)
    return float(np.mean(ranking_credit(c, r)))


def wilson_interval(successes: float, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / trials (successes may be fractional: ties).

    centre = (p̂ + z²/2n) / (1 + z²/n), half-width = z·sqrt(p̂(1−p̂)/n + z²/4n²) / (1 + z²/n):
    unlike p̂ ± z·se it stays inside [0, 1] and keeps its coverage near 0 and 1.
    """
    z = ndtri(0.5 + confidence / 2)  # the standard normal quantile
    share = successes / trials
    denominator = 1 + z * z / trials
    centre = (share + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def quantile_accuracy(chosen, rejected) -> np.ndarray:
    """[N] pair accuracy when responses are ranked by quantile q_k alone, for each k.

    Small k is risk-averse ranking: prefer the response whose bad case is better.
    """
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    return np.mean(ranking_credit(c, r), axis=0)


def bradley_terry_probability(chosen, rejected) -> np.ndarray:
    """[P] P(chosen preferred) = σ(μ_c − μ_r) on the expected rewards: what the pairwise term trains."""
    return expit(np.mean(chosen, axis=1, dtype=np.float64) - np.mean(rejected, axis=1, dtype=np.float64))


def distributional_probability(chosen, rejected) -> np.ndarray:
    """[P] P(X_c > X_r) with each reward distribution read as N equally likely atoms, its quantiles.

    = (1/N²) Σ_i Σ_j (1{q_c,i > q_r,j} + ½·1{q_c,i = q_r,j}): the chance that a draw of the chosen
    response's reward beats an independent draw of the rejected one's.
    """
    c = np.asarray(chosen, dtype=np.float64)[:, :, None]  # [P, N, 1]
    r = np.asarray(rejected, dtype=np.float64)[:, None, :]  # [P, 1, N]
    return np.mean((c > r) + 0.5 * (c == r), axis=(1, 2))


def objective_probability(chosen, rejected, objective: str | None) -> np.ndarray:
    """[P] P(chosen preferred) as the model's own objective defines it, from the raw outputs [P, N]
    (kind i in column i): the likelihood it was trained to maximise, by its pair model
    (minqr/objectives/pair_models.py). "kinds": (1/N) Σ_i σ(h_c,i − h_r,i), one kind of annotator
    labelling; "draws": (1/N²) Σ_ij σ(h_c,i − h_r,j); "means", and a scores file that names no
    objective (None): σ(μ_c − μ_r) on the means."""
    return np.exp(objective_log_probability(chosen, rejected, objective))


def objective_log_probability(chosen, rejected, objective: str | None) -> np.ndarray:
    """[P] log objective_probability, computed in log space: a pair ranked the wrong way by 1,000
    logits has log-probability −1,000, where the probability itself underflows to 0 (the NLL read
    from it was clipped at 690)."""
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    model = MEANS if objective is None else pair_model(objective)
    if model == KINDS:
        return logsumexp(log_expit(c - r), axis=1) - math.log(c.shape[1])
    if model == DRAWS:
        return logsumexp(log_expit(c[:, :, None] - r[:, None, :]), axis=(1, 2)) - 2 * math.log(c.shape[1])
    return log_expit(np.mean(c, axis=1) - np.mean(r, axis=1))


def calibration(prob_chosen, bins: int = CALIBRATION_BINS) -> dict:
    """Reliability of predicted preference probabilities; prob_chosen [P] = P(chosen preferred).

    Every pair is scored in both orders, (p, outcome 1) and (1 − p, outcome 0), so the predictions
    cover [0, 1] symmetrically and do not depend on which response happens to be listed first.
    Equal-width bins on [0, 1]; per bin the mean prediction and the observed frequency.
    ECE = Σ_b (n_b / n) |frequency_b − mean prediction_b|; Brier = mean (p − outcome)².
    """
    prob_chosen = np.asarray(prob_chosen, dtype=np.float64)
    probs = np.concatenate([prob_chosen, 1 - prob_chosen])
    outcomes = np.concatenate([np.ones_like(prob_chosen), np.zeros_like(prob_chosen)])
    which = np.minimum((probs * bins).astype(int), bins - 1)  # p = 1 goes to the last bin
    counts = np.bincount(which, minlength=bins)
    filled = counts > 0
    mean_prob = np.bincount(which, probs, bins)[filled] / counts[filled]
    frequency = np.bincount(which, outcomes, bins)[filled] / counts[filled]
    return {
        "ece": float(np.sum(counts[filled] / probs.size * np.abs(frequency - mean_prob))),
        "brier": float(np.mean((probs - outcomes) ** 2)),
        "curve": {"bin_low": (np.flatnonzero(filled) / bins).tolist(), "mean_prob": mean_prob.tolist(),
                  "frequency": frequency.tolist(), "count": counts[filled].tolist()},
    }
