"""The backbone probe: does the state a reward model's head reads encode the synthetic task's tags?

A head can only spread the outputs of a response on what that pooled state encodes, so a
controversial tag at chance here means a distributional head cannot learn the disagreement it
causes, however it is trained. Scoring runs the probe on every scores file of the synthetic task
(the scores' metadata `backbone_probe`); the report shows it a row per model.
"""
import numpy as np

from minqr.synthetic.truth import load_truth


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


def backbone_probe(pooled_states, token_lists, truth, num_pairs: int) -> dict:
    """Is each tag linearly decodable from the pooled state the head reads (linear_probe over the
    test responses)? `token_lists`: the P chosen then the P rejected responses' tokens;
    `pooled_states(token_lists)` runs the model, [2P, D]."""
    chosen_tags, rejected_tags, names, controversial = load_truth(
        truth, num_pairs, ("chosen_tags", "rejected_tags", "tag_names", "controversial_tags"))
    accuracy, chance = linear_probe(pooled_states(token_lists), np.concatenate([chosen_tags, rejected_tags]))
    return {"tags": [str(n) for n in names], "controversial": controversial.tolist(),
            "accuracy": accuracy.tolist(), "chance": chance.tolist()}
