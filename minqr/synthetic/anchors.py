"""The anchor: the neutral reply (task.ANCHOR_REPLY, "ok"), whose true reward is 0 for every annotator.

A Bradley-Terry reward is defined up to an additive constant, and a mixture head's outputs each up
to their own (minqr/objectives/). Scoring a synthetic task's data also scores, for each pair, the
anchor reply to its question (the truth's `anchor_texts`), and the scores file keeps those outputs
beside the pair's; the analysis then reads every response's outputs relative to its pair's anchor
(Scores.quantiles), which pins the constants down, so that a model can be compared with the truth
in absolute terms.
"""
import numpy as np

from minqr.synthetic.truth import load_truth


def score_anchors(score_texts, tokenizer, truth, num_pairs: int, max_length: int) -> np.ndarray:
    """[P, N] a model's outputs for each pair's anchor reply (the truth's anchor_texts, cut from the
    left to max_length tokens); `score_texts(token_lists)` runs the model."""
    (texts,) = load_truth(truth, num_pairs, ("anchor_texts",))
    return score_texts(tokenizer.encode_batch([str(t) for t in texts], max_length))
