"""Every measure of one model's scores (`summarize`), and the differences between two models scored
on the same pairs.

Everything works on plain arrays: a model's outputs on P preference pairs, `chosen` and `rejected`
of shape [P, N] (N=1 for a scalar head, the quantiles q_0 <= ... <= q_{N-1} at levels tau_i for a
quantile head), read from a scores file (minqr/study/scores_file.py); minqr/study/report.py turns
summaries into tables and figures. Three families of measures, a module each:

1. Separation (minqr/study/divergences.py): divergences between the rewards of chosen and of
   rejected responses, each with a bias-corrected estimate and a bootstrap interval
   (minqr/study/bootstrap.py).
2. Ranking (minqr/study/accuracy.py): pair accuracy, accuracy when ranking by one quantile,
   negative log-likelihood and calibration of P(chosen > rejected).
3. Quantile diagnostics (minqr/study/coverage.py): crossing rate, whether the spread flags the
   pairs the model gets wrong, and, on the synthetic task, coverage against the known truth.

A measure that the scores cannot give (a density of rewards that are all equal, an error AUROC
with no errors) is not an error: summarize reports it as {"value": None, "not_measured": reason}
and measures everything else, so that a collapsed model still shows in a report beside the others.
"""
import math
from pathlib import Path

import numpy as np
from scipy.stats import norm

from minqr.errors import MinqrError
from minqr.ranking import ranking_credit
from minqr.study.accuracy import (bradley_terry_probability, calibration, distributional_probability,
                                  objective_log_probability, pair_accuracy, quantile_accuracy, wilson_interval)
from minqr.study.bootstrap import (ANY_REAL, CONFIDENCE, DEFAULT_RESAMPLES, JS_RANGE, NON_NEGATIVE, PROBABILITY,
                                   bootstrap, bootstrap_estimate, resample_indices)
from minqr.study.coverage import coverage_summary, crossing_rate, spread_error_auroc
from minqr.study.divergences import (BIN_SWEEP, DEFAULT_BINS, DEFAULT_EPS, KDE_GRID_SIZE, NotMeasurable,
                                     weighted_kde_kl, check_view, histogram_kl, histogram_kl_by_bins,
                                     js_divergence, view_rows, wasserstein_1_sd)
from minqr.study.personal_accuracy import personal_accuracy
from minqr.study.scores_file import Scores, file_sha256
from minqr.study.spread_classes import within_class_spread_rho
from minqr.synthetic.truth import bayes_reference, response_truth


def coverage_taus(scores: Scores) -> np.ndarray:
    """The levels a model's outputs are compared at: its taus, or 0.5 for a scalar (read as a median)."""
    return scores.taus if scores.num_quantiles > 1 else np.array([0.5])


def scores_view(scores: Scores, side: str, view: str) -> np.ndarray:
    """[P, K] float64: the rewards a view takes from the `side` ("chosen" or "rejected") responses
    (divergences.view_rows): for `mean` the mean of the raw outputs, the model's expected reward;
    for a quantile or `all` the quantiles, relative to the anchor where there is one. Without one, a
    mixture's quantiles would mix its kinds' free constants into the distribution: refused."""
    view = check_view(view, scores.num_quantiles, scores.source)
    if view == "mean":
        return view_rows(scores.chosen if side == "chosen" else scores.rejected, view)
    if scores.anchor is None and scores.has_kinds:
        raise MinqrError(f"{scores.source}: view {view!r} reads the quantiles, and the quantiles of a head whose "
                         "outputs are kinds of annotator mean something only relative to a reference reply (each "
                         "kind has a free constant): score with --anchor-reply TEXT, or use the view mean")
    return view_rows(scores.quantiles(side, scores.anchor is not None), view)


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
    chosen_rows, rejected_rows = scores_view(scores, "chosen", view), scores_view(scores, "rejected", view)  # [P, K]
    indices = resample_indices(scores.num_pairs, n_resamples, seed)  # [B, P]
    quantile_head = scores.num_quantiles > 1
    # a mixture's quantiles without an anchor mix its kinds' free constants into the distribution:
    # the measures of the distribution are not taken (score refuses its per-quantile accuracy too)
    unanchored_kinds = scores.has_kinds and not anchored
    why_not = ("the outputs are kinds of annotator, whose quantiles mean something only relative to a reference reply, "
               "and these scores have no anchor outputs (score with --anchor-reply TEXT)")
    quantiles_read = quantile_head and not unanchored_kinds

    def with_interval(statistic, *arrays, bounds=NON_NEGATIVE) -> dict:
        resampled = [statistic(*(a[i] for a in arrays)) for i in indices]
        return bootstrap_estimate(statistic(*arrays), resampled, confidence, bounds)

    def divergence(measure, bounds=NON_NEGATIVE) -> dict:
        return with_interval(lambda c, r: measure(c.ravel(), r.ravel()), chosen_rows, rejected_rows, bounds=bounds)

    def kde_estimate() -> dict:
        # every resample at once: a resample is a weighting of the pairs (how often each was drawn)
        weights = np.vstack([np.ones(scores.num_pairs)] + [np.bincount(i, minlength=scores.num_pairs) for i in indices])
        values = weighted_kde_kl(chosen_rows, rejected_rows, weights, weights, KDE_GRID_SIZE)  # [1 + B]
        return bootstrap_estimate(values[0], values[1:], confidence)

    def spread_estimate() -> dict:
        if unanchored_kinds:
            raise NotMeasurable(why_not)
        margin = chosen.mean(axis=1) - rejected.mean(axis=1)
        wrong, right = int(np.sum(margin < 0)), int(np.sum(margin > 0))
        if not (wrong and right):
            raise NotMeasurable(f"the mean reward ranks {wrong} pairs wrongly and {right} rightly (ties left out), and "
                                "the AUROC compares the spreads of both kinds")
        return with_interval(spread_error_auroc, chosen, rejected, bounds=PROBABILITY)

    accuracy = pair_accuracy(raw_chosen.mean(axis=1), raw_rejected.mean(axis=1))
    # its log computed as such: a pair ranked wrong by 1,000 logits costs 1,000 nats, not the 690 of a clip
    own_log_probability = objective_log_probability(scores.chosen, scores.rejected, scores.metadata.get("objective"))
    own_probability = np.exp(own_log_probability)
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
        "quantile_accuracy": quantile_accuracy(chosen, rejected).tolist() if quantiles_read else None,
        # outputs sorted at read-out cannot cross; for raw quantiles, how often they do
        "crossing_rate": crossing_rate(np.concatenate([chosen, rejected]))
        if quantile_head and scores.readout == "raw" else None,
        "spread_auroc": _measured(spread_estimate) if quantile_head else None,
        # the objective's own P(chosen preferred), from the raw outputs (kind order matters)
        "nll": float(-np.mean(own_log_probability)),
        "calibration": {
            "objective": calibration(own_probability),
            "bradley_terry": calibration(bradley_terry_probability(raw_chosen, raw_rejected)),
            "distributional": calibration(distributional_probability(chosen, rejected)) if quantiles_read else None,
        },
        "coverage": None,
        "bayes": None,
        "spread_within_classes": None,  # with a truth: spread ρ within classes of controversial tags
        "personal": None,  # with the truth of the task with annotator pools: personal accuracy
    }
    if truth is None:
        truth_path = scores.truth_path
        if truth_path is not None and not truth_path.is_file():
            raise MinqrError(f"{where}: its metadata names the truth file {truth_path}, which does not exist; pass "
                             "its new place as truth (--truth FILE), or truth=False (--no-truth) to skip coverage")
        recorded = scores.metadata.get("truth_sha256")
        if truth_path is not None and recorded is not None and file_sha256(truth_path) != recorded:
            raise MinqrError(f"{where}: the truth file {truth_path} has changed since these scores were made (its "
                             "task made again in the same folder?), so its rows are other pairs' truths: score the "
                             "task's pairs again, or pass truth=False (--no-truth) to skip the truth")
    else:
        truth_path = Path(truth) if truth is not False else None
        recorded = scores.metadata.get("truth_sha256")
        if truth_path is not None and recorded is not None and truth_path.is_file() \
                and file_sha256(truth_path) != recorded:
            raise MinqrError(f"{where}: the truth file {truth_path} is not the one these scores were made against "
                             f"(they record {scores.truth_path or 'another'}, whose contents differ), so its rows "
                             "are other pairs' truths: pass that task's truth file, or leave out the truth")
    if truth_path is not None:
        summary["bayes"] = bayes_reference(truth_path, scores.num_pairs)
        if unanchored_kinds:
            summary["coverage"] = {"truth": str(truth_path), "not_computed": why_not}
        else:
            predictions, true_samples, _ = response_truth(scores, truth_path)
            # aligned on the anchor when the scores have one; by the affine fit otherwise
            try:
                summary["coverage"] = {"truth": str(truth_path), "anchored": anchored,
                                       **coverage_summary(predictions, true_samples, coverage_taus(scores),
                                                          align and not anchored)}
            except MinqrError as error:  # a model that ranks against the truth: say so in the report, go on
                summary["coverage"] = {"truth": str(truth_path), "not_computed": str(error)}
            summary["spread_within_classes"] = within_class_spread_rho(scores, truth_path)
        summary["personal"] = personal_accuracy(scores, truth_path)
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
    # [P, K] each, as summarize reads them: a chosen, b chosen, a rejected, b rejected
    rows = [scores_view(s, side, view) for side in ("chosen", "rejected") for s in (a, b)]

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
