"""Bootstrap estimates and intervals for a measure over preference pairs: the pairs are resampled
with replacement, a pair's chosen and rejected together, and the resampled values give a
bias-corrected estimate and an interval for the true value (bootstrap_estimate says why the basic
interval, and how often it held the truth in simulation).
"""
import math

import numpy as np

DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95
# the values a measure can take (low, high): its estimates and intervals stay inside
NON_NEGATIVE = (0.0, math.inf)  # KL, W1
JS_RANGE = (0.0, math.log(2))
PROBABILITY = (0.0, 1.0)  # AUROC
ANY_REAL = (-math.inf, math.inf)  # a difference of two KLs


def resample_indices(num_pairs: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """[B, P] pair indices drawn with replacement: resample b is pairs indices[b]. None for one pair
    ([0, 1]): its every resample is itself, and an interval of width 0 would claim certainty."""
    return np.random.default_rng(seed).integers(0, num_pairs, size=(n_resamples if num_pairs > 1 else 0, num_pairs))


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
    there are no resamples or a value is not finite (an infinite KDE KL, or a spread AUROC on a
    resample that drew no wrongly ranked pair), and then "no_interval" says which. Dropping the
    resamples without a value would condition the interval on them: it is not given instead.
    """
    resampled = np.asarray(resampled, dtype=np.float64)
    estimate = {"value": float(value), "corrected": None, "ci_low": None, "ci_high": None, "bootstrap_mean": None}
    if not resampled.size:
        return estimate
    if not np.isfinite(value):
        return {**estimate, "no_interval": "the value itself is not finite"}
    if not np.isfinite(resampled).all():
        missing = int((~np.isfinite(resampled)).sum())
        return {**estimate, "no_interval": f"{missing} of {resampled.size} resamples gave no finite value"}
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
