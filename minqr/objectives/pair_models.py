"""How each objective models a pair: the one fact of the registry (minqr/objectives/loss.py) that
the numpy side (minqr/study/) needs too, so it lives here, free of torch.

An objective's pair model says what its N outputs are, and so what P(y ≻ y') is:

- "kinds": output k is annotator kind k's reward, each kind with its own free constant (mixture;
  bradley_terry, a mixture of one kind). P(y ≻ y') = (1/N) Σ_k σ(h_k(y) − h_k(y')): a judge of a
  kind drawn at random, who prefers by their kind's reward. A reference is subtracted kind by kind.
- "draws": the outputs are N equally likely draws of the reward, not tied to kinds (independent).
  P(y ≻ y') = (1/N²) Σ_ij σ(h_i(y) − h_j(y')): an independent draw of each reward.
- "means": Bradley-Terry on the expected rewards (paper, whose outputs are quantiles at tau_i).
  P(y ≻ y') = σ(mean h(y) − mean h(y')), the term of its loss that sees the label.

Each is the likelihood its objective maximises (its loss is −log P on the chosen side), so a
held-out negative log-likelihood read this way is the training objective on held-out pairs.
"""
from minqr.errors import MinqrError

KINDS, DRAWS, MEANS = "kinds", "draws", "means"
PAIR_MODELS = {"bradley_terry": KINDS, "mixture": KINDS, "independent": DRAWS, "paper": MEANS}


def pair_model(objective: str) -> str:
    """The pair model of an objective, by name: "kinds", "draws" or "means"."""
    if objective not in PAIR_MODELS:
        raise MinqrError(f"objective must be one of {', '.join(PAIR_MODELS)}, not {objective!r}")
    return PAIR_MODELS[objective]
