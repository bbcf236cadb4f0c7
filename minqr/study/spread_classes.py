"""Spread ρ within classes of controversial tags: does a model see the spread WITHIN a group of
annotators, or only the split between the groups?

On the synthetic task the spread of a response's reward has two sources: the controversial tags
it holds (the groups disagree: a wide, often bimodal distribution) and the annotators' personal
deviations, which widen each group's Gaussian with the number of its tags. The spread ρ over all
responses (minqr/study/coverage.py) is carried mostly by the first. Here responses are
put into classes by the exact set of controversial tags they hold (the same between-group split),
the Spearman correlation of predicted with true spread is taken within each class of at least
MIN_CLASS responses whose true spreads differ, and the classes' correlations are averaged, weighted
by their sizes. Near 0: the model's spreads carry the between-group split only.
"""
import numpy as np
from scipy.stats import rankdata

from minqr.study.coverage import spreads
from minqr.study.scores_file import Scores
from minqr.synthetic.truth import load_truth, response_truth

MIN_CLASS = 10  # responses a class needs for its correlation to count


def within_class_spread_rho(scores: Scores, truth_path) -> dict | None:
    """{"rho": the size-weighted mean of the within-class Spearman correlations, "classes": how
    many counted, "responses": how many responses they hold}; None for a scalar head, a truth
    without tags, or no class large enough."""
    arrays = load_truth(truth_path, scores.num_pairs, ("chosen_tags", "rejected_tags", "controversial_tags"),
                        optional=True)
    if arrays is None or scores.num_quantiles < 2:
        return None
    chosen_tags, rejected_tags, controversial = arrays
    predictions, true, kept = response_truth(scores, truth_path)
    tags = np.concatenate([chosen_tags, rejected_tags]).astype(bool)[kept]  # [M, V], the responses of response_truth
    predicted_spread, true_spread = spreads(predictions, true, scores.taus)
    weights = 2 ** np.arange(int(controversial.sum()))
    classes = tags[:, controversial.astype(bool)] @ weights  # [M] one number per set of controversial tags
    rhos, sizes = [], []
    for label in np.unique(classes):
        members = classes == label
        if members.sum() < MIN_CLASS or np.ptp(true_spread[members]) == 0:
            continue
        # a model whose spreads do not vary within the class tells nothing about it: 0
        rhos.append(0.0 if np.ptp(predicted_spread[members]) == 0 else
                    np.corrcoef(rankdata(predicted_spread[members]), rankdata(true_spread[members]))[0, 1])
        sizes.append(int(members.sum()))
    if not rhos:
        return None
    return {"rho": float(np.average(rhos, weights=sizes)), "classes": len(rhos), "responses": int(sum(sizes))}
