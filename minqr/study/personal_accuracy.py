"""Personal accuracy against the synthetic task's annotators: what a model's personal rewards are
worth on held-out pairs of known people, or of new people from a few context pairs.

The held-out files of the task with annotator pools (minqr/synthetic/pools.py) know, for every
pair, the labelling annotator's exact P(chosen ≻ rejected), p_a, their group's, and their exact
rewards. A ranker that picks a side is credited with its expected accuracy over fresh labels of
that annotator: p_a for chosen, 1 − p_a for rejected, 1/2 for a tie. Four rankers are compared:

    personal        the model's personal probability (the scores file's `personal_probability`)
    population      the model's own population probability, the same for everybody
    group oracle    the true P for the annotator's group (their own deviations unknown)
    exact oracle    p_a itself: max(p_a, 1 − p_a), the ceiling

and, for a mixture, the best kind: for each group, the one kind k whose σ(h_k(c) − h_k(r)) is
most accurate on that group's pairs, chosen on these very pairs. A posterior that concentrates on
one kind can do no better than that; a personal accuracy near it says that the posterior found the
right kinds and the distance left to the group oracle is the kinds' own (how well the model's kinds
stand for the groups), which no weighting of them removes (docs/personal.md measures it).

and the fit slope: the least-squares slope of the model's personal rewards (relative to the anchor
reply, whose true reward is 0 for everybody) on the annotator's exact rewards, both responses of
every pair. The reward scale of the kinds is set by regularisation rather than by the labels
(docs/personal.md), so every accuracy is reported with it.
"""
import numpy as np

from minqr.distribution.personal import ANCHOR_REFERENCE
from minqr.ranking import ranking_credit
from minqr.study.accuracy import objective_probability
from minqr.study.coverage import affine_fit
from minqr.study.scores_file import Scores
from minqr.synthetic.truth import PERSONAL_TRUTH, load_truth


def expected_accuracy(probability: np.ndarray, annotator_probability: np.ndarray) -> float:
    """Mean over pairs of the credit, over fresh labels of each pair's annotator, of picking the
    side `probability` [P] (a P(chosen ≻ rejected)) favours; annotator_probability [P] is p_a."""
    pick = ranking_credit(probability, 0.5)  # 1: chosen, 0: rejected, 1/2: a tie
    return float(np.mean(pick * annotator_probability + (1 - pick) * (1 - annotator_probability)))


def best_kind_accuracy(chosen: np.ndarray, rejected: np.ndarray, group: np.ndarray,
                       annotator_probability: np.ndarray) -> float:
    """The best kind's accuracy (the module docstring): raw kinds' outputs [P, N] of each side, each
    pair's annotator's group [P] and p_a [P]. For each group, the most accurate single kind on its
    pairs; their accuracies weighted by the group's pairs."""
    margins = chosen.astype(np.float64) - rejected.astype(np.float64)  # [P, N]
    kinds = 0.5 * (1 + np.tanh(margins / 2))  # σ(margins), each kind's P(chosen ≻ rejected), without overflow
    total = 0.0
    for g in np.unique(group):
        mine = group == g
        total += mine.sum() * max(expected_accuracy(kinds[mine, k], annotator_probability[mine])
                                  for k in range(kinds.shape[1]))
    return float(total / len(group))


def personal_accuracy(scores: Scores, truth_path) -> dict | None:
    """The four rankers' accuracies and the fit slope on the rows with a personal probability, as a
    JSON-ready dict; None when the truth file has no annotators (a plain task's) or the scores no
    personal arrays; {"value": None, "not_measured": why} when no row has one (new people scored
    without their context pairs), so that the other files' analysis goes on."""
    arrays = load_truth(truth_path, scores.num_pairs, PERSONAL_TRUTH, optional=True)
    if arrays is None or "personal_probability" not in scores.personal:
        return None
    p_a, group, group_probability, chosen_true, rejected_true = arrays
    personal = scores.personal["personal_probability"].astype(np.float64)
    rows = ~np.isnan(personal)
    if not rows.any():
        return {"value": None, "not_measured": "no row has a personal probability (no annotator the model knows): "
                                               "score known annotators' pairs, or new people's with --context"}
    if scores.metadata.get("annotator") is not None:  # the truth is each row's own annotator's, not this person's
        return {"value": None, "not_measured": f"the rows were all scored as annotator "
                                               f"{scores.metadata['annotator']!r} (--annotator), but the truth "
                                               "holds each pair's own annotator's preference: score without "
                                               "--annotator to measure it"}
    population = objective_probability(scores.chosen, scores.rejected, scores.metadata.get("objective"))
    own_group = group_probability[np.arange(len(group)), group.astype(int)]  # [P]
    result = {"pairs": int(rows.sum()), "pairs_without": int((~rows).sum())}
    for name, probability in (("personal", personal), ("population", population), ("group_oracle", own_group),
                              ("exact_oracle", p_a)):
        result[name] = expected_accuracy(probability[rows], p_a[rows])
    if scores.has_kinds:
        result["best_kind"] = best_kind_accuracy(scores.chosen[rows], scores.rejected[rows], group[rows], p_a[rows])
    # the truth's rewards are relative to the anchor reply (worth 0): so must the personal rewards be
    if "personal_reward" in scores.personal and scores.metadata.get("personal_reference") == ANCHOR_REFERENCE:
        predicted = scores.personal["personal_reward"][rows].astype(np.float64)  # [R, 2] chosen, rejected
        true = np.stack([chosen_true[rows], rejected_true[rows]], axis=1)  # [R, 2]
        result["fit_slope"], result["fit_intercept"] = affine_fit(predicted.ravel(), true.ravel())
    return result


def personal_markdown(summaries: list[dict]) -> str | None:
    """A table of the personal accuracies of the analysed files that have them (analyze's
    personal.md), or None when none has."""
    rows = [s for s in summaries if s.get("personal") and "not_measured" not in s["personal"]]
    unmeasured = [s for s in summaries if s.get("personal") and "not_measured" in s["personal"]]
    if not rows and not unmeasured:
        return None
    lines = ["| workload | model | pairs | personal | population | best kind | group oracle | exact oracle "
             "| fit slope |", "|---|---|---|---|---|---|---|---|---|"]
    for s in unmeasured:
        lines.append(f"| {s['workload']} | {s['label']} | 0 | not measured: {s['personal']['not_measured']} "
                     "| | | | | |")
    for s in rows:
        p = s["personal"]
        slope = f"{p['fit_slope']:.3f}" if "fit_slope" in p else "–"
        best = f"{p['best_kind']:.3f}" if "best_kind" in p else "–"
        lines.append(f"| {s['workload']} | {s['label']} | {p['pairs']} | {p['personal']:.3f} | {p['population']:.3f} "
                     f"| {best} | {p['group_oracle']:.3f} | {p['exact_oracle']:.3f} | {slope} |")
    return "\n".join(["# Personal accuracy", "",
                      "Expected accuracy over fresh labels of each pair's annotator (minqr/study/personal_accuracy.py):"
                      " the model's personal probability, its population probability, the best single kind for "
                      "each group (chosen on these pairs: a mixture's), the oracle that knows the annotator's group, "
                      "the one that knows their exact rewards; the fit slope of the personal rewards (relative to "
                      "the anchor reply) on the annotator's exact rewards.", "", *lines, ""])
