"""The objectives minqr knows, and `pair_loss`, which computes any of them on a batch of pairs.

`OBJECTIVES` holds, for every objective (their formulas: minqr/objectives/references.py): its
reference, its fused C++/CUDA op (minqr/objectives/ops.py, csrc/), its hyper-parameters and their
check, how many outputs it takes, where it takes a pair's margin, how its outputs are read out (raw
or sorted), its pair model (its likelihood, pair_models.py), how its head starts, what it is at
N = 1, and the training settings it needs unless told otherwise: nothing outside the registry asks
which objective it is. `pair_loss` dispatches to
the fused op where minqr._C has one for the device, else to the reference, with a warning.
"""
import warnings
from dataclasses import dataclass, field

import torch

from minqr.errors import MinqrError
from minqr.objectives import ops
from minqr.objectives.ops import check_outputs, check_paper_hyperparameters, check_reduction
from minqr.objectives.pair_models import PAIR_MODELS
from minqr.objectives.references import (bradley_terry_reference, independent_reference, mixture_reference,
                                         paper_pair_margin_change, paper_reference)

IMPLS = ("auto", "fused", "reference")


# ---------------------------------------------------------------------------------------------
# The objectives


@dataclass(frozen=True)
class TrainingDefaults:
    """The training settings an objective needs unless told otherwise (TrainConfig's fields of the
    same names): the response bag-of-words auxiliary's weight, the head's learning rate over the
    backbone's, the head's weight decay (None: the backbone's) and the weight average's window."""

    bag_coef: float = 0.0
    head_lr_scale: float = 1.0
    head_weight_decay: float | None = None
    ema_window: float = 0.0


@dataclass(frozen=True)
class Objective:
    """What minqr knows about one objective."""

    name: str
    summary: str  # one line, for --help and the report
    reference: object  # (h_chosen, h_rejected, **hyperparameters) -> per-pair losses [B]
    op: str  # its fused op, torch.ops.minqr.<op>(h_chosen, h_rejected, *hyperparameters, reduction, compute_grad)
    readout: str  # "raw": output i is the quantile at tau_i; "sorted": sorted, the outputs are the quantiles
    hyperparameters: dict = field(default_factory=dict)  # name -> default, in the op's argument order
    # (*hyperparameters) -> None, or TypeError/ValueError naming the one it does not accept; the op's own check
    check_hyperparameters: object = None
    one_output: bool = False  # it is defined for N = 1 only (the scalar head's)
    # Where it takes a pair's margin m. "shift": every comparison is chosen minus rejected, so it is
    # the objective on h_c - m. "means": in the Bradley-Terry term on the means only (paper), not in
    # its quantile targets, so the term is swapped per pair.
    pair_margin: str = "shift"
    # How the head starts. "equal": every row the same small random vector (the outputs start
    # equal, so quantiles do not cross, and the quantile term spreads them in the order of their
    # levels). "independent": N independent random rows of std 1/sqrt(n_embd): identical rows
    # are a symmetric saddle of the mixture (every kind gets the same gradient, forever), so its
    # kinds must start apart.
    head_init: str = "equal"
    at_one_output: str = ""  # what the objective is at N = 1
    training: TrainingDefaults = TrainingDefaults()
    default_outputs: int = 1  # N when none is given

    @property
    def pair_model(self) -> str:
        """What its outputs are in a pair, and so its likelihood P(y ≻ y'): "kinds", "draws" or "means"
        (minqr/objectives/pair_models.py, which holds it without torch for the numpy side)."""
        return PAIR_MODELS[self.name]

    def check(self, hyperparameters: dict) -> None:
        """Raise TypeError/ValueError for values of its hyper-parameters [name -> value] it does not accept."""
        if self.check_hyperparameters is not None:
            self.check_hyperparameters(*[hyperparameters[name] for name in self.hyperparameters])


# What made the N outputs of a mixture follow the annotators' disagreement on the synthetic task,
# where the truth is known (docs/objectives.md#what-it-took): the pooled state must keep every token of
# its response (the bag-of-words auxiliary, minqr.training.loss.ResponseBag), and the head's rows, which
# start apart and must move further apart, learn faster than the backbone and are not decayed.
DISTRIBUTIONAL_TRAINING = TrainingDefaults(bag_coef=5.0, head_lr_scale=2.5, head_weight_decay=0.0, ema_window=1 / 3)
# N kinds of equal weight 1/N can only put a group's share in steps of 1/N, and need several kinds
# per group for the spread within it: 20 did what 10 could not on a task with a 75/25 split (docs/objectives.md).
DISTRIBUTIONAL_OUTPUTS = 20

OBJECTIVES = {
    objective.name: objective for objective in (
        Objective("bradley_terry", "the scalar head: -log sigma(r_c - r_r)", bradley_terry_reference,
                  op="mixture_loss", readout="raw", one_output=True, at_one_output="itself (it has N = 1 only)"),
        Objective("mixture", "N kinds of annotator, output i is kind i's reward: "
                  "-log mean_i sigma(h_c,i - h_r,i); quantiles = the sorted outputs", mixture_reference,
                  op="mixture_loss", readout="sorted", head_init="independent",
                  at_one_output="bradley_terry, exactly", training=DISTRIBUTIONAL_TRAINING,
                  default_outputs=DISTRIBUTIONAL_OUTPUTS),
        Objective("independent", "independent draws of the two rewards: -log mean_ij sigma(h_c,i - h_r,j); "
                  "quantiles = the sorted outputs", independent_reference,
                  op="independent_loss", readout="sorted", head_init="independent",
                  at_one_output="bradley_terry, exactly", training=DISTRIBUTIONAL_TRAINING,
                  default_outputs=DISTRIBUTIONAL_OUTPUTS),
        Objective("paper", "the seed paper: Bradley-Terry on the means + quantile-Huber towards the "
                  "partner's quantiles +- margin; output i is the quantile at tau_i", paper_reference,
                  op="paper_loss", readout="raw", hyperparameters={"kappa": 1.0, "lam": 1.0, "margin": 1.0},
                  check_hyperparameters=check_paper_hyperparameters, pair_margin="means", default_outputs=10,
                  at_one_output="bradley_terry + lam x a median regression towards the partner +- margin; "
                             "bradley_terry exactly when lam = 0"),
    )
}
assert set(OBJECTIVES) == set(PAIR_MODELS), "every objective names its pair model in pair_models.py"
# The objective of `--head quantile` when none is named: the one that recovered the synthetic
# task's true reward distributions best through the whole pipeline (docs/objectives.md#study).
DEFAULT_OBJECTIVE = "mixture"
# At most this many outputs. Neighbouring levels are then 1/256 (0.4%) apart, finer than any
# preference data set resolves (a quantile needs many annotators on each side of it), and the N²
# objectives (paper, independent) already cost 65,536 terms a pair, each pass.
MAX_QUANTILES = 256


def objectives_help() -> str:
    """What each objective of a quantile head is, for the command line's --help."""
    return "; ".join(f"{o.name}: {o.summary} (at N = 1: {o.at_one_output})" for o in OBJECTIVES.values()
                     if not o.one_output)


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise MinqrError(f"objective must be one of {', '.join(OBJECTIVES)}, not {name!r}")
    return OBJECTIVES[name]


def check_hyperparameters(objective: str, given: dict) -> dict:
    """The objective's hyper-parameters: its defaults updated by `given` (values None count as not
    given). A hyper-parameter the objective does not have is an error naming it."""
    spec = get_objective(objective)
    given = {name: value for name, value in given.items() if value is not None}
    foreign = sorted(set(given) - set(spec.hyperparameters))
    if foreign:
        has = ", ".join(spec.hyperparameters) or "none"
        raise MinqrError(f"objective {objective!r} has no hyper-parameter {', '.join(foreign)} (it has: {has})")
    values = {**spec.hyperparameters, **given}
    try:
        spec.check(values)
    except (TypeError, ValueError) as error:
        raise MinqrError(str(error)) from None
    return {name: float(value) for name, value in values.items()}


# ---------------------------------------------------------------------------------------------
# The loss of a batch of pairs: the fused op where there is one, else the reference


def pair_loss(h_chosen: torch.Tensor, h_rejected: torch.Tensor, objective: str = DEFAULT_OBJECTIVE,
              reduction: str = "mean", impl: str = "auto", pair_margin: torch.Tensor | None = None,
              **hyperparameters) -> torch.Tensor:
    """The objective's loss of B pairs with outputs h_chosen, h_rejected [B, N].

    pair_margin: [B] the pairs' margins from the data (minqr/objectives/references.py says where
    each objective takes them), or None: none, the loss exactly as without.

    reduction: 'mean' | 'sum' | 'none' (the per-pair losses [B]). impl: 'fused' (the compiled op),
    'reference' (PyTorch), or 'auto': fused where minqr._C has a kernel for the device, else the
    reference with a warning (once per reason). Hyper-parameters as keywords (paper: kappa, lam,
    margin; the others have none), defaults from OBJECTIVES.

    Returns the loss in float32 (float64 for float64 inputs); gradients flow back in the input
    dtype. The fused ops compute each pair's gradient in their forward (when grad is enabled and an
    input requires it); the backward only scales it (minqr/objectives/ops.py).
    """
    spec = get_objective(objective)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of 'auto', 'fused', 'reference', got {impl!r}")
    check_outputs(h_chosen, h_rejected)
    if spec.one_output and h_chosen.shape[1] != 1:
        raise ValueError(f"objective {objective!r} is the scalar head's, N = 1, but h_chosen has shape "
                         f"{list(h_chosen.shape)}; for N outputs use mixture, independent or paper")
    hyper = spec.hyperparameters
    if hyperparameters:
        hyper = {**hyper, **hyperparameters}
        if set(hyper) != set(spec.hyperparameters):
            raise TypeError(f"objective {objective!r} takes the hyper-parameters "
                            f"{list(spec.hyperparameters) or 'none'}, got {sorted(hyperparameters)}")
    spec.check(hyper)
    check_reduction(reduction, h_chosen)  # after the hyper-parameters, as the ops check
    if pair_margin is not None:
        if pair_margin.shape != h_chosen.shape[:1]:
            raise ValueError(f"pair_margin must have shape [B] = {list(h_chosen.shape[:1])}, "
                             f"got {list(pair_margin.shape)}")
        if spec.pair_margin == "shift":
            # Every comparison these objectives make is chosen minus rejected, so
            # sigma(h_c,i - h_r,j - m) is their formula on the chosen outputs shifted by -m: the
            # fused op computes it as it is, and the gradient flows back through the shift
            # unchanged. Shifted in float32 (float64), not in a half precision that would round the
            # margin away.
            dtype = torch.float64 if h_chosen.dtype == torch.float64 else torch.float32
            h_chosen = h_chosen.to(dtype) - pair_margin.to(dtype)[:, None]

    if impl != "reference":
        reason = ops.fused_unavailable_reason(spec.op, h_chosen.device)
        if reason is not None and impl == "fused":
            raise RuntimeError(f"impl='fused': {reason}; or pass impl='reference'")
        if reason is not None:
            _warn_once(reason)
            impl = "reference"
    # paper takes the margin in its Bradley-Terry term on the means only, not in the quantile
    # targets; neither its op nor its reference has that input, so the term is swapped per pair here
    swap_paper_margin = pair_margin is not None and spec.pair_margin == "means"
    if impl != "reference":
        # The op reduces its losses itself, unless they are still to be changed here.
        op_reduction = "none" if swap_paper_margin else reduction
        compute_grad = torch.is_grad_enabled() and (h_chosen.requires_grad or h_rejected.requires_grad)
        op = getattr(torch.ops.minqr, spec.op)
        losses, _, _ = op(h_chosen, h_rejected, *(float(hyper[name]) for name in spec.hyperparameters),
                          op_reduction, compute_grad)
        if not swap_paper_margin:
            return losses
    else:
        losses = spec.reference(h_chosen, h_rejected, **hyper)
    if swap_paper_margin:
        losses = losses + paper_pair_margin_change(h_chosen, h_rejected, pair_margin)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


_warned = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"{reason}; minqr.pair_loss uses the PyTorch reference (slower)", stacklevel=3)
