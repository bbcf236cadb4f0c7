"""The reward head as saved with a model: which head it is (scalar or quantile), N outputs, its
objective and that objective's hyper-parameters (config.json's `minqr` section), how it starts and
how its outputs are read out.

A reward model reads a response's pooled (last-token) state x and puts out N numbers, h = W x with
W of shape [N, n_embd]. The objective (minqr/objectives/) says what those numbers are; it is part
of the head, saved with it, because what a user may read out of the outputs depends on it.
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from minqr.errors import MinqrError
from minqr.objectives.loss import (DEFAULT_OBJECTIVE, DISTRIBUTIONAL_OUTPUTS, MAX_QUANTILES, OBJECTIVES, Objective,
                                   check_hyperparameters, get_objective, pair_loss)
from minqr.objectives.references import quantile_levels

HEADS = ("scalar", "quantile")
# The head's rows when they start "equal": on unit-scale features (a fresh ln_f) every output then
# starts near 0 with std ~0.1, so the first pairwise losses are near log 2 and no large gradient
# reaches a pretrained backbone, yet the backbone gets a gradient from the first step.
EQUAL_INIT_SCALE = 0.1


@dataclass(frozen=True)
class HeadConfig:
    """What the head is: scalar or quantile (`head`, as config.json's `minqr` section and --head say;
    a mixture's annotator kinds are its outputs), N outputs, its objective and that objective's
    hyper-parameters."""

    head: str = "quantile"
    num_quantiles: int = DISTRIBUTIONAL_OUTPUTS
    objective: str = DEFAULT_OBJECTIVE
    # the objective's: those given, completed with its defaults and checked on construction
    hyperparameters: dict = field(default_factory=dict)

    @classmethod
    def make(cls, head: str = "quantile", num_quantiles: int | None = None, objective: str | None = None,
             **hyperparameters) -> "HeadConfig":
        """Fill in the head's defaults (quantile: DEFAULT_OBJECTIVE and its default N; scalar: N = 1
        and bradley_terry); the construction completes and checks the rest."""
        if head not in HEADS:
            raise MinqrError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
        if head == "scalar":
            if num_quantiles not in (None, 1) or objective not in (None, "bradley_terry"):
                raise MinqrError(f"the scalar head has one output trained by bradley_terry, but got "
                                 f"num_quantiles={num_quantiles}, objective={objective}: drop them or use "
                                 "head='quantile'")
            return cls("scalar", 1, "bradley_terry", hyperparameters)
        objective = objective or DEFAULT_OBJECTIVE
        n = get_objective(objective).default_outputs if num_quantiles is None else num_quantiles
        return cls("quantile", n, objective, hyperparameters)

    def __post_init__(self):
        problems = []
        if self.head not in HEADS:
            problems.append(f"head={self.head!r} is not one of {', '.join(HEADS)}")
        n = self.num_quantiles
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_QUANTILES:
            problems.append(f"num_quantiles={n!r} must be an integer from 1 to {MAX_QUANTILES} (more levels than "
                            "preference data can resolve, at a cost that grows as N²)")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective={self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        elif (self.head == "scalar") != OBJECTIVES[self.objective].one_output:
            problems.append(f"the {self.head} head cannot be trained by {self.objective} "
                            "(bradley_terry is the scalar head's objective, and only its)")
        elif self.head == "scalar" and n != 1:
            problems.append(f"the scalar head has num_quantiles=1, not {n}")
        else:
            try:  # frozen: the one place the hyper-parameters are completed and checked
                object.__setattr__(self, "hyperparameters", check_hyperparameters(self.objective, self.hyperparameters))
            except MinqrError as error:
                problems.append(str(error))
        if problems:
            raise MinqrError("invalid reward head: " + "; ".join(problems))

    @property
    def spec(self) -> Objective:
        return OBJECTIVES[self.objective]

    @property
    def levels(self) -> list:
        """The quantile levels tau_i of the read-out quantiles, as floats."""
        return quantile_levels(self.num_quantiles, dtype=torch.float64).tolist()

    @property
    def readout(self) -> str:
        return self.spec.readout

    def labels(self) -> list:
        """Names of the outputs in config.json's id2label: "reward"; "q0" ... for outputs that are
        quantiles as they are (paper); "kind0" ... for outputs that are sorted into quantiles."""
        if self.head == "scalar":
            return ["reward"]
        prefix = "q" if self.readout == "raw" else "kind"
        return [f"{prefix}{i}" for i in range(self.num_quantiles)]

    def loss(self, h_chosen: torch.Tensor, h_rejected: torch.Tensor, reduction: str = "mean",
             impl: str = "auto", pair_margin: torch.Tensor | None = None) -> torch.Tensor:
        """This head's objective on outputs [B, N], with the pairs' margins [B] if any (see pair_loss)."""
        return pair_loss(h_chosen, h_rejected, self.objective, reduction, impl, pair_margin, **self.hyperparameters)

    def quantiles(self, outputs):
        """Outputs [..., N] -> the quantiles at tau_i [..., N]: the outputs as they are (raw), or
        sorted (the mixture's kinds). Torch tensors and numpy arrays alike; the mean is unchanged."""
        if self.readout == "raw":
            return outputs
        return outputs.sort(dim=-1).values if isinstance(outputs, torch.Tensor) else np.sort(outputs, axis=-1)

    @torch.no_grad()
    def init_weight(self, weight: torch.Tensor) -> None:
        """Set the head's weight [N, n_embd] as the objective wants it to start (Objective.head_init),
        drawing from torch's global generator."""
        n_embd = weight.shape[1]
        if self.spec.head_init == "equal":
            row = torch.randn(n_embd, dtype=weight.dtype, device=weight.device)
            weight.copy_(row * (EQUAL_INIT_SCALE / math.sqrt(n_embd)))  # [N, n_embd] by broadcasting
        else:
            weight.copy_(torch.randn(weight.shape, dtype=weight.dtype, device=weight.device) / math.sqrt(n_embd))

    def to_dict(self) -> dict:
        return {"head": self.head, "num_quantiles": self.num_quantiles, "objective": self.objective,
                **self.hyperparameters, "readout": self.readout, "quantile_levels": self.levels}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "HeadConfig":
        """From config.json's minqr section (to_dict's keys)."""
        missing = [k for k in ("head", "num_quantiles", "objective") if k not in d]
        if missing:
            raise MinqrError(f"{where}: the minqr section lacks {', '.join(missing)}; re-save the model with minqr")
        objective = d["objective"]
        if not isinstance(objective, str):
            raise MinqrError(f"{where}: the minqr section's objective must be a name, got {objective!r}")
        names = OBJECTIVES[objective].hyperparameters if objective in OBJECTIVES else {}
        missing = [k for k in names if k not in d]
        if missing:
            raise MinqrError(f"{where}: the minqr section lacks {', '.join(missing)}, a hyper-parameter of its "
                             f"objective {objective}; re-save the model with minqr")
        try:
            return cls(d["head"], d["num_quantiles"], objective, {k: d[k] for k in names})
        except MinqrError as e:
            raise MinqrError(f"{where}: {e}") from None

