"""How a pair's label scores a model: pair accuracy's credit, for training's running accuracy and the
analysis alike (numpy arrays and torch tensors), and the negative log-likelihood of the labels from
their probabilities (numpy), for the synthetic task's Bayes-optimal reference (a model's NLL is read
from its log-probabilities, minqr/study/accuracy.py, so that no clip bounds it)."""
import numpy as np


def ranking_credit(chosen_reward, rejected_reward):
    """Element-wise, how right a reward ranks each pair: 1 when the chosen response's reward is the
    higher, 0 when it is the lower, and a tie counts half (a model that cannot tell the two apart
    scores chance, 0.5). Pair accuracy is its mean. Torch tensors and numpy arrays alike."""
    return (chosen_reward > rejected_reward) + 0.5 * (chosen_reward == rejected_reward)


def negative_log_likelihood(prob_chosen) -> float:
    """Mean −log P(the label) over pairs, in nats: how surprised the model is by the held-out labels."""
    return float(-np.mean(np.log(np.clip(np.asarray(prob_chosen, dtype=np.float64), 1e-300, 1.0))))
