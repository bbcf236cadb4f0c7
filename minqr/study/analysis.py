"""How far apart a reward model puts chosen and rejected responses, and how honest its quantiles are.

Everything here works on plain arrays: a model's outputs on P preference pairs, `chosen` and
`rejected` of shape [P, N] (N=1 for a scalar head, the quantiles q_0 <= ... <= q_{N-1} at levels
tau_i for a quantile head). `summarize` gathers every measure for one scores file (minqr/study/scores_file.py);
minqr/study/report.py turns summaries into tables and figures.

Three families of measures:

1. Separation (divergences between the distribution of rewards given to chosen responses and the
   one given to rejected responses, over the test set). The paper's measure is a histogram KL,
   whose value depends on the bins and on the small constant that keeps empty bins finite, so
   beside it: the same KL over a range of bin counts, Jensen-Shannon, Wasserstein-1 and a KDE-based
   KL. Each is reported as its plug-in value, a bias-corrected estimate and a bootstrap interval
   for the true value (see bootstrap_estimate). The histogram and KDE measures are unchanged by an
   increasing affine map of the rewards (a reward model's shift and scale are arbitrary); W1 is
   reported in units of the pooled standard deviation for the same reason.
2. Ranking: pair accuracy, accuracy when ranking by one quantile q_k (risk-averse with small k),
   calibration of P(chosen > rejected).
3. Quantile diagnostics: crossing rate, whether the spread q_{N-1} - q_0 flags the pairs the model
   gets wrong, and, on the synthetic task where each response's true reward distribution is known,
   coverage (does a fraction tau of the truth fall below the predicted tau-quantile?).

A measure that the scores cannot give (a density of rewards that are all equal, an error AUROC
with no errors) is not an error: summarize reports it as {"value": None, "not_measured": reason}
and measures everything else, so that a collapsed model still shows in a report beside the others.

A "view" picks which reward each response contributes to the separation measures: `mean` (the
expected reward, mean of the N outputs; the default), `qK` (quantile k alone), `all` (the N
quantiles of every response pooled, as equally weighted samples of its reward distribution).
"""
import math
from pathlib import Path

import numpy as np
from scipy.special import expit
from scipy.stats import gaussian_kde, norm, rankdata

from minqr.errors import MinqrError
from minqr.ranking import ranking_credit
from minqr.reading import read_npz
from minqr.study.scores_file import Scores

# The paper does not state its bins or eps. 50 bins resolve a 2,000-pair test set without leaving
# most bins empty; eps=1e-10 (added to the counts) only keeps log(0) away, like the usual
# `scipy.stats.entropy(p + 1e-10, q + 1e-10)`. With such a small eps a bin that one sample fills and
# the other leaves empty adds about (its share) x log(count / eps), roughly 23 nats per unit of
# share: that is what makes a histogram KL grow with the bin count (see histogram_kl_by_bins).
DEFAULT_BINS = 50
DEFAULT_EPS = 1e-10
BIN_SWEEP = (5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500)
KDE_GRID_SIZE = 512
CALIBRATION_BINS = 10
DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95
VIEWS_HELP = "mean, q0 ... q{N-1}, or all"
# the values a measure can take (low, high): its estimates and intervals stay inside
NON_NEGATIVE = (0.0, math.inf)  # KL, W1
JS_RANGE = (0.0, math.log(2))
PROBABILITY = (0.0, 1.0)  # AUROC
ANY_REAL = (-math.inf, math.inf)  # a difference of two KLs


class NotMeasurable(MinqrError):
    """A measure these scores cannot give, and why; summarize reports the reason in its place."""


# --- views ------------------------------------------------------------------------------------

def check_view(view: str, num_quantiles: int, where: str = "scores") -> str:
    """`view` if it is valid for a model with `num_quantiles` outputs, else a MinqrError."""
    if view in ("mean", "all"):
        return view
    if not (view.startswith("q") and view[1:].isdigit()):
        raise MinqrError(f"unknown view {view!r}; a view is {VIEWS_HELP}")
    if num_quantiles == 1:
        raise MinqrError(f"view {view!r} needs a quantile model, but {where} has N=1 output (a scalar head); "
                         "use the view mean or all")
    if int(view[1:]) >= num_quantiles:
        raise MinqrError(f"view {view!r} is out of range: {where} has N={num_quantiles} quantiles, q0 ... "
                         f"q{num_quantiles - 1}")
    return view


def view_rows(outputs, view: str) -> np.ndarray:
    """The rewards a view takes from each response: [P, N] outputs -> [P, K] (K=N for `all`, else 1).

    Rows stay per pair so that the bootstrap can resample pairs whatever the view.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    check_view(view, outputs.shape[1])
    if view == "mean":
        return outputs.mean(axis=1, keepdims=True)  # [P, 1]
    if view == "all":
        return outputs
    k = int(view[1:])
    return outputs[:, k:k + 1]  # [P, 1]


# --- divergences between two samples ----------------------------------------------------------

def _samples(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise MinqrError("a divergence needs at least one value in each sample")
    return x


def shared_histograms(p, q, bins: int = DEFAULT_BINS, eps: float = DEFAULT_EPS) -> tuple[np.ndarray, np.ndarray]:
    """The two histograms every histogram divergence compares.

    Edges: `bins` equal-width bins over the pooled range [min(p ∪ q), max(p ∪ q)] (widened by 0.5
    each side when all values are equal, numpy's convention). Counts of each sample, plus `eps` in
    every bin, normalised to sum to one: returns probabilities P[bins], Q[bins].
    """
    p, q = _samples(p), _samples(q)
    if bins < 1 or eps < 0:
        raise MinqrError(f"histogram needs bins >= 1 and eps >= 0, got bins={bins}, eps={eps}")
    low, high = min(p.min(), q.min()), max(p.max(), q.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    # bins + range: numpy's fast path for equal widths, same edges as np.linspace(low, high, bins + 1)
    p_counts = np.histogram(p, bins, range=(low, high))[0] + eps
    q_counts = np.histogram(q, bins, range=(low, high))[0] + eps
    return p_counts / p_counts.sum(), q_counts / q_counts.sum()


def _kl(p_probs: np.ndarray, q_probs: np.ndarray) -> float:
    """KL(P || Q) = sum_b P_b log(P_b / Q_b), nats; bins with P_b = 0 add nothing (0 log 0 = 0)."""
    mask = p_probs > 0
    with np.errstate(divide="ignore"):
        return float(np.sum(p_probs[mask] * np.log(p_probs[mask] / q_probs[mask])))


def histogram_kl(p, q, bins: int = DEFAULT_BINS, eps: float = DEFAULT_EPS) -> float:
    """KL(P || Q) in nats between the histograms of samples p and q (see shared_histograms).

    The paper's measure with p = rewards of chosen responses, q = rewards of rejected ones. With
    eps=0 an empty Q bin under a non-empty P bin makes it infinite.
    """
    return _kl(*shared_histograms(p, q, bins, eps))


def histogram_kl_by_bins(p, q, bin_counts=BIN_SWEEP, eps: float = DEFAULT_EPS) -> np.ndarray:
    """histogram_kl at each bin count: how much of the value the bins make."""
    return np.array([histogram_kl(p, q, bins, eps) for bins in bin_counts])


def js_divergence(p, q, bins: int = DEFAULT_BINS, eps: float = DEFAULT_EPS) -> float:
    """Jensen-Shannon divergence in nats (not the distance, its square root) of the same histograms.

    JS = ½ KL(P || M) + ½ KL(Q || M) with M = ½(P + Q): symmetric, finite even where one sample has
    empty bins, at most log 2.
    """
    p_probs, q_probs = shared_histograms(p, q, bins, eps)
    middle = (p_probs + q_probs) / 2
    return 0.5 * _kl(p_probs, middle) + 0.5 * _kl(q_probs, middle)


def wasserstein_1(p, q) -> float:
    """W1 = ∫ |F_p(x) − F_q(x)| dx between the empirical CDFs: the mean distance rewards must move.

    The CDFs are step functions that only change at the pooled sorted values, so the integral is a
    sum over the gaps between consecutive pooled values.
    """
    p, q = np.sort(_samples(p)), np.sort(_samples(q))
    pooled = np.sort(np.concatenate([p, q]))
    gaps = np.diff(pooled)
    cdf_p = np.searchsorted(p, pooled[:-1], side="right") / p.size
    cdf_q = np.searchsorted(q, pooled[:-1], side="right") / q.size
    return float(np.sum(np.abs(cdf_p - cdf_q) * gaps))


def wasserstein_1_sd(p, q) -> float:
    """W1 in units of the pooled standard deviation of p ∪ q, so that models of any scale compare."""
    p, q = _samples(p), _samples(q)
    spread = np.std(np.concatenate([p, q]))
    return 0.0 if spread == 0 else wasserstein_1(p, q) / spread


def kde_kl(p, q, grid_size: int = KDE_GRID_SIZE) -> float:
    """KL(P || Q) in nats between Gaussian kernel density estimates of samples p and q.

    Each density is scipy.stats.gaussian_kde's (Scott's bandwidth h = std · n^(-1/5)), evaluated on
    `grid_size` points spanning the pooled range plus 4 bandwidths each side, and the integral
    ∫ p(x) log(p(x)/q(x)) dx is the trapezoid rule on that grid. Smoother than a histogram, with no
    bins to choose, but the bandwidth plays their part.
    """
    p, q = _samples(p), _samples(q)
    ones_p, ones_q = np.ones((1, p.size)), np.ones((1, q.size))
    return float(_weighted_kde_kl(p[:, None], q[:, None], ones_p, ones_q, grid_size)[0])


def _bandwidth(values: np.ndarray, what: str) -> float:
    if np.ptp(values) == 0:
        raise NotMeasurable(f"the {values.size} {what} rewards all equal {values[0]:.6g}, and a density estimate needs "
                            "rewards that differ (a model that gives every response the same reward, or too few pairs)")
    return float(np.sqrt(gaussian_kde(values).covariance[0, 0]))  # [1, 1] covariance of a 1-D KDE


def _weighted_kde_kl(p_rows, q_rows, p_weights, q_weights, grid_size: int) -> np.ndarray:
    """kde_kl for many weightings of the same samples at once (the bootstrap's resamples).

    p_rows [Mp, K]: values grouped in rows that share a weight (a pair's K rewards); p_weights
    [B, Mp] row weights, one weighting per resample. The bandwidths stay those of the unweighted
    samples, so each weighted density is a weighted sum of the same kernels: one matrix product
    for all B weightings. Returns the B values of KL.
    """
    h_p = _bandwidth(p_rows.ravel(), "chosen")
    h_q = _bandwidth(q_rows.ravel(), "rejected")
    reach = 4 * max(h_p, h_q)
    grid = np.linspace(min(p_rows.min(), q_rows.min()) - reach, max(p_rows.max(), q_rows.max()) + reach, grid_size)
    p_density = _kernel_sums(p_rows, grid, h_p) @ p_weights.T / (p_rows.shape[1] * p_weights.sum(axis=1))  # [G, B]
    q_density = _kernel_sums(q_rows, grid, h_q) @ q_weights.T / (q_rows.shape[1] * q_weights.sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        # where q underflows to 0 under a p > 0 the integrand is +inf: the honest value, not a clamp
        integrand = np.where(p_density > 0, p_density * (np.log(p_density) - np.log(q_density)), 0.0)
    return np.trapezoid(integrand, grid, axis=0)


def _kernel_sums(rows: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """[M, K] values -> [G, M]: sum over a row's K values of the Gaussian kernel at each grid point."""
    out = np.empty((grid.size, rows.shape[0]))
    chunk = max(1, 2 ** 22 // (grid.size * rows.shape[1]))  # rows per block: about 32 MB of float64
    for start in range(0, rows.shape[0], chunk):
        block = rows[start:start + chunk]  # [c, K]
        z = (grid[:, None, None] - block[None]) / bandwidth  # [G, c, K]
        out[:, start:start + block.shape[0]] = np.exp(-0.5 * z * z).sum(axis=2)
    return out / (bandwidth * math.sqrt(2 * math.pi))


# --- bootstrap --------------------------------------------------------------------------------

def resample_indices(num_pairs: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """[B, P] pair indices drawn with replacement: resample b is pairs indices[b]."""
    return np.random.default_rng(seed).integers(0, num_pairs, size=(n_resamples, num_pairs))


def bootstrap_estimate(value: float, resampled, confidence: float = CONFIDENCE, bounds=NON_NEGATIVE) -> dict:
    """A plug-in estimate `value`, from it and its resampled values a bias-corrected estimate, and
    an interval for the true value; `bounds` (low, high) is the range of the measure.

    A plug-in divergence is biased upwards in finite samples (count noise looks like separation),
    and a resample adds its own noise on top, so the resampled values sit above the estimate by
    about the estimate's own bias above the truth. Hence:
    - corrected = value − (mean of the resampled values − value), the bootstrap's bias correction;
    - the basic interval [2·value − q_hi, 2·value − q_lo] (q: the resampled values' quantiles at
      (1 ∓ confidence)/2), which subtracts the same bias from the spread of the resamples.
    Both are clipped to `bounds` (the truth lies inside them, so no coverage is lost), and the
    interval is widened, if need be, to hold the corrected estimate. It need not hold the plug-in
    value: when the bias is large, an interval that covers the truth cannot. An interval [0, x]
    says the data cannot tell the measure from 0.

    Measured by simulation (tests/test_analysis.py), two Gaussians 0.5 sd apart (KL 0.125, JS
    0.030), 50 bins, eps 1e-10, runs of 100-200 replicates with 200 or 1,000 resamples each:
    - 2,000 pairs: the plug-in KL averages 0.26, the corrected one 0.17; the 95% intervals held the
      true KL in 89-98% of replicates, JS in 89-95%, W1 in 90-91% (a percentile interval, the
      resamples' own 2.5-97.5%, held the true KL in none);
    - 500 pairs: plug-in KL 0.64, corrected 0.28: the correction removes most of the bias, not all;
      coverage 87-95%;
    - identical distributions (truth 0): KL and JS intervals held 0 in 98-100%, W1's in 82-85% (its
      truth sits on the boundary, where its bias is as large as its spread).

    Returns {"value", "corrected", "ci_low", "ci_high", "bootstrap_mean"}; all but "value" None when
    there are no resamples or a value is not finite (an infinite KDE KL, say).
    """
    resampled = np.asarray(resampled, dtype=np.float64)
    estimate = {"value": float(value), "corrected": None, "ci_low": None, "ci_high": None, "bootstrap_mean": None}
    if not resampled.size or not (np.isfinite(value) and np.isfinite(resampled).all()):
        return estimate
    low, high = bounds
    tail = (1 - confidence) / 2 * 100
    q_low, q_high = np.percentile(resampled, [tail, 100 - tail])
    corrected = float(np.clip(2 * value - resampled.mean(), low, high))
    ci_low, ci_high = np.clip([2 * value - q_high, 2 * value - q_low], low, high)
    return {**estimate, "corrected": corrected, "ci_low": float(min(ci_low, corrected)),
            "ci_high": float(max(ci_high, corrected)), "bootstrap_mean": float(resampled.mean())}


def bootstrap(statistic, *arrays, n_resamples: int = DEFAULT_RESAMPLES, confidence: float = CONFIDENCE,
              seed: int = 0, bounds=NON_NEGATIVE) -> dict:
    """bootstrap_estimate of `statistic(*arrays)`, resampling pairs.

    The arrays share their first axis (pairs); every resample draws P pairs with replacement and
    takes the same rows of every array, so a pair's chosen and rejected stay together.
    """
    indices = resample_indices(len(arrays[0]), n_resamples, seed)
    resampled = [statistic(*(a[i] for a in arrays)) for i in indices]
    return bootstrap_estimate(statistic(*arrays), resampled, confidence, bounds)


# --- ranking ----------------------------------------------------------------------------------

def pair_accuracy(chosen_reward, rejected_reward) -> float:
    """Share of pairs where the chosen response gets the higher reward; a tie counts half."""
    c, r = np.asarray(chosen_reward, dtype=np.float64), np.asarray(rejected_reward, dtype=np.float64)
    return float(np.mean(ranking_credit(c, r)))


def wilson_interval(successes: float, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / trials (successes may be fractional: ties).

    centre = (p̂ + z²/2n) / (1 + z²/n), half-width = z·sqrt(p̂(1−p̂)/n + z²/4n²) / (1 + z²/n):
    unlike p̂ ± z·se it stays inside [0, 1] and keeps its coverage near 0 and 1.
    """
    z = norm.ppf(0.5 + confidence / 2)
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
    """[P] P(chosen preferred) as the model's own objective defines it (minqr/objectives/), from the raw
    outputs [P, N] (kind i in column i): the likelihood it was trained to maximise.

    mixture: (1/N) Σ_i σ(h_c,i − h_r,i), one kind of annotator labelling; independent:
    (1/N²) Σ_ij σ(h_c,i − h_r,j); bradley_terry and paper (and files from before objectives, None):
    σ(μ_c − μ_r) on the means."""
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    if objective == "mixture":
        return expit(c - r).mean(axis=1)
    if objective == "independent":
        return expit(c[:, :, None] - r[:, None, :]).mean(axis=(1, 2))
    return bradley_terry_probability(c, r)


def negative_log_likelihood(prob_chosen) -> float:
    """Mean −log P(the label) over pairs, in nats: how surprised the model is by the held-out labels."""
    return float(-np.mean(np.log(np.clip(np.asarray(prob_chosen, dtype=np.float64), 1e-300, 1.0))))


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
        raise MinqrError(f"coverage: the model's mean rewards fall as the true means rise (fit slope {slope:.3g}); "
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


TRUTH_HELP = "it is the test_truth.npz that minqr.data.synthetic.make_synthetic_task writes beside test.jsonl"


def load_truth(path, num_pairs: int, names=("chosen_samples", "rejected_samples"), optional: bool = False):
    """Arrays of a synthetic task's truth file (test_truth.npz, written by
    minqr.data.synthetic.make_synthetic_task, aligned with test.jsonl) as a tuple in the order of
    `names`: by default the true reward samples, [P, S] chosen and [P, S] rejected. Arrays whose
    first axis is the pairs must have num_pairs rows. optional: None instead of an error when the
    file lacks one of the names (an older truth file)."""
    path = Path(path)
    if not path.is_file():
        raise MinqrError(f"truth file {path} does not exist; {TRUTH_HELP}")
    what = f"a minqr truth file (test_truth.npz with {', '.join(names)})"
    archive = read_npz(path, what)
    if optional and not set(names) <= set(archive):
        return None
    missing = [name for name in names if name not in archive]
    if missing:
        raise MinqrError(f"{path} is not {what}: it has no {', '.join(missing)}")
    arrays = {name: archive[name] for name in names}
    for name, array in arrays.items():
        per_pair = name.startswith(("chosen_", "rejected_", "anchor_", "preference_"))
        if per_pair and (array.ndim < 1 or array.shape[0] != num_pairs):
            raise MinqrError(f"{path}: {name} has shape {array.shape}, but the scores hold {num_pairs} pairs; the "
                             "truth must belong to the data that was scored")
    return tuple(arrays[name] for name in names)


def linear_probe(features, labels, seed: int = 0, ridge: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Is each binary label linearly decodable from the features? ([K] held-out accuracy, [K] chance).

    features [M, D], labels [M, K] in {0, 1}. Half the rows (a seeded random half) fit a ridge
    regression of every label on the standardised features; the other half is classified by
    whether the fit exceeds 1/2. Chance is the held-out share of the majority class: a label that
    the features do not encode scores about that, one they encode linearly scores near 1.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(features))
    fit, held = order[: len(order) // 2], order[len(order) // 2:]
    mean, std = features[fit].mean(0), features[fit].std(0) + 1e-8
    design = np.hstack([(features - mean) / std, np.ones((len(features), 1))])  # [M, D + 1], an intercept
    x = design[fit]
    weights = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ labels[fit])  # [D + 1, K]
    predicted = design[held] @ weights > 0.5
    accuracy = np.mean(predicted == (labels[held] > 0.5), axis=0)
    share = labels[held].mean(axis=0)
    return accuracy, np.maximum(share, 1 - share)


def bayes_reference(truth_path, num_pairs: int) -> dict | None:
    """What the Bayes-optimal model scores on these pairs (the synthetic task knows each pair's true
    P(chosen preferred), p): its accuracy on these labels (ties, p = 1/2, count half) and its
    negative log-likelihood −mean log p. None for a truth file without p."""
    arrays = load_truth(truth_path, num_pairs, ("preference_probability",), optional=True)
    if arrays is None:
        return None
    (p,) = arrays
    return {"accuracy": float(np.mean((p > 0.5) + 0.5 * (p == 0.5))), "nll": negative_log_likelihood(p)}


def coverage_taus(scores: Scores) -> np.ndarray:
    """The levels a model's outputs are compared at: its taus, or 0.5 for a scalar (read as a median)."""
    return scores.taus if scores.num_quantiles > 1 else np.array([0.5])


def response_truth(scores: Scores, truth_path) -> tuple[np.ndarray, np.ndarray]:
    """Predicted quantiles [M, N] and true samples [M, S] per response: the P chosen, then the P
    rejected. When the scores have anchor outputs, the predictions are aligned on the pair's anchor
    (Scores.quantiles), and the responses that are the anchor reply itself (true reward 0 for
    everyone), whose aligned outputs are 0 by construction, are left out (M < 2P)."""
    true_chosen, true_rejected = load_truth(truth_path, scores.num_pairs)
    anchored = scores.anchor is not None
    predictions = np.concatenate([scores.quantiles("chosen", anchored), scores.quantiles("rejected", anchored)])
    true = np.concatenate([true_chosen, true_rejected]).astype(np.float64)
    if anchored:  # the anchor replies among the responses are exact by construction: leave them out
        keep = ~np.all(true == 0, axis=1)
        predictions, true = predictions[keep], true[keep]
    return predictions, true


# --- everything for one scores file -----------------------------------------------------------

def summarize(scores: Scores, view: str = "mean", bins: int = DEFAULT_BINS, eps: float = DEFAULT_EPS,
              n_resamples: int = DEFAULT_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0,
              truth=None, align: bool = True) -> dict:
    """Every measure of this module for one model's scores, as a JSON-ready dict.

    The divergences compare the chosen and rejected rewards of `view`; accuracy, calibration and
    the quantile diagnostics always use the whole output (ranking on the mean reward). Every
    divergence and the spread AUROC get a bias-corrected estimate and an interval (bootstrap_estimate)
    from `n_resamples` resamples of the pairs (0: none), the same resamples for all (`seed`);
    accuracy gets a Wilson interval. `truth`: a truth file for the coverage measures; None: the one
    the scores' metadata names, if any; False: none. A measure these scores cannot give is
    {"value": None, "not_measured": why} (see the module docstring).
    """
    where = scores.source
    view = check_view(view, scores.num_quantiles, where)
    # the quantiles (aligned on the anchor where there is one, raw otherwise, as the summary's
    # "quantiles_relative_to" says) for everything about the distribution; the raw outputs, whose
    # mean is the model's expected reward, for the `mean` view
    anchored = scores.anchor is not None
    chosen, rejected = scores.quantiles("chosen", anchored), scores.quantiles("rejected", anchored)  # [P, N] float64
    raw_chosen, raw_rejected = scores.chosen.astype(np.float64), scores.rejected.astype(np.float64)
    chosen_rows = view_rows(raw_chosen if view == "mean" else chosen, view)  # [P, K]
    rejected_rows = view_rows(raw_rejected if view == "mean" else rejected, view)
    indices = resample_indices(scores.num_pairs, n_resamples, seed)  # [B, P]
    quantile_head = scores.num_quantiles > 1

    def with_interval(statistic, *arrays, bounds=NON_NEGATIVE) -> dict:
        resampled = [statistic(*(a[i] for a in arrays)) for i in indices]
        return bootstrap_estimate(statistic(*arrays), resampled, confidence, bounds)

    def divergence(measure, bounds=NON_NEGATIVE) -> dict:
        return with_interval(lambda c, r: measure(c.ravel(), r.ravel()), chosen_rows, rejected_rows, bounds=bounds)

    def kde_estimate() -> dict:
        # every resample at once: a resample is a weighting of the pairs (how often each was drawn)
        weights = np.vstack([np.ones(scores.num_pairs)] + [np.bincount(i, minlength=scores.num_pairs) for i in indices])
        values = _weighted_kde_kl(chosen_rows, rejected_rows, weights, weights, KDE_GRID_SIZE)  # [1 + B]
        return bootstrap_estimate(values[0], values[1:], confidence)

    def spread_estimate() -> dict:
        margin = chosen.mean(axis=1) - rejected.mean(axis=1)
        wrong, right = int(np.sum(margin < 0)), int(np.sum(margin > 0))
        if not (wrong and right):
            raise NotMeasurable(f"the mean reward ranks {wrong} pairs wrongly and {right} rightly (ties left out), and "
                                "the AUROC compares the spreads of both kinds")
        return with_interval(spread_error_auroc, chosen, rejected, bounds=PROBABILITY)

    accuracy = pair_accuracy(raw_chosen.mean(axis=1), raw_rejected.mean(axis=1))
    own_probability = objective_probability(scores.chosen, scores.rejected, scores.metadata.get("objective"))
    accuracy_low, accuracy_high = wilson_interval(accuracy * scores.num_pairs, scores.num_pairs, confidence)
    summary = {
        "source": where, "model": scores.metadata["model"], "label": scores.label, "head": scores.head,
        "objective": scores.metadata.get("objective"), "readout": scores.readout,
        "backbone_probe": scores.metadata.get("backbone_probe"),
        "num_quantiles": scores.num_quantiles, "taus": None if scores.taus is None else scores.taus.tolist(),
        "workload": scores.workload, "data": scores.metadata["data"], "split": scores.metadata["split"],
        "quantiles_relative_to": "the pair's anchor reply" if anchored else None,
        "num_pairs": scores.num_pairs, "view": view, "bins": bins, "eps": eps, "n_resamples": n_resamples,
        "confidence": confidence, "seed": seed,
        "histogram_kl": divergence(lambda p, q: histogram_kl(p, q, bins, eps)),
        "js_divergence": divergence(lambda p, q: js_divergence(p, q, bins, eps), JS_RANGE),
        "wasserstein_1_sd": divergence(wasserstein_1_sd),
        "kde_kl": _measured(kde_estimate),
        "kl_by_bins": {"bins": list(BIN_SWEEP),
                       "kl": histogram_kl_by_bins(chosen_rows, rejected_rows, BIN_SWEEP, eps).tolist()},
        "accuracy": {"value": accuracy, "ci_low": accuracy_low, "ci_high": accuracy_high},
        "quantile_accuracy": quantile_accuracy(chosen, rejected).tolist() if quantile_head else None,
        # outputs sorted at read-out cannot cross; for raw quantiles, how often they do
        "crossing_rate": crossing_rate(np.concatenate([chosen, rejected]))
        if quantile_head and scores.readout == "raw" else None,
        "spread_auroc": _measured(spread_estimate) if quantile_head else None,
        # the objective's own P(chosen preferred), from the raw outputs (kind order matters)
        "nll": negative_log_likelihood(own_probability),
        "calibration": {
            "objective": calibration(own_probability),
            "bradley_terry": calibration(bradley_terry_probability(raw_chosen, raw_rejected)),
            "distributional": calibration(distributional_probability(chosen, rejected)) if quantile_head else None,
        },
        "coverage": None,
        "bayes": None,
    }
    if truth is None:
        truth_path = scores.truth_path
        if truth_path is not None and not truth_path.is_file():
            raise MinqrError(f"{where}: its metadata names the truth file {truth_path}, which does not exist; pass "
                             "its new place as truth (--truth FILE), or truth=False (--no-truth) to skip coverage")
    else:
        truth_path = Path(truth) if truth is not False else None
    if truth_path is not None:
        summary["bayes"] = bayes_reference(truth_path, scores.num_pairs)
        predictions, true_samples = response_truth(scores, truth_path)
        # aligned on the anchor when the scores have one; by the affine fit otherwise
        try:
            summary["coverage"] = {"truth": str(truth_path), "anchored": anchored,
                                   **coverage_summary(predictions, true_samples, coverage_taus(scores),
                                                      align and not anchored)}
        except MinqrError as error:  # a model that ranks against the truth: say so in the report, go on
            summary["coverage"] = {"truth": str(truth_path), "not_computed": str(error)}
    return summary


def _measured(measure) -> dict:
    """measure(), or what says why these scores cannot give it."""
    try:
        return measure()
    except NotMeasurable as why:
        return {"value": None, "not_measured": str(why)}


def paired_kl_difference(a: Scores, b: Scores, view: str = "mean", bins: int = DEFAULT_BINS,
                         eps: float = DEFAULT_EPS, n_resamples: int = DEFAULT_RESAMPLES,
                         confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """histogram_kl of model a minus that of model b, scored on the same pairs, with its interval.

    Does a separate chosen from rejected more than b does? Two intervals that overlap do not
    answer it: both models were measured on the same pairs, so their errors are correlated. Each
    resample here draws one set of pairs for both models, which cancels what the pairs share.
    """
    _check_same_pairs(a, b)
    rows = [view_rows(s.chosen, check_view(view, s.num_quantiles, s.source)) for s in (a, b)]
    rows += [view_rows(s.rejected, view) for s in (a, b)]  # [P, K] each: a chosen, b chosen, a rejected, b rejected

    def difference(chosen_a, chosen_b, rejected_a, rejected_b):
        return (histogram_kl(chosen_a.ravel(), rejected_a.ravel(), bins, eps)
                - histogram_kl(chosen_b.ravel(), rejected_b.ravel(), bins, eps))

    return bootstrap(difference, *rows, n_resamples=n_resamples, confidence=confidence, seed=seed, bounds=ANY_REAL)


def paired_accuracy_difference(a: Scores, b: Scores, confidence: float = CONFIDENCE) -> dict:
    """Pair accuracy of model a minus that of model b, scored on the same pairs, with its interval.

    Accuracy is a mean over pairs of each pair's ranking credit (on the mean reward, as summarize
    ranks), so the difference is the mean of the per-pair differences of credit, and its interval the
    normal one of a paired mean, value ± z·sd/√P (the paired z-test's), with no resampling noise. The
    pairs both models get right (or both wrong) add nothing to its width, which two separate Wilson
    intervals cannot see. Returns {"value", "ci_low", "ci_high"}; no interval (None)
    from a single pair, whose spread is unknown.
    """
    _check_same_pairs(a, b)
    credit = [ranking_credit(s.chosen.astype(np.float64).mean(axis=1), s.rejected.astype(np.float64).mean(axis=1))
              for s in (a, b)]
    per_pair = credit[0] - credit[1]  # [P], each in {-1, -0.5, 0, 0.5, 1}
    value = float(per_pair.mean())
    if len(per_pair) < 2:
        return {"value": value, "ci_low": None, "ci_high": None}
    half = norm.ppf(0.5 + confidence / 2) * float(per_pair.std(ddof=1)) / math.sqrt(len(per_pair))
    return {"value": value, "ci_low": max(-1.0, value - half), "ci_high": min(1.0, value + half)}


def same_pairs(a: Scores, b: Scores) -> bool:
    """Whether two scores files score the same pairs (same data, split and count)."""
    return (a.num_pairs, a.metadata["data"], a.metadata["split"]) == (b.num_pairs, b.metadata["data"],
                                                                      b.metadata["split"])


def _check_same_pairs(a: Scores, b: Scores) -> None:
    """A paired difference needs both models' scores on the same pairs."""
    if not same_pairs(a, b):
        raise MinqrError(f"{a.source} and {b.source} do not score the same pairs (data, split and count must agree)")
