"""The reward head and its objective: what the N outputs of a response mean, and how they learn it.

A reward model reads a response's pooled (last-token) state x and puts out N numbers, h = W x with
W of shape [N, n_embd]. A preference pair gives h_c for the chosen response and h_r for the
rejected one, [N] each. The OBJECTIVE says what those numbers are and trains them accordingly; it
is part of the head, saved with it (config.json's `minqr` section), because what a user may read
out of the outputs depends on it.

The objectives, per pair (outputs [N]; batches are [B, N] and the loss is per pair, then reduced):

- `bradley_terry`, the scalar head (N = 1): L = -log sigma(h_c - h_r). One reward per response;
  its differences are log-odds of preference. Every objective below is exactly this at N = 1
  (`paper` with lam = 0), which the tests check.

- `mixture`: the label came from one of N equally likely KINDS of annotator, and kind i scores a
  response with output i. The likelihood of the label is the average over kinds:

      L = -log( (1/N) sum_i sigma(h_c,i - h_r,i) )

  With d_i = h_c,i - h_r,i and w = softmax_i(log sigma(d_i)) (how much each kind explains this
  label): dL/dh_c,i = -w_i sigma(-d_i) = -dL/dh_r,i. Output i is then kind i's reward, and over
  the population of annotators a response's reward takes each of the N values with probability
  1/N: SORTED, they are the quantiles of that distribution at tau_i = (2i+1)/(2N). Never sort
  inside the loss (kind i must stay kind i from one response to the next); sort at read-out. The
  mean of the outputs is the expected reward, unchanged by sorting, and ranks responses.

- `independent`: the two rewards of a pair are independent draws from each response's
  distribution (N atoms each), and the label is Bradley-Terry on the draws:

      L = -log( (1/N^2) sum_i sum_j sigma(h_c,i - h_r,j) )

  Sorted at read-out as well. It does not tie the outputs of two responses to a kind, so it cannot
  tell "the same people disagree" from "different people disagree".

- `paper`: the seed paper's loss, kept to reproduce it (../shared/DESIGN.md, "The loss"): output i
  is the quantile at tau_i directly (read out raw), trained by Bradley-Terry on the means plus a
  quantile-Huber term whose targets are the PARTNER's quantiles shifted by a margin m:

      L = -log sigma(mean h_c - mean h_r) + lam * 1/2 * 1/N * sum_ij [rho_tau_i(u_ij) + rho_tau_i(v_ij)]
      u_ij = (h_r,j + m) - h_c,i,  v_ij = (h_c,j - m) - h_r,i   (targets detached)
      rho_tau(u) = |tau - 1{u<0}| * H_kappa(u) / kappa,  H_kappa the Huber function

  Measured on the synthetic task, where the truth is known, it ranks well but its spread does not
  follow the annotators' disagreement (README, "Objectives"): partner-quantiles +- m are not
  samples of the response's own reward, which is what makes QR-DQN's targets identify a
  distribution.

Why a mixture identifies a distribution where pairs of single labels seem too little: each label
is one annotator's, and annotators of the same kind agree across pairs. A response that the kinds
rank differently makes the labels of its pairs inconsistent in a way that one scalar reward cannot
explain but N kinds can. What it cannot identify is a constant per output: kind i's rewards may all
be shifted by c_i without changing a single d_i. Spreads are therefore measured after aligning the
outputs on an anchor response whose reward is known to be 0 for everyone (the synthetic task has
one; minqr/analysis.py aligns by it).

This module holds, for every objective: its PyTorch reference (the formula, line by line; autograd
gives the gradients), its hyper-parameters and their checks, how its head starts, how its outputs
are read out, and the dispatch to its fused C++/CUDA op (minqr/ops.py, csrc/). `HeadConfig` is the
head as saved with a model.
"""
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from minqr import ops
from minqr.errors import MinqrError
from minqr.ops import check_outputs, check_paper_hyperparameters

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "fused", "reference")
HEAD_KINDS = ("scalar", "quantile")


def quantile_levels(n: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """tau_i = (2i+1)/(2N), i = 0..N-1: the midpoints of N equal probability bins."""
    if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return (2 * torch.arange(n, dtype=dtype, device=device) + 1) / (2 * n)


# ---------------------------------------------------------------------------------------------
# The references: each objective's formula in plain PyTorch. They compute in float32 (float64 for
# float64 inputs) and return per-pair losses [B] in that dtype, also for float16/bfloat16 inputs:
# a loss averaged in bfloat16 would lose the digits that training curves are read from.


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def bradley_terry_reference(h_chosen: torch.Tensor, h_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigma(h_c - h_r) per pair, [B, 1] outputs -> [B]."""
    dtype = _compute_dtype(h_chosen)
    return -F.logsigmoid(h_chosen.to(dtype) - h_rejected.to(dtype)).squeeze(1)


def mixture_reference(h_chosen: torch.Tensor, h_rejected: torch.Tensor) -> torch.Tensor:
    """-log((1/N) sum_i sigma(h_c,i - h_r,i)) per pair, [B, N] outputs -> [B].

    In log space, so that no sigma underflows: log sigma(d_i) is -softplus(-d_i), and the average
    over kinds is a logsumexp minus log N."""
    dtype = _compute_dtype(h_chosen)
    d = h_chosen.to(dtype) - h_rejected.to(dtype)  # [B, N]: kind i's reward difference
    return math.log(d.shape[1]) - torch.logsumexp(F.logsigmoid(d), dim=1)


def independent_reference(h_chosen: torch.Tensor, h_rejected: torch.Tensor) -> torch.Tensor:
    """-log((1/N^2) sum_ij sigma(h_c,i - h_r,j)) per pair, [B, N] outputs -> [B]."""
    dtype = _compute_dtype(h_chosen)
    n = h_chosen.shape[1]
    d = h_chosen.to(dtype)[:, :, None] - h_rejected.to(dtype)[:, None, :]  # [B, i, j]
    return 2 * math.log(n) - torch.logsumexp(F.logsigmoid(d).flatten(1), dim=1)


def _quantile_huber(u: torch.Tensor, tau: torch.Tensor, kappa: float) -> torch.Tensor:
    """rho_tau(u) = |tau - 1{u<0}| * H_kappa(u) / kappa, elementwise (tau broadcasts over u)."""
    weight = (tau - (u < 0).to(u.dtype)).abs()
    huber = torch.where(u.abs() <= kappa, 0.5 * u**2, kappa * (u.abs() - 0.5 * kappa))
    return weight * huber / kappa


def paper_reference(h_chosen: torch.Tensor, h_rejected: torch.Tensor, kappa: float = 1.0, lam: float = 1.0,
                    margin: float = 1.0) -> torch.Tensor:
    """The seed paper's loss per pair (module docstring), [B, N] outputs -> [B]."""
    dtype = _compute_dtype(h_chosen)
    q_c, q_r = h_chosen.to(dtype), h_rejected.to(dtype)
    n = q_c.shape[1]
    tau = quantile_levels(n, dtype=dtype, device=q_c.device)[:, None]  # [N, 1]: level of row i

    # Pairwise term on the expected rewards.
    d = q_c.mean(dim=1) - q_r.mean(dim=1)
    l_pair = -F.logsigmoid(d)  # softplus(-d)

    # Quantile-Huber term; [B, i, j] = quantile i against the (detached) target j.
    u = (q_r.detach() + margin)[:, None, :] - q_c[:, :, None]
    v = (q_c.detach() - margin)[:, None, :] - q_r[:, :, None]
    rho_c = _quantile_huber(u, tau, kappa).mean(dim=2).sum(dim=1)
    rho_r = _quantile_huber(v, tau, kappa).mean(dim=2).sum(dim=1)
    l_qr = 0.5 * (rho_c + rho_r)

    return l_pair + lam * l_qr


# ---------------------------------------------------------------------------------------------
# The objectives


@dataclass(frozen=True)
class Objective:
    """What minqr knows about one objective."""

    name: str
    summary: str  # one line, for --help and the report
    reference: object  # (h_chosen, h_rejected, **hyperparameters) -> per-pair losses [B]
    op: str  # its fused op, torch.ops.minqr.<op>(h_chosen, h_rejected, *hyperparameters, compute_grad)
    readout: str  # "raw": output i is the quantile at tau_i; "sorted": sorted, the outputs are the quantiles
    hyperparameters: dict = field(default_factory=dict)  # name -> default, in the op's argument order
    # How the head starts. "equal": every row the same small random vector (the outputs start
    # equal, so quantiles do not cross, and the quantile term spreads them in the order of their
    # levels). "independent": N independent random rows of std 1/sqrt(n_embd): identical rows
    # are a symmetric saddle of the mixture (every kind gets the same gradient, forever), so its
    # kinds must start apart.
    head_init: str = "equal"
    one_output: str = ""  # what the objective is at N = 1
    # The training settings the objective needs unless told otherwise (minqr.train.TrainConfig):
    # the response bag-of-words auxiliary's weight, the head's learning rate over the backbone's,
    # and the head's weight decay (None: the backbone's).
    training: dict = field(default_factory=lambda: {"bag_coef": 0.0, "head_lr_scale": 1.0, "head_weight_decay": None})
    default_outputs: int = 1  # N when none is given


# What made the N outputs of a mixture follow the annotators' disagreement on the synthetic task,
# where the truth is known (README, "Objectives"): the pooled state must keep every token of its
# response (the bag-of-words auxiliary, RewardModel.response_bag_loss), and the head's rows, which
# start apart and must move further apart, learn faster than the backbone and are not decayed.
DISTRIBUTIONAL_TRAINING = {"bag_coef": 5.0, "head_lr_scale": 2.5, "head_weight_decay": 0.0}
# N kinds of equal weight 1/N can only put a group's share in steps of 1/N, and need several kinds
# per group for the spread within it: 20 did what 10 could not on a task with a 75/25 split (README).
DISTRIBUTIONAL_OUTPUTS = 20

OBJECTIVES = {
    objective.name: objective for objective in (
        Objective("bradley_terry", "the scalar head: -log sigma(r_c - r_r)", bradley_terry_reference,
                  op="mixture_loss", readout="raw", one_output="itself (it has N = 1 only)"),
        Objective("mixture", "N kinds of annotator, output i is kind i's reward: "
                  "-log mean_i sigma(h_c,i - h_r,i); quantiles = the sorted outputs", mixture_reference,
                  op="mixture_loss", readout="sorted", head_init="independent",
                  one_output="bradley_terry, exactly", training=DISTRIBUTIONAL_TRAINING,
                  default_outputs=DISTRIBUTIONAL_OUTPUTS),
        Objective("independent", "independent draws of the two rewards: -log mean_ij sigma(h_c,i - h_r,j); "
                  "quantiles = the sorted outputs", independent_reference,
                  op="independent_loss", readout="sorted", head_init="independent",
                  one_output="bradley_terry, exactly", training=DISTRIBUTIONAL_TRAINING,
                  default_outputs=DISTRIBUTIONAL_OUTPUTS),
        Objective("paper", "the seed paper: Bradley-Terry on the means + quantile-Huber towards the "
                  "partner's quantiles +- margin; output i is the quantile at tau_i", paper_reference,
                  op="paper_loss", readout="raw", hyperparameters={"kappa": 1.0, "lam": 1.0, "margin": 1.0},
                  default_outputs=10,
                  one_output="bradley_terry + lam x a median regression towards the partner +- margin; "
                             "bradley_terry exactly when lam = 0"),
    )
}
# The objective of `--head quantile` when none is named: the one that recovered the synthetic
# task's true reward distributions best through the whole pipeline (README, "Objectives").
DEFAULT_OBJECTIVE = "mixture"
# At most this many outputs. Neighbouring levels are then 1/256 (0.4%) apart, finer than any
# preference data set resolves (a quantile needs many annotators on each side of it), and the N²
# objectives (paper, independent) already cost 65,536 terms a pair, each pass.
MAX_QUANTILES = 256
# The head's rows when they start "equal": on unit-scale features (a fresh ln_f) every output then
# starts near 0 with std ~0.1, so the first pairwise losses are near log 2 and no large gradient
# reaches a pretrained backbone, yet the backbone gets a gradient from the first step.
EQUAL_INIT_SCALE = 0.1


def objectives_help() -> str:
    """What each objective of a quantile head is, for the command line's --help."""
    return "; ".join(f"{o.name}: {o.summary} (at N = 1: {o.one_output})" for o in OBJECTIVES.values()
                     if o.name != "bradley_terry")


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
    if objective == "paper":
        try:
            check_paper_hyperparameters(values["kappa"], values["lam"], values["margin"])
        except (TypeError, ValueError) as error:
            raise MinqrError(str(error)) from None
    return {name: float(value) for name, value in values.items()}


# ---------------------------------------------------------------------------------------------
# The loss of a batch of pairs: the fused op where there is one, else the reference


def pair_loss(h_chosen: torch.Tensor, h_rejected: torch.Tensor, objective: str = DEFAULT_OBJECTIVE,
              reduction: str = "mean", impl: str = "auto", **hyperparameters) -> torch.Tensor:
    """The objective's loss of B pairs with outputs h_chosen, h_rejected [B, N].

    reduction: 'mean' | 'sum' | 'none' (the per-pair losses [B]). impl: 'fused' (the compiled op),
    'reference' (PyTorch), or 'auto': fused where minqr._C has a kernel for the device, else the
    reference with a warning (once per reason). Hyper-parameters as keywords (paper: kappa, lam,
    margin; the others have none), defaults from OBJECTIVES.

    Returns the loss in float32 (float64 for float64 inputs); gradients flow back in the input
    dtype. The fused ops compute each pair's gradient in their forward (when grad is enabled and an
    input requires it); the backward only scales it (minqr/ops.py).
    """
    spec = get_objective(objective)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of 'auto', 'fused', 'reference', got {impl!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    check_outputs(h_chosen, h_rejected)
    if objective == "bradley_terry" and h_chosen.shape[1] != 1:
        raise ValueError(f"objective 'bradley_terry' is the scalar head's, N = 1, but h_chosen has shape "
                         f"{list(h_chosen.shape)}; for N outputs use mixture, independent or paper")
    if reduction == "mean" and h_chosen.shape[0] == 0:
        raise ValueError("h_chosen must have B >= 1 pairs for reduction='mean' (the mean of no pairs is "
                         f"undefined), got shape {list(h_chosen.shape)}")
    hyper = {**spec.hyperparameters, **hyperparameters}
    if set(hyper) != set(spec.hyperparameters):
        raise TypeError(f"objective {objective!r} takes the hyper-parameters "
                        f"{list(spec.hyperparameters) or 'none'}, got {sorted(hyperparameters)}")
    if objective == "paper":
        check_paper_hyperparameters(hyper["kappa"], hyper["lam"], hyper["margin"])

    if impl != "reference":
        reason = ops.fused_unavailable_reason(spec.op, h_chosen.device)
        if reason is not None and impl == "fused":
            raise RuntimeError(f"impl='fused': {reason}; or pass impl='reference'")
        if reason is not None:
            _warn_once(reason)
            impl = "reference"
    if impl == "reference":
        losses = spec.reference(h_chosen, h_rejected, **hyper)
    else:
        compute_grad = torch.is_grad_enabled() and (h_chosen.requires_grad or h_rejected.requires_grad)
        op = getattr(torch.ops.minqr, spec.op)
        losses, _, _ = op(h_chosen, h_rejected, *(float(hyper[name]) for name in spec.hyperparameters),
                          compute_grad)
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


# ---------------------------------------------------------------------------------------------
# The head as saved with a model


@dataclass(frozen=True)
class HeadConfig:
    """What the head is: its kind, N outputs, its objective and that objective's hyper-parameters."""

    kind: str = "quantile"
    num_quantiles: int = DISTRIBUTIONAL_OUTPUTS
    objective: str = DEFAULT_OBJECTIVE
    hyperparameters: dict = field(default_factory=dict)  # the objective's, all of them (check_hyperparameters)

    @classmethod
    def make(cls, kind: str = "quantile", num_quantiles: int | None = None, objective: str | None = None,
             **hyperparameters) -> "HeadConfig":
        """Fill in the kind's defaults (quantile: DEFAULT_OBJECTIVE and its default N; scalar: N = 1
        and bradley_terry) and the objective's hyper-parameters, and check them all."""
        if kind not in HEAD_KINDS:
            raise MinqrError(f"head must be one of {', '.join(HEAD_KINDS)}, not {kind!r}")
        if kind == "scalar":
            if num_quantiles not in (None, 1) or objective not in (None, "bradley_terry"):
                raise MinqrError(f"the scalar head has one output trained by bradley_terry, but got "
                                 f"num_quantiles={num_quantiles}, objective={objective}: drop them or use "
                                 "head='quantile'")
            return cls("scalar", 1, "bradley_terry", check_hyperparameters("bradley_terry", hyperparameters))
        objective = objective or DEFAULT_OBJECTIVE
        n = get_objective(objective).default_outputs if num_quantiles is None else num_quantiles
        return cls("quantile", n, objective, check_hyperparameters(objective, hyperparameters))

    def __post_init__(self):
        problems = []
        if self.kind not in HEAD_KINDS:
            problems.append(f"head={self.kind!r} is not one of {', '.join(HEAD_KINDS)}")
        n = self.num_quantiles
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_QUANTILES:
            problems.append(f"num_quantiles={n!r} must be an integer from 1 to {MAX_QUANTILES} (more levels than "
                            "preference data can resolve, at a cost that grows as N²)")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective={self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        elif (self.kind == "scalar") != (self.objective == "bradley_terry"):
            problems.append(f"the {self.kind} head cannot be trained by {self.objective} "
                            "(bradley_terry is the scalar head's objective, and only its)")
        elif self.kind == "scalar" and n != 1:
            problems.append(f"the scalar head has num_quantiles=1, not {n}")
        else:
            try:
                check_hyperparameters(self.objective, self.hyperparameters)
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
        if self.kind == "scalar":
            return ["reward"]
        prefix = "q" if self.readout == "raw" else "kind"
        return [f"{prefix}{i}" for i in range(self.num_quantiles)]

    def loss(self, h_chosen: torch.Tensor, h_rejected: torch.Tensor, reduction: str = "mean",
             impl: str = "auto") -> torch.Tensor:
        """This head's objective on outputs [B, N] (see pair_loss)."""
        return pair_loss(h_chosen, h_rejected, self.objective, reduction, impl, **self.hyperparameters)

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
        return {"head": self.kind, "num_quantiles": self.num_quantiles, "objective": self.objective,
                **self.hyperparameters, "readout": self.readout, "quantile_levels": self.levels}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "HeadConfig":
        """From config.json's minqr section. Models saved before objectives existed have none: their
        quantile heads were trained by `paper` (its kappa, lam, margin are in the section), their
        scalar heads by bradley_terry (paper with lam = 0, the same function)."""
        missing = [k for k in ("head", "num_quantiles") if k not in d]
        if missing:
            raise MinqrError(f"{where}: the minqr section lacks {', '.join(missing)}; re-save the model with minqr")
        objective = d.get("objective") or ("bradley_terry" if d["head"] == "scalar" else "paper")
        names = OBJECTIVES[objective].hyperparameters if objective in OBJECTIVES else {}
        missing = [k for k in names if k not in d]
        if missing:
            raise MinqrError(f"{where}: the minqr section lacks {', '.join(missing)}, a hyper-parameter of its "
                             f"objective {objective}; re-save the model with minqr")
        try:
            return cls(d["head"], d["num_quantiles"], objective,
                       check_hyperparameters(objective, {k: d.get(k) for k in names}))
        except MinqrError as e:
            raise MinqrError(f"{where}: {e}") from None

