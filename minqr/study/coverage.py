"""How honest a quantile model's N outputs are as a distribution: how often they cross, whether the
spread q_{N-1} - q_0 flags the pairs the model ranks wrongly, and, on the synthetic task where each
response's true reward distribution is known (minqr/synthetic/truth.py), coverage: does a fraction
tau of the truth fall below the predicted tau-quantile?
"""
import math

import numpy as np
from scipy.stats import rankdata

from minqr.errors import MinqrError


# --- quantile diagnostics ---------------------------------------------------------------------

def crossing_rate(quantiles) -> float:
    """Share of responses ([M, N] rows) whose quantiles are not non-decreasing (some q_{i+1} < q_i)."""
    quantiles = np.asarray(quantiles, dtype=np.float64)
    return float(np.mean(np.any(np.diff(quantiles, axis=1) < 0, axis=1)))


def auroc(positive, negative) -> float:
    """P(score of a random positive > score of a random negative), ties counting half.

    Through the Mann-Whitney U statistic: rank all scores together (ties get their average rank);
    U = (sum of the positives' ranks) − n_pos(n_pos + 1)/2 counts the (positive, negative) pairs
    the positive wins, and AUROC = U / (n_pos · n_neg). NaN when either group is empty.
    """
    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if positive.size == 0 or negative.size == 0:
        return math.nan
    ranks = rankdata(np.concatenate([positive, negative]))
    wins = ranks[:positive.size].sum() - positive.size * (positive.size + 1) / 2
    return float(wins / (positive.size * negative.size))


def spread_error_auroc(chosen, rejected) -> float:
    """Does a wide predicted distribution flag the pairs the model ranks wrongly?

    A response's spread is q_{N-1} − q_0; a pair's spread is the mean of its two responses'. The
    pairs the mean reward ranks wrongly (μ_c < μ_r) are the positives, the right ones (μ_c > μ_r)
    the negatives, exact ties are left out. 0.5: the spread says nothing about errors; 1: every
    wrong pair is wider than every right one.
    """
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    spread = ((c[:, -1] - c[:, 0]) + (r[:, -1] - r[:, 0])) / 2
    margin = c.mean(axis=1) - r.mean(axis=1)
    return auroc(spread[margin < 0], spread[margin > 0])


# --- coverage against a known truth (the synthetic task) --------------------------------------

def affine_fit(predicted, true) -> tuple[float, float]:
    """Least-squares slope a and intercept b of predicted ≈ a · true + b."""
    slope, intercept = np.polyfit(np.asarray(true, dtype=np.float64), np.asarray(predicted, dtype=np.float64), 1)
    return float(slope), float(intercept)


def quantile_coverage(pred_quantiles, true_samples) -> np.ndarray:
    """[N] for each k, the share of true reward samples below the predicted quantile q_k.

    pred_quantiles [M, N] and true_samples [M, S] are aligned by response. A calibrated quantile
    head gives coverage_k ≈ tau_k.
    """
    pred = np.asarray(pred_quantiles, dtype=np.float64)[:, None, :]  # [M, 1, N]
    true = np.asarray(true_samples, dtype=np.float64)[:, :, None]  # [M, S, 1]
    return np.mean(true < pred, axis=(0, 1))


def coverage_summary(pred_quantiles, true_samples, taus, align: bool = True) -> dict:
    """Coverage of the predicted quantiles against each response's true reward samples.

    A reward learnt from preferences is defined up to an additive constant, and its scale is that
    of the loss (a Bradley-Terry likelihood learns the truth's logit units; the paper loss's
    margin sets its own). With `align`, the truth is first mapped into the model's units by the
    least-squares fit of the predicted means on the true means over these responses (μ̂ ≈ a·μ + b;
    regressing the noisy prediction on the nearly exact truth keeps the slope unbiased), and the
    true samples become a·x + b. Without it, the predictions are compared with the truth as they
    are: right for predictions aligned on an anchor whose true reward is 0 (Scores.quantiles),
    where the fit's slope and intercept, still reported, should come out near 1 and 0. The spread
    correlation does not need the map (ranks ignore increasing affine maps).

    A scalar head ([M, 1]) is read as a point prediction at tau = 0.5: its coverage is how often the
    truth falls below it, and it has no spread.
    Returns taus, coverage [N], mean absolute coverage error mean_k |coverage_k − tau_k|, the fit
    (slope, intercept), and the Spearman correlation of predicted spread q_{N-1} − q_0 with the true
    spread (the truth's empirical quantiles at tau_0 and tau_{N-1}); None for a scalar head.
    """
    pred = np.asarray(pred_quantiles, dtype=np.float64)
    true = np.asarray(true_samples, dtype=np.float64)
    taus = np.asarray(taus, dtype=np.float64)
    if pred.shape[0] != true.shape[0] or pred.shape[1] != taus.size:
        raise MinqrError(f"coverage needs one row of truth per response and one tau per quantile, got "
                         f"predictions {pred.shape}, truth {true.shape}, {taus.size} taus")
    slope, intercept = affine_fit(pred.mean(axis=1), true.mean(axis=1))
    if slope <= 0:
        trend = "fall as the true means rise" if slope < 0 else "do not rise with the true means"
        raise MinqrError(f"coverage: the model's mean rewards {trend} (fit slope {slope:.3g}); "
                         "the model has not learnt the task, so its quantiles cannot be compared with the truth")
    coverage = quantile_coverage(pred, slope * true + intercept if align else true)
    spread_correlation = None
    if pred.shape[1] > 1:
        pred_spread, true_spread = spreads(pred, true, taus)
        spread_correlation = float(np.corrcoef(rankdata(pred_spread), rankdata(true_spread))[0, 1])
    return {"taus": taus.tolist(), "coverage": coverage.tolist(),
            "mean_abs_error": float(np.mean(np.abs(coverage - taus))), "aligned_by_fit": bool(align),
            "slope": slope, "intercept": intercept, "spread_spearman": spread_correlation}


def spreads(pred_quantiles, true_samples, taus) -> tuple[np.ndarray, np.ndarray]:
    """[M] predicted spreads q_{N-1} − q_0 and [M] true spreads: the truth's empirical quantiles at
    the same outer levels tau_{N-1} and tau_0."""
    pred, true = np.asarray(pred_quantiles, dtype=np.float64), np.asarray(true_samples, dtype=np.float64)
    return pred[:, -1] - pred[:, 0], np.quantile(true, taus[-1], axis=1) - np.quantile(true, taus[0], axis=1)
