"""How far apart a reward model puts chosen and rejected responses: divergences between the
distribution of rewards given to chosen responses and the one given to rejected responses, over
the pairs of a test set.

The paper's measure is a histogram KL, whose value depends on the bins and on the small constant
that keeps empty bins finite, so beside it: the same KL over a range of bin counts, Jensen-Shannon,
Wasserstein-1 and a KDE-based KL. The histogram and KDE measures are unchanged by an increasing
affine map of the rewards (a reward model's shift and scale are arbitrary); W1 is reported in
units of the pooled standard deviation for the same reason. The analysis reports each with a
bias-corrected estimate and an interval (minqr/study/bootstrap.py).

A "view" picks which reward each response contributes: `mean` (the expected reward, mean of the N
outputs; the default), `qK` (quantile k alone), `all` (the N quantiles of every response pooled,
as equally weighted samples of its reward distribution).
"""
import math

import numpy as np
from scipy.stats import gaussian_kde

from minqr.errors import MinqrError

# The paper does not state its bins or eps. 50 bins resolve a 2,000-pair test set without leaving
# most bins empty; eps=1e-10 (added to the counts) only keeps log(0) away, like the usual
# `scipy.stats.entropy(p + 1e-10, q + 1e-10)`. With such a small eps a bin that one sample fills and
# the other leaves empty adds about (its share) x log(count / eps), roughly 23 nats per unit of
# share: that is what makes a histogram KL grow with the bin count (see histogram_kl_by_bins).
DEFAULT_BINS = 50
DEFAULT_EPS = 1e-10
BIN_SWEEP = (5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500)
KDE_GRID_SIZE = 512
VIEWS_HELP = "mean, q0 ... q{N-1}, or all"


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
    return float(weighted_kde_kl(p[:, None], q[:, None], ones_p, ones_q, grid_size)[0])


def _bandwidth(values: np.ndarray, what: str) -> float:
    if np.ptp(values) == 0:
        raise NotMeasurable(f"the {values.size} {what} rewards all equal {values[0]:.6g}, and a density estimate needs "
                            "rewards that differ (a model that gives every response the same reward, or too few pairs)")
    return float(np.sqrt(gaussian_kde(values).covariance[0, 0]))  # [1, 1] covariance of a 1-D KDE


def weighted_kde_kl(p_rows, q_rows, p_weights, q_weights, grid_size: int) -> np.ndarray:
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
