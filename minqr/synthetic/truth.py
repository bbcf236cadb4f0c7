"""The truth of a synthetic task: each test response's exact reward distribution, saved beside the
data as test_truth.npz, and what reads it back (the analysis's coverage and Bayes reference, the
scoring's anchors and backbone probe).

Given its group, a response's reward is Gaussian, so for a random annotator it is a mixture of one
Gaussian per group (minqr/synthetic/task.py); the file holds that mixture's parameters, its exact
quantiles at the paper's N = 10 levels (TRUTH_LEVELS), samples from it and each pair's exact P(chosen
preferred). Its arrays are listed, and made, in minqr/synthetic/folder.py. This module reads
them back, and needs numpy only (the analysis imports it).
"""
from pathlib import Path

import numpy as np
from scipy.special import ndtr

from minqr.errors import MinqrError
from minqr.ranking import negative_log_likelihood
from minqr.reading import read_npz
from minqr.synthetic.task import SyntheticTask

TRUTH_SUFFIX = "_truth.npz"  # the truth for DATA/test.jsonl is DATA/test_truth.npz (truth_beside)
TRUTH_HELP = "it is the test_truth.npz that minqr.synthetic.folder.make_synthetic_task writes beside test.jsonl"


def mixture_quantiles(means: np.ndarray, stds: np.ndarray, weights: np.ndarray, levels) -> np.ndarray:
    """Quantiles of Gaussian mixtures: means, stds [P, G] (stds >= 0; 0 is a point mass, the
    anchor's), weights [G] -> [P, K] for the K levels in (0, 1), by bisection on the mixture's CDF
    to float64 precision."""
    levels = np.asarray(levels, dtype=np.float64)
    means, stds = means[:, None, :], stds[:, None, :]  # [P, 1, G], broadcast over the levels
    lo = np.broadcast_to((means - 40 * stds).min(-1), (means.shape[0], len(levels))).copy()  # [P, K]
    hi = np.broadcast_to((means + 40 * stds).max(-1), lo.shape).copy()
    for _ in range(100):  # each halves the bracket: 2^-100 of it is below float64's resolution
        mid = (lo + hi) / 2
        offset = mid[..., None] - means  # [P, K, G]
        with np.errstate(divide="ignore", invalid="ignore"):  # a point mass: a step at its mean
            z = np.where(stds > 0, offset / stds, np.where(offset >= 0, np.inf, -np.inf))
        below = ndtr(z) @ weights < levels  # [P, K]
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return (lo + hi) / 2



def bayes_accuracy(preference_probability: np.ndarray) -> float:
    """Expected accuracy of the Bayes-optimal ranker over fresh labels of these pairs: it picks
    the likelier side, which the annotator picks with probability max(p, 1 - p)."""
    return float(np.maximum(preference_probability, 1 - preference_probability).mean())


def bayes_accuracy_on_labels(preference_probability: np.ndarray) -> float:
    """Accuracy of the Bayes-optimal ranker on the labels the pairs hold (the chosen side is the
    likelier one when p > 1/2); a tie, p = 1/2, counts half."""
    p = preference_probability
    return float(np.mean((p > 0.5) + 0.5 * (p == 0.5)))


def truth_beside(data_file) -> Path:
    """Where the truth of a synthetic task's DATA/SPLIT.jsonl(.gz) lies, DATA/SPLIT_truth.npz, whether
    or not there is one."""
    data_file = Path(data_file)
    return data_file.parent / (data_file.name.split(".")[0] + TRUTH_SUFFIX)


def load_truth(path, num_pairs: int, names=("chosen_samples", "rejected_samples"), optional: bool = False):
    """Arrays of a synthetic task's truth file (test_truth.npz, written by
    minqr.synthetic.folder.make_synthetic_task, aligned with test.jsonl) as a tuple in the order of
    `names`: by default the true reward samples, [P, S] chosen and [P, S] rejected. Arrays whose
    first axis is the pairs must have num_pairs rows. optional: None instead of an error when the
    file lacks one of the names (a truth file that holds only the samples, as one for other data
    whose reward distributions are known may)."""
    path = Path(path)
    if not path.is_file():
        raise MinqrError(f"truth file {path} does not exist; {TRUTH_HELP}")
    what = f"a minqr truth file (test_truth.npz with {', '.join(names)})"
    archive = read_npz(path, what, names)
    if optional and not set(names) <= set(archive):
        return None
    missing = [name for name in names if name not in archive]
    if missing:
        raise MinqrError(f"{path} is not {what}: it has no {', '.join(missing)}")
    arrays = {name: archive[name] for name in names}
    for name, array in arrays.items():
        dims, kinds = TRUTH_ARRAYS.get(name, (None, None))
        if dims is not None and (array.ndim != len(dims) or array.dtype.kind not in kinds):
            raise MinqrError(f"{path}: {name} is {array.dtype} of shape {array.shape}, but a truth file's {name} is "
                             f"{'numbers' if 'f' in kinds else 'strings'} of shape [{', '.join(dims)}]; {TRUTH_HELP}")
        if dims is not None and dims[0] == "P" and array.shape[0] != num_pairs:
            raise MinqrError(f"{path}: {name} has shape {array.shape}, but the scores hold {num_pairs} pairs; the "
                             "truth must belong to the data that was scored")
    _check_together(arrays, path)
    return tuple(arrays[name] for name in names)


# the per-pair arrays that a held-out file's truth adds to the plain task's in the task with
# annotator pools (minqr/synthetic/pools.py), in the order personal_accuracy reads them
PERSONAL_TRUTH = ("annotator_probability", "annotator_group", "annotator_group_probability",
                  "chosen_annotator_reward", "rejected_annotator_reward")
# what load_truth checks of a truth file's arrays: their axes (P: the pairs) and dtype kinds
NUMBERS, STRINGS = "biuf", "US"
TRUTH_ARRAYS = {
    "chosen_samples": (("P", "S"), NUMBERS), "rejected_samples": (("P", "S"), NUMBERS),
    "preference_probability": (("P",), NUMBERS), "anchor_texts": (("P",), STRINGS),
    "chosen_tags": (("P", "V"), NUMBERS), "rejected_tags": (("P", "V"), NUMBERS),
    "controversial_tags": (("V",), NUMBERS), "tag_names": (("V",), STRINGS),
    "annotator_probability": (("P",), NUMBERS), "annotator_group": (("P",), NUMBERS),
    "annotator_group_probability": (("P", "G"), NUMBERS),
    "chosen_annotator_reward": (("P",), NUMBERS), "rejected_annotator_reward": (("P",), NUMBERS),
}


PROBABILITIES = ("preference_probability", "annotator_probability", "annotator_group_probability")


def _check_together(arrays: dict, path: Path) -> None:
    """The axes that arrays of one truth file share (S, V, G) agree, group indices are < G, every
    number is finite and every probability in [0, 1] (a NaN would pass into every figure silently)."""
    for name, array in arrays.items():
        if name in TRUTH_ARRAYS and array.dtype.kind in NUMBERS and not np.isfinite(array).all():
            raise MinqrError(f"{path}: {name} holds a number that is not finite; {TRUTH_HELP}")
        if name in PROBABILITIES and not ((array >= 0) & (array <= 1)).all():
            raise MinqrError(f"{path}: {name} holds a value outside [0, 1], which no probability is; {TRUTH_HELP}")
    for axis in ("S", "V", "G"):
        sizes = {name: array.shape[TRUTH_ARRAYS[name][0].index(axis)] for name, array in arrays.items()
                 if name in TRUTH_ARRAYS and axis in TRUTH_ARRAYS[name][0]}
        if len(set(sizes.values())) > 1:
            raise MinqrError(f"{path}: {', '.join(f'{n} has {axis} = {k}' for n, k in sizes.items())}: they must "
                             f"agree; {TRUTH_HELP}")
    if "annotator_group" in arrays and "annotator_group_probability" in arrays:
        group, groups = arrays["annotator_group"], arrays["annotator_group_probability"].shape[1]
        if len(group) and not ((group >= 0) & (group < groups) & (group == np.round(group))).all():
            raise MinqrError(f"{path}: annotator_group must hold group indices 0 ... {groups - 1} (the columns of "
                             f"annotator_group_probability); {TRUTH_HELP}")


def bayes_reference(truth_path, num_pairs: int) -> dict | None:
    """What the Bayes-optimal model scores on these pairs (the synthetic task knows each pair's true
    P(chosen preferred), p): its accuracy on these labels (ties, p = 1/2, count half) and its
    negative log-likelihood −mean log p. None for a truth file without p (only samples)."""
    arrays = load_truth(truth_path, num_pairs, ("preference_probability",), optional=True)
    if arrays is None:
        return None
    (p,) = arrays
    return {"accuracy": bayes_accuracy_on_labels(p), "nll": negative_log_likelihood(p)}


def response_truth(scores, truth_path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted quantiles [M, N], true samples [M, S] per response of `scores` (a
    minqr.study.scores_file.Scores): the P chosen, then the P rejected; and which of those 2P
    responses they are, [2P] bool. When the scores have anchor outputs, the predictions are aligned
    on the pair's anchor (Scores.quantiles), and the responses that are the anchor reply itself
    (true reward 0 for everyone), whose aligned outputs are 0 by construction, are left out (M < 2P)."""
    true_chosen, true_rejected = load_truth(truth_path, scores.num_pairs)
    anchored = scores.anchor is not None
    predictions = np.concatenate([scores.quantiles("chosen", anchored), scores.quantiles("rejected", anchored)])
    true = np.concatenate([true_chosen, true_rejected]).astype(np.float64)
    # the anchor replies among the responses are exact by construction: leave them out
    kept = ~np.all(true == 0, axis=1) if anchored else np.ones(len(true), dtype=bool)
    return predictions[kept], true[kept], kept


# the levels of the paper's N = 10, tau_i = (2i+1)/(2N) (minqr/objectives/references.py: quantile_levels)
TRUTH_LEVELS = (2 * np.arange(10, dtype=np.float64) + 1) / 20


def truth_arrays(task: SyntheticTask, pairs: dict, rng: np.random.Generator, num_samples: int) -> dict:
    """The true reward distributions of the pairs' responses (the test_truth.npz arrays)."""
    arrays = {"group_weights": task.group_weights, "quantile_levels": TRUTH_LEVELS,
              "anchor_texts": np.array(pairs["anchors"]), "tag_names": np.array(task.tags),
              "controversial_tags": task.controversial}
    for side in ("chosen", "rejected"):
        counts = pairs[f"{side}_tags"]
        means, stds = task.group_moments(counts)
        arrays[f"{side}_tags"] = counts
        arrays[f"{side}_group_means"] = means
        arrays[f"{side}_group_stds"] = stds
        arrays[f"{side}_quantiles"] = mixture_quantiles(means, stds, task.group_weights, TRUTH_LEVELS)
        arrays[f"{side}_samples"] = task.sample_rewards(rng, counts, num_samples).astype(np.float32)
    arrays["preference_probability"] = task.preference_probability(pairs["chosen_tags"], pairs["rejected_tags"])
    return arrays
