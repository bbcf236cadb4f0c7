"""One number out of a reward distribution: the expected reward, a quantile, the lower-tail CVaR,
mean − λ·std, or the population's preference P(y ≻ y0), each relative to a reference reply.

Why relative. A reward model learns from pairs, and a pair only shows a difference of rewards, so
each reward is known up to a constant that the data never fixes. A scalar head has one such
constant; it cancels in any ranking. A mixture head has one **per kind**: output k is kind k's
reward h_k(y), and adding c_k to every text's output k leaves the loss unchanged for any c_1..c_N.
Sorting the raw outputs of one text therefore mixes those arbitrary constants with the kinds'
disagreement, and its "quantiles", CVaR or band mean nothing. The differences to a reference reply
y0 to the same prompt do:

    d_k(y) = h_k(y) − h_k(y0)        kind by kind; the constants cancel

and their distribution over the kinds (N atoms of weight 1/N) is the population's reward of y
relative to y0. Every statistic below is a statistic of that distribution, so it is invariant to
per-kind constants, and comparable across prompts (each prompt has its own reference).

The reference. Either a reply given per prompt (`reference`: the raw outputs [B, N] of, say, the
SFT model's answer or a fixed refusal, row by row), or the `group` of candidates for the same prompt
(`group`: an id per row; rows with the same id answer the same prompt). A group's reference is its
mean output, kind by kind: GRPO samples several completions per prompt, and then needs no extra
reply. A group of one is its own reference: for a mixture every difference is 0 (preference 0.5)
whatever the reply says, so the adapters and the server refuse one (`lone_member`).

What relative means for each objective (the head's objective says what its outputs are):

- mixture (and N = 1: bradley_terry, a mixture of one kind): output k is kind k's reward, with its
  own free constant, so the reference is subtracted kind by kind, as above.
- independent, paper: the outputs are not tied to kinds. independent's outputs are N equally likely
  draws of the reward (its loss compares every output of one reply with every output of the other),
  paper's are the quantiles at tau_i; either way the loss is invariant only to one constant shared
  by all outputs. Their relative outputs are the text's quantiles (its sorted outputs) minus the
  reference's mean reward (the mean of its outputs; a group's reference averages its members'
  sorted outputs, i.e. their quantile functions). Subtracting a reference's whole vector would
  couple the two distributions kind by kind, which these objectives never learnt.

The statistics of the relative distribution d (N atoms of weight 1/N):

- mean: (1/N) Σ_k d_k, the expected reward relative to the reference. Without a reference it is
  the expected reward itself (the mean of the raw outputs, as `export --scalar` gives): its only
  free constant is one shared by all texts, which no ranking or RL advantage sees.
- quantile:τ: the quantile function at τ, read as minqr reads a head everywhere: linear through
  the points (tau_i, d_(i)) of the sorted atoms at tau_i = (2i+1)/(2N), flat beyond the outermost.
- cvar:α: the lower-tail conditional value at risk, the mean reward of the worst-off share α of
  the population, (1/α)∫_0^α q(u) du of the N atoms (the atom at the boundary counted in part).
  α = 1 is the mean; α → 0 the worst kind.
- mean_minus_std:λ: mean − λ·std, the std of the N atoms (divided by N, a population's).
- preference: the probability that a judge drawn from the population prefers y to y0, in the
  objective's own pair model: mixture (1/N) Σ_k σ(d_k), the mixture's likelihood; independent
  (1/N²) Σ_ij σ(h_i(y) − h_j(y0)); paper σ(mean(y) − mean(y0)), its Bradley-Terry term. Bounded in
  (0, 1), comparable across prompts; always needs a reference.

With N = 1 every statistic but preference is the reward difference r(y) − r(y0) (the raw reward
without a reference), and preference is σ(r(y) − r(y0)). With N > 1 every statistic but the mean
needs a reference: without one this module raises a MinqrError rather than sort raw outputs.

Weighted kinds (`weights`, a mixture's only). The population weighs its N kinds equally; one
person is a posterior q over the kinds (minqr/distribution/personal.py), and their statistic is the
same statistic of the same atoms d_k with weight q_k instead of 1/N: mean Σ q_k d_k, std
√(Σ q_k (d_k − mean)²), preference Σ q_k σ(d_k), the lower CVaR of the masses q_(i) in sorted
order, and the quantile at τ the mean of the step quantile function over [τ − 1/(2N), τ + 1/(2N)]
(the window kept inside [0, 1]), which at q = 1/N is exactly the line through the tau_i above.
independent's and paper's outputs are not kinds, so weighting them is refused.
"""
import math
from dataclasses import dataclass

import torch

from minqr.errors import MinqrError
from minqr.objectives.pair_models import DRAWS, KINDS, pair_model

STATISTICS = ("mean", "quantile", "cvar", "mean_minus_std", "preference")
# the statistics that take a level, with its meaning and its range, for messages
LEVELS = {"quantile": "tau in [0, 1]", "cvar": "alpha in (0, 1]", "mean_minus_std": "lambda >= 0"}
EXAMPLES = "mean, quantile:0.1, cvar:0.25, mean_minus_std:1.0, preference"


@dataclass(frozen=True)
class Statistic:
    """A statistic of the relative reward distribution: its name and level (None for mean and
    preference). `str()` gives it back as text, "quantile:0.1"."""

    name: str
    level: float | None = None

    def __post_init__(self):
        if self.name not in STATISTICS:
            raise MinqrError(f"unknown statistic {self.name!r}: choose one of {EXAMPLES}")
        if self.name not in LEVELS:
            if self.level is not None:
                raise MinqrError(f"statistic {self.name} takes no level, got {self.level}")
            return
        if self.level is None:
            raise MinqrError(f"statistic {self.name} needs a level ({LEVELS[self.name]}), e.g. {self.name}:0.25")
        level = self.level
        ok = (isinstance(level, (int, float)) and not isinstance(level, bool) and math.isfinite(level)
              and {"quantile": 0 <= level <= 1, "cvar": 0 < level <= 1, "mean_minus_std": level >= 0}[self.name])
        if not ok:
            raise MinqrError(f"statistic {self.name}: the level must be {LEVELS[self.name]}, got {level!r}")
        object.__setattr__(self, "level", float(level))

    def __str__(self) -> str:
        if self.level is None:
            return self.name
        short = f"{self.level:g}"  # "1", "0.25"; in full where that would name another level
        return f"{self.name}:{short if float(short) == self.level else repr(self.level)}"

    def needs_reference(self, num_outputs: int) -> bool:
        """Whether it needs a reference for a head of `num_outputs` outputs: every statistic but the
        mean at N > 1 (the kinds' constants), and the preference at any N (a probability of beating
        something)."""
        return self.name == "preference" or (num_outputs > 1 and self.name != "mean")


def parse_statistic(text: str) -> Statistic:
    """"mean", "quantile:0.1", "cvar:0.25", "mean_minus_std:1.0", "preference" -> a Statistic."""
    name, colon, level = str(text).strip().partition(":")
    if name not in STATISTICS:
        raise MinqrError(f"unknown statistic {text!r}: choose one of {EXAMPLES}")
    if not colon:
        return Statistic(name)
    try:
        value = float(level)
    except ValueError:
        takes = LEVELS.get(name, "no level")
        raise MinqrError(f"statistic {text!r}: {level!r} is not a number ({name} takes {takes}); "
                         f"choose one of {EXAMPLES}") from None
    return Statistic(name, value)


def _check(outputs: torch.Tensor, reference, group) -> None:
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2 or outputs.shape[1] < 1:
        shape = list(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise MinqrError(f"outputs must be a [B, N] tensor of raw head outputs, got {shape}")
    if reference is not None and group is not None:
        raise MinqrError("give a reference reply's outputs or a group per row, not both")
    if reference is not None and (not isinstance(reference, torch.Tensor) or reference.shape != outputs.shape):
        shape = list(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
        raise MinqrError(f"reference must be the raw outputs of a reference reply per row, shape "
                         f"{list(outputs.shape)} like outputs, got {shape}")
    if group is not None and (not isinstance(group, torch.Tensor) or group.shape != outputs.shape[:1]
                              or group.is_floating_point() or group.is_complex()):
        shape = f"{group.dtype} {list(group.shape)}" if isinstance(group, torch.Tensor) else type(group).__name__
        raise MinqrError(f"group must be an integer tensor [B] = {list(outputs.shape[:1])} (one prompt id per row), "
                         f"got {shape}")


def _compute_dtype(outputs: torch.Tensor) -> torch.dtype:
    # float64 stays float64; half precisions are widened, since differences of close rewards round away
    return torch.float64 if outputs.dtype == torch.float64 else torch.float32


def _group_mean(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """values [B, N], group [B] -> [B, N]: each row replaced by the mean of the rows of its group."""
    _, index = torch.unique(group, return_inverse=True)  # [B], groups numbered 0..G-1
    count = torch.bincount(index).to(values.dtype)  # [G]
    sums = torch.zeros(count.shape[0], values.shape[1], dtype=values.dtype, device=values.device)
    sums.index_add_(0, index, values)  # [G, N]
    return (sums / count[:, None])[index]


def _reference_rows(outputs, reference, group, by_kind: bool) -> torch.Tensor:
    """The reference for each row [B, N] in the compute dtype: per kind (by_kind) or as quantiles."""
    dtype = _compute_dtype(outputs)
    if group is not None:
        values = outputs.to(dtype) if by_kind else outputs.to(dtype).sort(dim=-1).values
        return _group_mean(values, group.to(outputs.device))
    reference = reference.to(device=outputs.device, dtype=dtype)
    return reference if by_kind else reference.sort(dim=-1).values


def _require_reference(reference, group, what: str) -> None:
    if reference is None and group is None:
        raise MinqrError(f"{what} needs a reference: the raw outputs of a reply to the same prompt (reference=...) "
                         "or the group of candidates for the same prompt (group=...). A mixture's kinds each have "
                         "their own free constant, so a spread of raw outputs mixes those constants with the "
                         "population's disagreement")


def relative_outputs(outputs: torch.Tensor, *, reference: torch.Tensor | None = None,
                     group: torch.Tensor | None = None, objective: str = "mixture") -> torch.Tensor:
    """Raw outputs [B, N] -> the reward distribution relative to the reference, [B, N] atoms.

    mixture (bradley_terry): h_k(y) − h_k(y0) kind by kind, y0 the row's reference reply or its
    group's mean output. independent, paper: the sorted outputs minus the reference's mean reward.
    Exactly one of `reference` ([B, N] raw outputs) and `group` ([B] ids) must be given."""
    _check(outputs, reference, group)
    _require_reference(reference, group, "a relative reward distribution")
    by_kind = pair_model(objective) == KINDS  # output k is kind k's reward, with its own constant
    ref = _reference_rows(outputs, reference, group, by_kind)  # [B, N]
    values = outputs.to(_compute_dtype(outputs))
    if by_kind:
        return values - ref
    return values.sort(dim=-1).values - ref.mean(-1, keepdim=True)  # [B, N] - [B, 1]


def quantile_at(ordered: torch.Tensor, tau: float, masses: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted atoms [..., N] -> [...] the quantile function at tau: linear through (tau_i, q_i),
    tau_i = (2i+1)/(2N), flat beyond tau_0 and tau_{N-1} (nothing is said about the tails).
    `masses` [..., N], the atoms' weights in the same order (see _weighted_quantile_at)."""
    if masses is not None:
        return _weighted_quantile_at(ordered, tau, masses)
    n = ordered.shape[-1]
    # tau_i = (2i+1)/(2N), so tau sits at fractional index tau*N - 1/2 of the levels
    position = min(max(tau * n - 0.5, 0.0), n - 1.0)
    below = min(int(position), max(n - 2, 0))
    weight = position - below
    return ordered[..., below] * (1 - weight) + ordered[..., min(below + 1, n - 1)] * weight


def quantile_band(quantiles: torch.Tensor, level: float = 0.9) -> tuple:
    """[B, N] quantiles at tau_i = (2i+1)/(2N) -> (reward, lower, upper), each [B].

    reward is the mean of the quantiles, the expected reward. lower and upper are the quantile
    function at (1 - level)/2 and (1 + level)/2, read off the piecewise-linear curve through the
    points (tau_i, q_i); beyond the outermost levels tau_0 and tau_{N-1} it is flat (the model says
    nothing about the tails, and extrapolating would invent them), so a level of at least
    1 - 1/N gives the band [min q, max q], and N = 1 gives lower = upper = reward. The quantiles
    are sorted first (a model may output crossing quantiles; sorting is the monotone
    rearrangement, which leaves the mean unchanged). The mean can lie outside a narrow band of
    a skewed distribution.
    """
    if not 0 <= level <= 1:
        raise MinqrError(f"level must lie in [0, 1] (e.g. 0.9 for the 5%-95% band), got {level}")
    ordered = quantiles.sort(dim=-1).values
    return quantiles.mean(-1), quantile_at(ordered, (1 - level) / 2), quantile_at(ordered, (1 + level) / 2)


def _weighted_quantile_at(ordered: torch.Tensor, tau: float, masses: torch.Tensor) -> torch.Tensor:
    """quantile_at for atoms of unequal mass: the mean of the step quantile function over the window
    of width 1/N centred on tau, the window kept inside [0, 1] (so flat beyond tau_0 and tau_{N-1}).
    At equal masses 1/N this is the line through the tau_i; unlike a line through the midpoints of
    unequal masses, an atom of little mass moves it little (a person all of one kind has that
    kind's value at every tau)."""
    n = ordered.shape[-1]
    centre = min(max(tau, 0.5 / n), 1.0 - 0.5 / n)
    inside = _mass_below(masses, centre + 0.5 / n) - _mass_below(masses, centre - 0.5 / n)  # [..., N]
    return (ordered * inside).sum(-1) * n


def _mass_below(masses: torch.Tensor, level: float) -> torch.Tensor:
    """Each sorted atom's share of the mass in [0, level], [..., N]."""
    starts = masses.cumsum(-1) - masses  # [..., N] the mass before atom i
    return torch.minimum((level - starts).clamp(min=0.0), masses)


def lower_cvar(ordered: torch.Tensor, alpha: float, masses: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted atoms [..., N] of weight 1/N (or `masses` [..., N], in the same order) -> [...] the
    mean of the lowest share alpha of the mass."""
    if masses is None:
        masses = torch.full_like(ordered, 1.0 / ordered.shape[-1])
    # each atom's mass inside [0, alpha]: all of it for the atoms wholly below, the rest for the one across
    return (ordered * _mass_below(masses, alpha)).sum(-1) / alpha


def _checked_weights(weights, outputs: torch.Tensor, objective: str) -> torch.Tensor:
    """The weights as [B, N] in the compute dtype, or a MinqrError that says what is wrong."""
    if pair_model(objective) != KINDS:
        raise MinqrError(f"weights over the kinds need a mixture head: {objective}'s outputs are not kinds "
                         "(output k is no one kind's reward across texts), so no person is a weighting of them")
    if not isinstance(weights, torch.Tensor) or weights.shape not in (outputs.shape, outputs.shape[1:]):
        shape = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise MinqrError(f"weights must be [B, N] = {list(outputs.shape)} or [N] = {list(outputs.shape[1:])} "
                         f"(a distribution over the kinds), got {shape}")
    weights = weights.to(device=outputs.device, dtype=_compute_dtype(outputs)).expand(outputs.shape)  # [B, N]
    tolerance = 1e-4 if weights.dtype == torch.float32 else 1e-9
    if not (torch.isfinite(weights).all() and (weights >= 0).all()
            and ((weights.sum(-1) - 1).abs() <= tolerance).all()):
        raise MinqrError("weights must be finite, non-negative and sum to 1 over the kinds in every row")
    return weights


def statistic_values(statistic, outputs: torch.Tensor, *, reference: torch.Tensor | None = None,
                     group: torch.Tensor | None = None, objective: str = "mixture",
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """The statistic (a Statistic or its text) of each row's reward distribution, [B], relative to
    the reference (see the module's docstring). Raw outputs [B, N]; `reference` [B, N] or `group`
    [B], or neither for the mean (and, at N = 1, for any statistic but preference). `weights`
    [B, N] or [N]: the kinds' weights (a person's posterior) in place of 1/N, a mixture's only."""
    statistic = statistic if isinstance(statistic, Statistic) else parse_statistic(statistic)
    _check(outputs, reference, group)
    model = pair_model(objective)
    if weights is not None:
        weights = _checked_weights(weights, outputs, objective)
    n = outputs.shape[1]
    dtype = _compute_dtype(outputs)
    if reference is None and group is None:
        if statistic.needs_reference(n):
            _require_reference(None, None, f"statistic {statistic}" + (f" of {n} outputs" if n > 1 else ""))
        values = outputs.to(dtype)
        # N = 1: the reward; N > 1: the expected reward (the person's, weighted)
        return values.mean(-1) if weights is None else (values * weights).sum(-1)
    if statistic.name == "preference":
        return _preference(outputs, reference, group, model, weights)
    relative = relative_outputs(outputs, reference=reference, group=group, objective=objective)  # [B, N]
    if weights is not None:
        return _weighted_statistic(statistic, relative, weights)
    if statistic.name in ("mean", "mean_minus_std"):
        mean, spread = mean_and_spread(relative)
        return mean if statistic.name == "mean" else mean - statistic.level * spread
    ordered = relative.sort(dim=-1).values
    if statistic.name == "quantile":
        return quantile_at(ordered, statistic.level)
    return lower_cvar(ordered, statistic.level)


def mean_and_spread(relative: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([B], [B]): the mean and the standard deviation of each row's relative reward distribution,
    atoms `relative` [B, N] of masses `weights` [B, N] (a person's posterior) or 1/N: what the
    adapters log beside a reward (the spread: how much the judges disagree about the reply)."""
    if weights is None:
        return relative.mean(-1), relative.std(-1, correction=0)
    mean = (relative * weights).sum(-1)  # [B]
    return mean, ((relative - mean[:, None]) ** 2 * weights).sum(-1).sqrt()


def lone_member(group: torch.Tensor) -> int | None:
    """The first row of `group` [B] (an id per row) whose group has no other row, or None. A lone
    reply is its own reference: a mixture's is worth 0 whatever it says, another head's keeps only
    its own spread. Callers refuse it."""
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    alone = (counts[inverse] == 1).nonzero()
    return int(alone[0]) if len(alone) else None


def _weighted_statistic(statistic: Statistic, relative: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The statistic of atoms `relative` [B, N] of masses `weights` [B, N] (not preference)."""
    if statistic.name in ("mean", "mean_minus_std"):
        mean, spread = mean_and_spread(relative, weights)
        return mean if statistic.name == "mean" else mean - statistic.level * spread
    ordered, order = relative.sort(dim=-1)
    masses = weights.gather(-1, order)  # [B, N] each sorted atom's mass
    if statistic.name == "quantile":
        return quantile_at(ordered, statistic.level, masses)
    return lower_cvar(ordered, statistic.level, masses)


def _preference(outputs, reference, group, model: str, weights=None) -> torch.Tensor:
    """P(y ≻ y0) [B] in the objective's own pair model (minqr/objectives/pair_models.py); a
    mixture's kinds weighted by `weights`."""
    values = outputs.to(_compute_dtype(outputs))
    if model == KINDS:
        ref = _reference_rows(outputs, reference, group, by_kind=True)
        chances = torch.sigmoid(values - ref)  # [B, N]
        return chances.mean(-1) if weights is None else (chances * weights).sum(-1)
    ref = _reference_rows(outputs, reference, group, by_kind=False)  # [B, N] the reference's quantiles
    if model == DRAWS:
        return torch.sigmoid(values[:, :, None] - ref[:, None, :]).mean((-2, -1))  # [B, N, N] every draw against every
    return torch.sigmoid(values.mean(-1) - ref.mean(-1))  # "means"
