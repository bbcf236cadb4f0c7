"""How pair accuracy counts a pair, for training's running accuracy and the analysis alike (no
torch needed: it works on numpy arrays and torch tensors)."""


def ranking_credit(chosen_reward, rejected_reward):
    """Element-wise, how right a reward ranks each pair: 1 when the chosen response's reward is the
    higher, 0 when it is the lower, and a tie counts half (a model that cannot tell the two apart
    scores chance, 0.5). Pair accuracy is its mean. Torch tensors and numpy arrays alike."""
    return (chosen_reward > rejected_reward) + 0.5 * (chosen_reward == rejected_reward)
