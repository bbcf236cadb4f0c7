"""Personal rewards: one annotator's reward, from the posterior over a mixture's kinds.

A mixture head's output k is kind k's reward h_k(y), one reward function across all texts, and
the population judges a pair by a kind drawn uniformly: P(c ≻ r) = (1/N) Σ_k σ(h_k(c) − h_k(r)).
When the data says who gave each label, an annotator's labels are evidence of their kind. With a
prior π over the kinds (below; 1/N each by default) and their labelled pairs D_a (each pair j:
chosen c_j over rejected r_j),

    q_a(k) ∝ π_k Π_{j∈D_a} σ(h_k(c_j) − h_k(r_j) − m_j)       (m_j the pair margin, 0 without one)

computed in log space, log q_a = log π + Σ_j log σ(...) − logsumexp_k(the same), and their personal
preference is the mixture's with the kinds weighted by q_a instead of 1/N:

    P_a(y ≻ y') = Σ_k q_a(k) σ(h_k(y) − h_k(y'))

Any other statistic relative to a reference (minqr/distribution/statistics.py) is personal in the
same way: `statistic_values(..., weights=q_a)`. With no labels q_a is the prior; the population's
reward (a label drawn from the mixture as trained, `None` for an annotator in the adapters) is
always 1/N each. With many labels, q_a concentrates on the kind that explains them.

Only a mixture has kinds. A scalar head (bradley_terry, N = 1) has one kind, which every posterior
is; independent's outputs are N draws of the population's reward and paper's its quantiles, so
neither output k is one kind's reward across texts, and a posterior over them is refused.

The posteriors of many annotators are one batched pass: the per-pair log-likelihoods [P, N] are
summed into [A, N] by an index_add over each pair's annotator index, then normalised per row.

The prior. The mixture is trained with each kind drawn with probability 1/N, but people need not be
spread evenly over the kinds: some kinds explain many annotators, some hardly any. When the labels
come from many annotators (at least PRIOR_ANNOTATORS_A_KIND a kind), the prior over the kinds is
fitted to them: the shares π that make their labels likeliest, Σ_a log Σ_k π_k Π_{j∈D_a} σ(...),
by expectation-maximisation (π ← the mean of the posteriors under π, a batched step over [A, N]).
Every posterior then starts from π instead of 1/N, and π is saved with the posteriors, so that a
new person's few labels start from it too (empirical Bayes). The prior is fitted only to a model's
whole population of annotators (training's, or personalize's when its labels replace every
annotator the model knows); people added beside them, and people scored from --context, start
from the model's prior, uniform or fitted. With fewer annotators the prior stays uniform.
docs/personal.md has what it changes.

`Annotators` holds the posteriors of named annotators (ids strings or integers, as the data gave
them) and is saved beside a model's config.json as annotators.json; a model folder without that
file has no known annotators and loads as before. `labelled_annotators` makes them from scored
labelled pairs; `personal_scores` gives scored pairs of known annotators the personal columns of a
scores file (minqr/study/scores_file.py). The commands are in minqr/study/personalize.py;
docs/personal.md is the user's guide.
"""
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minqr.atomic import atomic_file, record_made
from minqr.distribution.statistics import statistic_values
from minqr.errors import MinqrError
from minqr.objectives.pair_models import KINDS, pair_model
from minqr.reading import first_repeated, loads

NO_IDS = ("names no annotators (an 'annotator' field, or the one --annotator-field names): "
          "name the person whose labels they are with --annotator")
ANNOTATORS_FILE = "annotators.json"
FORMAT = 1  # annotators.json's layout version
PRIOR_ANNOTATORS_A_KIND = 10  # annotators a kind below which the prior stays uniform: too few to fit N - 1 shares
PRIOR_ITERATIONS = 500  # EM steps at most; a share that vanishes converges slowly, the others within ~100
PRIOR_FLOOR = 1e-6  # the least share a kind keeps: enough labels of a new person can still point to it


def has_kinds(objective: str, num_outputs: int) -> bool:
    """Whether a head's outputs are several kinds, which a posterior weighs (check_personal says why not)."""
    return pair_model(objective) == KINDS and num_outputs >= 2


def check_personal(objective: str, num_outputs: int) -> None:
    """Refuse, with the reason, a head whose outputs are not several kinds (see the docstring)."""
    if pair_model(objective) != KINDS:
        raise MinqrError(f"personal rewards need a mixture head (objective mixture, N > 1): {objective}'s outputs "
                         "are not kinds: output k is no one kind's reward across texts, so no annotator is a "
                         "weighting of them")
    if num_outputs < 2:
        raise MinqrError("personal rewards need a mixture head (objective mixture, N > 1): with one kind (a "
                         "scalar head's, or a mixture of one) every annotator's posterior is that kind, nothing "
                         "personal to learn")


def _checked_outputs(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if not (isinstance(chosen, torch.Tensor) and isinstance(rejected, torch.Tensor) and chosen.dim() == 2
            and chosen.shape == rejected.shape):
        shapes = [list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (chosen, rejected)]
        raise MinqrError(f"chosen and rejected must be raw head outputs of the same shape [P, N], got {shapes}")


def log_likelihood_sums(chosen: torch.Tensor, rejected: torch.Tensor, annotator: torch.Tensor, num_annotators: int,
                        pair_margin: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_{j∈D_a} log σ(h_k(c_j) − h_k(r_j) − m_j) for every annotator a and kind k: [A, N], float64.
    chosen, rejected: raw outputs [P, N]; annotator [P]: each pair's annotator index in 0..A-1;
    pair_margin [P] or None. Sums of several batches add up to the sums of all their pairs."""
    _checked_outputs(chosen, rejected)
    return kind_margin_sums(chosen.double() - rejected.double(), annotator, num_annotators, pair_margin)


def kind_margin_sums(differences: torch.Tensor, annotator: torch.Tensor, num_annotators: int,
                     pair_margin: torch.Tensor | None = None) -> torch.Tensor:
    """log_likelihood_sums from the kinds' margins: differences [P, N] = h_k(c_j) − h_k(r_j) (or a
    multiple of them: minqr/distribution/scale.py tries several), the rest as there. [A, N], float64."""
    p = differences.shape[0]
    if (not isinstance(annotator, torch.Tensor) or annotator.shape != (p,) or annotator.is_floating_point()
            or annotator.dtype == torch.bool):
        raise MinqrError(f"annotator must be an integer tensor [P] = [{p}] of annotator indices")
    if p and (int(annotator.min()) < 0 or int(annotator.max()) >= num_annotators):
        raise MinqrError(f"annotator indices must be in 0..{num_annotators - 1}, got "
                         f"{int(annotator.min())}..{int(annotator.max())}")
    margins = differences.double()  # [P, N]
    if pair_margin is not None:
        margins = margins - pair_margin.to(device=margins.device, dtype=torch.float64)[:, None]
    sums = torch.zeros(num_annotators, differences.shape[1], dtype=torch.float64, device=differences.device)
    return sums.index_add_(0, annotator.to(differences.device), torch.nn.functional.logsigmoid(margins))  # [A, N]


def normalised(log_likelihoods: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """Log-likelihood sums [A, N] -> log-posteriors [A, N] under the prior `log_prior` [N] (log π;
    None: uniform, which cancels)."""
    if log_prior is not None:
        log_likelihoods = log_likelihoods + log_prior.to(log_likelihoods)  # [A, N] + [N]
    return log_likelihoods - torch.logsumexp(log_likelihoods, dim=-1, keepdim=True)


def population_prior(log_likelihoods: torch.Tensor) -> torch.Tensor | None:
    """log π [N], float64: the kinds' shares that make the annotators' labels likeliest (the module
    docstring), from their log-likelihood sums [A, N]; None (uniform) for fewer than
    PRIOR_ANNOTATORS_A_KIND annotators a kind. Rows that are -inf for every kind are left out."""
    # an annotator whose labels no kind can give (a non-finite output) says nothing of the shares
    sums = log_likelihoods.double()
    sums = sums[torch.isfinite(torch.logsumexp(sums, dim=-1))]  # [A', N]
    num_annotators, n = sums.shape
    if num_annotators < PRIOR_ANNOTATORS_A_KIND * n:
        return None
    log_prior = torch.full((n,), -math.log(n), dtype=torch.float64, device=sums.device)
    floor = math.log(PRIOR_FLOOR)
    for _ in range(PRIOR_ITERATIONS):
        # EM: the expected share of each kind among the annotators, under the current prior
        shares = torch.logsumexp(normalised(sums, log_prior), dim=0) - math.log(num_annotators)  # [N]
        shares = shares.clamp(min=floor)
        shares = shares - torch.logsumexp(shares, dim=0)  # the floor's mass taken back
        converged = bool((shares - log_prior).abs().max() < 1e-9)
        log_prior = shares
        if converged:
            break
    return log_prior


def personal_preference(chosen: torch.Tensor, rejected: torch.Tensor, log_posterior: torch.Tensor) -> torch.Tensor:
    """P_a(chosen ≻ rejected) = Σ_k q_a(k) σ(h_k(c) − h_k(r)), [B]: raw outputs [B, N] and each
    row's annotator's log-posterior [B, N]."""
    _checked_outputs(chosen, rejected)
    # float32 weights sum to 1 only within rounding, so the sum can pass 1 by an ulp: clamp it back
    return statistic_values("preference", chosen, reference=rejected, weights=log_posterior.exp()).clamp(0.0, 1.0)


@dataclass(frozen=True)
class Annotators:
    """Named annotators and their log-posteriors over a model's kinds."""

    ids: tuple  # each a str or an int, as the data gave it; no two equal
    log_posteriors: torch.Tensor  # [A, N] float64, each from log_prior
    pairs: tuple  # how many labelled pairs each posterior is from
    # [N] float64, log π: the prior over the kinds that the posteriors start from and a new person's
    # labels start from too (population_prior); None: uniform
    log_prior: torch.Tensor | None = None

    def __post_init__(self):
        a = len(self.ids)
        if self.log_posteriors.dim() != 2 or self.log_posteriors.shape[0] != a or len(self.pairs) != a:
            raise MinqrError(f"annotators: {a} ids, {len(self.pairs)} pair counts and log-posteriors of shape "
                             f"{list(self.log_posteriors.shape)} do not belong together")
        if len(set(self.ids)) != a:
            raise MinqrError("annotators: an id is given twice")
        if self.log_prior is not None and self.log_prior.shape != (self.log_posteriors.shape[1],):
            raise MinqrError(f"annotators: a prior of shape {list(self.log_prior.shape)} over kinds whose "
                             f"posteriors have {self.log_posteriors.shape[1]}")

    @classmethod
    def from_sums(cls, ids: tuple, log_likelihoods: torch.Tensor, pairs: tuple,
                  log_prior: torch.Tensor | None = None, fit_prior: bool = True) -> "Annotators":
        """The annotators `ids` from their log-likelihood sums [A, N] (log_likelihood_sums) and their
        pair counts: their posteriors under `log_prior` [N], or, when None, under the prior fitted to
        them (population_prior; uniform when they are too few, or without `fit_prior`)."""
        # a log-likelihood of -inf or NaN under a kind leaves no posterior that annotators.json could hold
        # (it held NaN, and every later read refused the file): a model output that is not finite on one
        # of their texts, or a margin far beyond the rewards' scale (log σ(−1e308) summed over pairs)
        finite = torch.isfinite(log_likelihoods).all(-1)  # [A]
        if not bool(finite.all()):
            who = ids[int((~finite).nonzero()[0])]
            raise MinqrError(f"the labels of annotator {who!r} are impossible under some kind of the model (a "
                             "log-likelihood that is infinite or not a number): a model output that is not finite "
                             "on one of their texts, or a pair's margin far beyond the rewards' scale, does that; "
                             "check the margins of their pairs")
        if log_prior is None and fit_prior:
            log_prior = population_prior(log_likelihoods)
        log_prior = None if log_prior is None else log_prior.double().cpu()
        return cls(tuple(ids), normalised(log_likelihoods.double().cpu(), log_prior), tuple(pairs), log_prior)

    @property
    def num_kinds(self) -> int:
        return self.log_posteriors.shape[1]

    def describe_prior(self, kept: bool = False) -> str:
        """A line on the prior: fitted or uniform, and how many kinds it spreads over; `kept`: the
        model's, kept while new people were added beside its annotators."""
        n = self.num_kinds
        if self.log_prior is None:
            if kept:
                return (f"the prior over the {n} kinds stays uniform, the model's: its annotators' posteriors are "
                        "from it (a prior is fitted when the labels of every annotator are given together: "
                        "training, or personalize --overwrite of them all)")
            return (f"the prior over the {n} kinds is uniform (a prior is fitted to at least "
                    f"{PRIOR_ANNOTATORS_A_KIND * n:,} annotators, {PRIOR_ANNOTATORS_A_KIND} a kind)")
        prior = self.log_prior.exp()
        spread = math.exp(-float((prior * self.log_prior).sum()))  # the exponential of its entropy
        source = "the model's, kept" if kept else "fitted to the annotators"
        return (f"the prior over the {n} kinds, {source}: as spread as {spread:.1f} equal kinds, the largest share "
                f"{float(prior.max()):.3f}; new people's labels start from it (docs/personal.md)")

    def index(self, ids) -> torch.Tensor:
        """Each id's row, [B] long, -1 for an id not known here (or None)."""
        rows = {annotator: row for row, annotator in enumerate(self.ids)}
        return torch.tensor([rows.get(annotator, -1) if annotator is not None else -1 for annotator in ids],
                            dtype=torch.long)

    def resolve(self, name: str | int):
        """The id known here that `name` gives (a command line's "7" is the integer id 7 when only
        that is known), or None."""
        check_annotator_name(name)
        known = set(self.ids)
        if name in known:
            return name
        # ASCII digits: str.isdigit() also takes "²", which int() refuses
        as_int = int(name) if isinstance(name, str) and re.fullmatch(r"\s*-?[0-9]+\s*", name) else None
        return as_int if as_int in known else None

    def merged(self, other: "Annotators") -> "Annotators":
        """These annotators with `other`'s added; an id in both takes `other`'s posterior. The prior
        stays these annotators' (the population a model was trained on, uniform or not) while any of
        them stays; when `other` replaces them all, it is `other`'s."""
        if len(self.ids) and len(other.ids) and other.num_kinds != self.num_kinds:
            raise MinqrError(f"annotators over {other.num_kinds} kinds cannot join ones over {self.num_kinds}")
        replaced = set(other.ids)
        kept = [row for row, annotator in enumerate(self.ids) if annotator not in replaced]
        return Annotators(tuple(self.ids[r] for r in kept) + tuple(other.ids),
                          torch.cat([self.log_posteriors[kept], other.log_posteriors.to(self.log_posteriors)]),
                          tuple(self.pairs[r] for r in kept) + tuple(other.pairs),
                          self.log_prior if kept else other.log_prior)

    def save(self, folder) -> Path:
        """Write annotators.json into a model's folder, atomically; the folder's .minqr-made list (if
        minqr made it) learns of the file, so that the folder stays one minqr may replace."""
        path = Path(folder) / ANNOTATORS_FILE
        rows = [{"id": annotator, "pairs": count, "log_posterior": values}
                for annotator, count, values in zip(self.ids, self.pairs, self.log_posteriors.tolist())]
        prior = None if self.log_prior is None else self.log_prior.tolist()
        text = json.dumps({"format": FORMAT, "num_kinds": self.num_kinds, "log_prior": prior, "annotators": rows}) + "\n"
        with atomic_file(path) as tmp:
            tmp.write_text(text)
        record_made(Path(folder), ANNOTATORS_FILE)
        return path

    @classmethod
    def load(cls, folder, num_kinds: int | None = None) -> "Annotators | None":
        """The annotators saved in a model's folder, None when it has no annotators.json. `num_kinds`
        (the model's N) is checked against the file's."""
        path = Path(folder) / ANNOTATORS_FILE
        if not path.is_file():
            return None
        try:
            data = loads(path.read_text())
            rows = data["annotators"]
            ids = tuple(row["id"] for row in rows)
            pairs = tuple(row["pairs"] for row in rows)
            values = torch.tensor([row["log_posterior"] for row in rows], dtype=torch.float64)
            kinds = data["num_kinds"]
            if not (isinstance(kinds, int) and not isinstance(kinds, bool) and kinds >= 1):
                raise ValueError(f"num_kinds {kinds!r} is not a number of kinds")
            values = values.reshape(len(rows), kinds)  # [A, N], also for A = 0
            prior = data.get("log_prior")
            prior = None if prior is None else torch.tensor(prior, dtype=torch.float64).reshape(kinds)  # [N]
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, OverflowError) as error:
            raise MinqrError(f"{path}: not an annotators file minqr wrote ({error}); fix or delete it") from None
        named = all(_is_id(annotator) and not (isinstance(annotator, str) and not annotator.strip())
                    for annotator in ids)
        if data.get("format") != FORMAT or not named:
            raise MinqrError(f"{path}: format {data.get('format')!r} or its ids (strings that are not blank, or "
                             f"integers) are not what this minqr writes (format {FORMAT}); fix or delete it")
        twice = first_repeated(ids)
        if twice is not None:
            raise MinqrError(f"{path}: the annotator {twice!r} is given twice; fix or delete it")
        if not all(_is_id(count) and not isinstance(count, str) and count >= 0 for count in pairs):
            raise MinqrError(f"{path}: an annotator's \"pairs\" is not a count of labelled pairs; fix or delete it")
        if num_kinds is not None and values.shape[1] != num_kinds:
            raise MinqrError(f"{path} holds posteriors over {values.shape[1]} kinds but the model has {num_kinds} "
                             "outputs: they do not belong together; delete it and run minqr personalize")
        if not bool(torch.isfinite(values).all()) or not bool(torch.logsumexp(values, -1).abs().le(1e-6).all()):
            raise MinqrError(f"{path}: a log-posterior is not finite or does not sum to 1; fix or delete it")
        if prior is not None and not (bool(torch.isfinite(prior).all()) and abs(float(torch.logsumexp(prior, 0))) <= 1e-6):
            raise MinqrError(f"{path}: its log_prior is not finite or does not sum to 1; fix it, or delete the key "
                             "(a uniform prior)")
        return cls(ids, values, pairs, prior)


def _credit(probability: np.ndarray) -> np.ndarray:
    """A pair's credit for a probability that the chosen response wins: 1 above 1/2, a tie half."""
    return (probability > 0.5) + 0.5 * (probability == 0.5)


def check_annotator_name(name) -> None:
    """A MinqrError for what can be no annotator's id: not a string or an integer, or an empty or
    blank string (the data readers refuse those as ids)."""
    if not _is_id(name):
        raise MinqrError(f"annotator {name!r}: an annotator's id is a string or an integer")
    if isinstance(name, str) and not name.strip():
        raise MinqrError(f"annotator {name!r} is empty: name the person (an id, as the data gives it)")


def _is_id(value) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def posterior_weights(known: Annotators | None, head, names: list) -> torch.Tensor:
    """[M, N] float64: the posterior over the kinds of each named annotator, known to a model with
    HeadConfig `head` (`known`: its annotators.json, or None), 1/N for a None (the population). A
    head without kinds, or a name the model does not know, is a MinqrError."""
    check_personal(head.objective, head.num_quantiles)
    for name in names:
        if name is not None:
            check_annotator_name(name)
    resolved = [None if name is None or known is None else known.resolve(name) for name in names]
    unknown = [name for name, found in zip(names, resolved) if name is not None and found is None]
    if unknown:
        raise MinqrError(f"annotator {unknown[0]!r} is not known to the reward model (its annotators.json): "
                         "run minqr personalize with their labelled pairs first")
    weights = torch.full((len(names), head.num_quantiles), 1.0 / head.num_quantiles, dtype=torch.float64)
    rows = [k for k, found in enumerate(resolved) if found is not None]
    if rows:
        weights[rows] = known.log_posteriors[known.index([resolved[k] for k in rows])].exp()
    return weights


def annotators_from_pairs(chosen: torch.Tensor, rejected: torch.Tensor, annotator: torch.Tensor, ids: tuple,
                          pair_margin: torch.Tensor | None = None, log_prior: torch.Tensor | None = None,
                          fit_prior: bool = True) -> Annotators:
    """The Annotators of labelled pairs: raw outputs [P, N], each pair's annotator [P] as an index
    into `ids` (the distinct ids, as TokenizedPairs.annotator_ids); their posteriors start from
    `log_prior` [N] (a model's saved prior), else from one fitted to them (Annotators.from_sums;
    uniform without `fit_prior`)."""
    sums = log_likelihood_sums(chosen, rejected, annotator, len(ids), pair_margin)  # [A, N]
    counts = torch.bincount(annotator, minlength=len(ids)).tolist()
    return Annotators.from_sums(ids, sums, counts, log_prior, fit_prior)


def labelled_annotators(chosen: np.ndarray, rejected: np.ndarray, tokenized, annotator: str | None = None,
                        source: str = "the pairs", log_prior: torch.Tensor | None = None,
                        fit_prior: bool = True) -> Annotators:
    """The Annotators of scored labelled pairs (TokenizedPairs `tokenized`, outputs [P, N] each).
    Pairs that name no annotators are the labels of one person, `annotator`; pairs that do take
    no `annotator`. `source` names the pairs in messages; `log_prior` and `fit_prior` as
    annotators_from_pairs'."""
    ids = labellers(tokenized, annotator, source)
    margins = None if tokenized.pair_margins is None else torch.tensor(tokenized.pair_margins)
    chosen, rejected = torch.from_numpy(chosen), torch.from_numpy(rejected)
    rows = (torch.zeros(len(tokenized), dtype=torch.long) if tokenized.annotators is None
            else torch.tensor(tokenized.annotators, dtype=torch.long))  # [P] each pair's labeller, an index into ids
    return annotators_from_pairs(chosen, rejected, rows, ids, margins, log_prior, fit_prior)


def labellers(tokenized, annotator: str | None = None, source: str = "the pairs") -> tuple:
    """The ids of the people who labelled `tokenized` (TokenizedPairs): the ids the pairs name, or,
    for pairs that name none, the one person `annotator`. Known before any scoring, so that what is
    wrong with them is said before a pass over the pairs."""
    if tokenized.annotators is None:
        if annotator is None:
            raise MinqrError(f"{source} {NO_IDS}")
        check_annotator_name(annotator)
        return (annotator,)
    if annotator is not None:
        raise MinqrError(f"{source} names its annotators ({len(tokenized.annotator_ids):,} of them): --annotator "
                         "names the one person of pairs that name none; drop it")
    return tuple(tokenized.annotator_ids)


# ---- scoring: the personal columns of a scores file ------------------------------------------------

# what personal rewards are relative to when the pairs have an anchor reply (a scores file's personal_reference)
ANCHOR_REFERENCE = "the anchor reply"


@dataclass
class PersonalScores:
    """What scoring writes for the rows of known annotators (NaN rows elsewhere); None arrays and a
    note when the data names annotators but the head has no kinds."""

    posterior: np.ndarray | None = None  # [P, N] float32, q_a(k) of each row's annotator
    probability: np.ndarray | None = None  # [P] float32, P_a(chosen ≻ rejected)
    # [P, 2] float32: the personal expected reward of (chosen, rejected) relative to the reference
    reward: np.ndarray | None = None
    reference: str = ""  # what the rewards are relative to
    notes: list = field(default_factory=list)

    def arrays(self) -> dict:
        """The scores file's personal arrays (minqr/study/scores_file.py), none without posteriors."""
        if self.probability is None:
            return {}
        return {"personal_posterior": self.posterior, "personal_probability": self.probability,
                "personal_reward": self.reward}


def personal_scores(head, folder: Path, saved: Annotators | None, tokenized, chosen: np.ndarray, rejected: np.ndarray,
                    anchor: np.ndarray | None = None, annotator: str | None = None,
                    context: Annotators | None = None) -> PersonalScores | None:
    """The personal columns of scored pairs (TokenizedPairs `tokenized`, outputs [P, N] each, of a
    model with HeadConfig `head` saved in `folder`): rows of an annotator the model knows (`saved`,
    its annotators.json as loaded, or None) or the `context` annotators (labelled_annotators of --context); every row
    `annotator`'s when given. The personal rewards are relative to `anchor` ([P, N], the outputs of
    a reference reply per pair), else to the pair's two responses (their mean, kind by kind). None
    when nothing was asked and the data names no annotators."""
    asked = annotator is not None or context is not None
    if not asked and tokenized.annotators is None:
        return None
    try:
        check_personal(head.objective, head.num_quantiles)
    except MinqrError as error:
        if asked:
            raise
        return PersonalScores(notes=[f"note: the data names annotators, but no personal probabilities: {error}"])
    known = saved or Annotators((), torch.zeros(0, head.num_quantiles, dtype=torch.float64), ())
    if context is not None:
        known = known.merged(context)
    if annotator is not None:
        check_annotator_name(annotator)
        if known.resolve(annotator) is None:
            raise MinqrError(f"annotator {annotator!r} is not known to {folder} (its annotators.json)"
                             + (" nor labelled in --context" if context is not None else "")
                             + ": run minqr personalize with their labels, or give them with --context")
        ids = [known.resolve(annotator)] * len(tokenized)
    else:
        ids = [tokenized.annotator_ids[i] for i in tokenized.annotators]
    rows = known.index(ids)  # [P], -1 for an annotator not known
    have = (rows >= 0).numpy()
    log_q = known.log_posteriors[rows[have]]  # [P', N]
    result = PersonalScores(np.full(chosen.shape, np.nan, dtype=np.float32),
                            np.full(chosen.shape[0], np.nan, dtype=np.float32),
                            np.full((chosen.shape[0], 2), np.nan, dtype=np.float32),
                            ANCHOR_REFERENCE if anchor is not None else "the pair's mean, kind by kind")
    if have.any():
        _fill_known_rows(result, have, torch.from_numpy(chosen[have]), torch.from_numpy(rejected[have]), log_q,
                         None if anchor is None else torch.from_numpy(anchor[have]))
    missing = len(tokenized) - int(have.sum())
    if missing:
        result.notes.append(f"note: {missing:,} of {len(tokenized):,} rows are of annotators {folder} does not know: "
                            "their personal columns are NaN (minqr personalize, or --context, gives them posteriors)")
    return result


def _fill_known_rows(result: PersonalScores, have: np.ndarray, c: torch.Tensor, r: torch.Tensor, log_q: torch.Tensor,
                     anchor: torch.Tensor | None) -> None:
    """The rows `have` of the personal columns, from their outputs c, r [P', N], their annotators'
    log-posteriors [P', N] and the anchor [P', N] (or None: the pair's mean is the reference); and
    the accuracy note."""
    weights = log_q.exp()
    result.posterior[have] = weights.numpy()
    result.probability[have] = personal_preference(c, r, log_q).numpy()
    if anchor is not None:
        rewards = [statistic_values("mean", side, reference=anchor, weights=weights) for side in (c, r)]
    else:
        pair = torch.arange(len(c)).repeat(2)  # [2P'] the group of each response: its pair
        rewards = statistic_values("mean", torch.cat([c, r]), group=pair, weights=weights.repeat(2, 1)).chunk(2)
    result.reward[have] = torch.stack(rewards, dim=1).numpy()  # [P', 2]
    # what knowing the annotator changes, on the rows where it is known
    population = statistic_values("preference", c, reference=r)  # [P'] the mixture's P(c ≻ r)
    personal = float(np.mean(_credit(result.probability[have])))
    everyone = float(np.mean(_credit(population.numpy())))
    result.notes.append(f"personal accuracy (P_a(chosen ≻ rejected) > 1/2) on the {int(have.sum()):,} rows whose "
                        f"annotator has a posterior (the model's, or from --context): {personal:.4f}; the "
                        f"population's on the same rows: {everyone:.4f}")
