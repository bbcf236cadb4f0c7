"""A synthetic preference task whose answer is known: every response has a true reward
DISTRIBUTION, labels are drawn from it, and the truth is saved beside the data.

Why: on real preference data nobody knows how spread out the reward of a response really is, so
a distributional reward model cannot be checked, only compared. Here it can.

The task, in full:

- Annotators come from two hidden groups, "casual" (55%) and "formal" (45%). Each pair is
  labelled by one annotator drawn from the population; nobody is told which group.
- A response is 2 to 4 distinct tags (e.g. "accurate joke clear"), the reply of a short
  HH-style dialogue "\\n\\nHuman: <question>\\n\\nAssistant: <tags>". The question carries no
  reward; the two responses of a pair answer the same question, so the dialogues share their
  prefix, as in HH-RLHF.
- One response in twenty is the ANCHOR, the neutral reply "ok" (no tags): its reward is 0 for every
  annotator. A Bradley-Terry reward is defined up to an additive constant, and a mixture head's
  outputs each up to their own (minqr/objectives/); the anchor pins them down, so that a model's
  outputs can be compared with the truth in absolute terms (minqr/synthetic/anchors.py).
- Each tag has a reward per group (table `TAGS`, in logit units). Ten tags are clear-cut: every
  group likes "accurate" (+7.5) and dislikes "unsafe" (-9). Five are controversial: "joke" is +4 for
  the casual group and -4 for the formal one. A tag is controversial with probability 0.3.
- An annotator of group g has their own reward for each tag, the group's plus a personal
  deviation N(0, 0.5^2), and a response's reward is the sum over its tags. So the reward of a
  response for a random annotator is a mixture of two Gaussians, one per group:
  narrow for a response of clear-cut tags, wide and often bimodal for one with controversial tags.
- The annotator prefers a to b with the Bradley-Terry probability sigmoid(r(a) - r(b)), both
  rewards being that annotator's; `chosen`/`rejected` follow the label.

The Bayes-optimal ranker knows P(a preferred to b) exactly and picks the likelier side; its
accuracy on the test pairs (`task.json`, about 0.87 for the defaults) is the ceiling any reward
model can reach on them, and a learnt model should get within a few points of it.

The truth of a pair (its exact reward distributions) is minqr/synthetic/truth.py's; the files a
task folder holds are minqr/synthetic/folder.py's.

Two variants of the task (TASK_VARIANTS, `make_synthetic_task(..., variant=...)`): "demo" as
above, and "shifted", with other group shares (75/25), wider personal deviations (std 1.0) and
more controversial tags (rate 0.4), to check that a result is not a property of one task.

With `labels_per_annotator` K > 0 (`minqr synthetic --labels-per-annotator K`), a pool of
annotators is drawn once and each labels K training pairs, the rows naming them; held-out pairs of
known and of new annotators and each annotator's truth come with it (minqr/synthetic/pools.py).
"""
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, xlogy

from minqr.errors import MinqrError

GROUPS = {"casual": 0.55, "formal": 0.45}  # annotator groups and their share of the population

# tag: (reward for the casual group, reward for the formal group), in logit units
TAGS = {
    # clear-cut: every annotator agrees
    "accurate": (7.5, 7.5),
    "helpful": (6.0, 6.0),
    "clear": (4.5, 4.5),
    "thorough": (4.5, 4.5),
    "polite": (3.0, 3.0),
    "evasive": (-3.0, -3.0),
    "vague": (-4.5, -4.5),
    "rude": (-6.0, -6.0),
    "wrong": (-7.5, -7.5),
    "unsafe": (-9.0, -9.0),
    # controversial: the groups disagree
    "joke": (4.0, -4.0),
    "emoji": (3.0, -4.0),
    "slang": (3.0, -3.0),
    "formal": (-4.0, 4.0),
    "disclaimer": (-3.0, 3.0),
}

QUESTIONS = ("How do I {} my {}?", "Can you help me {} my {}?", "What is the best way to {} my {} this week?")
VERBS = ("fix", "clean", "paint", "sell", "plan", "insure", "repair", "organise", "decorate", "move")
NOUNS = ("bike", "garden", "kitchen", "essay", "budget", "dog", "car", "roof", "party", "old piano")

ANCHOR_REPLY = "ok"  # the neutral reply: no tags, reward 0 for every annotator (minqr/synthetic/anchors.py)
GAUSS_HERMITE_NODES = 64  # E[sigmoid(m + s Z)] to ~1e-12 for the spreads of this task


@dataclass(frozen=True)
class SyntheticTask:
    """The generating process; the defaults are the task described in the module docstring."""

    tags: tuple = tuple(TAGS)
    rewards: np.ndarray = field(default_factory=lambda: np.array(list(TAGS.values())).T)  # [G, V]
    groups: tuple = tuple(GROUPS)
    group_weights: np.ndarray = field(default_factory=lambda: np.array(list(GROUPS.values())))  # [G]
    personal_std: float = 0.5  # spread of one annotator's reward for a tag around their group's
    controversial_rate: float = 0.3  # chance that a drawn tag is a controversial one
    tags_per_response: tuple = (2, 4)  # inclusive range
    anchor_rate: float = 0.05  # chance that a response is the anchor, the neutral reply with no tags

    def __post_init__(self):
        G, V = len(self.groups), len(self.tags)
        if self.rewards.shape != (G, V):
            raise MinqrError(f"rewards must be [groups, tags] = [{G}, {V}], got {list(self.rewards.shape)}")
        if self.group_weights.shape != (G,) or not np.isclose(self.group_weights.sum(), 1.0):
            raise MinqrError(f"group_weights must be {G} shares summing to 1, got {self.group_weights}")
        if not self.personal_std > 0:
            raise MinqrError(f"personal_std must be > 0 (reward distributions are continuous), got {self.personal_std}")
        lo, hi = self.tags_per_response
        if not 1 <= lo <= hi <= V:
            raise MinqrError(f"tags_per_response must satisfy 1 <= low <= high <= {V}, got {self.tags_per_response}")
        if not 0 <= self.anchor_rate < 1:
            raise MinqrError(f"anchor_rate must lie in [0, 1), got {self.anchor_rate}")

    @property
    def controversial(self) -> np.ndarray:
        """[V] bool: the tags on which the groups disagree."""
        return np.ptp(self.rewards, axis=0) > 0

    def tag_probabilities(self) -> np.ndarray:
        """[V] the chance of each tag at a draw: controversial_rate spread over the controversial tags."""
        controversial = self.controversial
        return np.where(controversial, self.controversial_rate / controversial.sum(),
                        (1 - self.controversial_rate) / (~controversial).sum())

    # ---- drawing responses and annotators ----

    def sample_responses(self, rng: np.random.Generator, count: int) -> list:
        """`count` responses, each a list of distinct tag indices in the order they are written (the
        anchor: no tags)."""
        lo, hi = self.tags_per_response
        p = self.tag_probabilities()
        return [[] if rng.random() < self.anchor_rate
                else list(rng.choice(len(self.tags), size=rng.integers(lo, hi + 1), replace=False, p=p))
                for _ in range(count)]

    def tag_counts(self, responses) -> np.ndarray:
        """Responses (lists of tag indices) -> [P, V] 0/1: the response's reward is counts @ rewards."""
        counts = np.zeros((len(responses), len(self.tags)), dtype=np.int8)
        for row, tags in enumerate(responses):
            counts[row, tags] = 1
        return counts

    def sample_annotators(self, rng: np.random.Generator, shape) -> np.ndarray:
        """Fresh annotators from the population: [*shape, V], each one's own reward for every tag."""
        return self.sample_pool(rng, shape)[1]

    def sample_pool(self, rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
        """Fresh annotators with their groups: (groups [*shape] int, own tag rewards [*shape, V])."""
        group = rng.choice(len(self.groups), size=shape, p=self.group_weights)
        deviation = rng.normal(0.0, self.personal_std, size=(*np.atleast_1d(shape), len(self.tags)))
        return group, self.rewards[group] + deviation

    def sample_rewards(self, rng: np.random.Generator, counts: np.ndarray, num_annotators: int) -> np.ndarray:
        """[P, V] tag counts -> [P, S] the responses' rewards for S annotators drawn afresh for each."""
        annotators = self.sample_annotators(rng, (len(counts), num_annotators))  # [P, S, V]
        return np.einsum("psv,pv->ps", annotators, counts.astype(np.float64))

    def sample_labels(self, rng: np.random.Generator, counts_a: np.ndarray, counts_b: np.ndarray,
                      annotators: np.ndarray | None = None) -> np.ndarray:
        """[P] bool: does the pair's annotator prefer a to b? `annotators` [P, V]: each pair's
        annotator's own tag rewards; None: one drawn afresh for each pair."""
        if annotators is None:
            annotators = self.sample_annotators(rng, len(counts_a))  # [P, V]
        margin = (annotators * (counts_a - counts_b)).sum(-1)  # the annotator's r(a) - r(b)
        return rng.random(len(counts_a)) < expit(margin)

    # ---- the exact distributions ----

    def group_moments(self, counts: np.ndarray) -> tuple:
        """[P, V] tag counts -> (means, stds), each [P, G]: given the group, a response's reward is
        Gaussian (a sum of independent Gaussian tag rewards)."""
        means = counts @ self.rewards.T
        stds = self.personal_std * np.sqrt((counts.astype(np.float64) ** 2).sum(-1))
        return means, np.repeat(stds[:, None], len(self.groups), axis=1)

    def preference_probability(self, counts_a: np.ndarray, counts_b: np.ndarray) -> np.ndarray:
        """[P] P(a preferred to b), exact up to Gauss-Hermite quadrature error (~1e-12).

        Given the group, r(a) - r(b) is Gaussian (tags in both responses cancel, with their
        personal deviations), so P = sum_g w_g E[sigmoid(m_g + s Z)], Z standard normal."""
        return self.group_preference_probability(counts_a, counts_b) @ self.group_weights

    def group_preference_probability(self, counts_a: np.ndarray, counts_b: np.ndarray) -> np.ndarray:
        """[P, G] P(a preferred to b) for an annotator drawn from each group (what an oracle that
        knows the annotator's group, not their own deviations, can know)."""
        difference = (counts_a - counts_b).astype(np.float64)  # [P, V]
        return expected_sigmoid(*self.group_moments(difference))  # [P, G]

    def to_dict(self) -> dict:
        return {
            "groups": dict(zip(self.groups, self.group_weights.tolist())),
            "tags": {tag: dict(zip(self.groups, self.rewards[:, v].tolist())) for v, tag in enumerate(self.tags)},
            "controversial_tags": [t for t, c in zip(self.tags, self.controversial) if c],
            "personal_std": self.personal_std,
            "controversial_rate": self.controversial_rate,
            "tags_per_response": list(self.tags_per_response),
            "anchor_rate": self.anchor_rate,
            "anchor_reply": ANCHOR_REPLY,
        }


# The task of the demo, and a variant with other group shares and spreads (module docstring).
TASK_VARIANTS = {
    "demo": SyntheticTask(),
    "shifted": SyntheticTask(group_weights=np.array([0.75, 0.25]), personal_std=1.0, controversial_rate=0.4),
}


def expected_sigmoid(means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """E[sigmoid(m + s Z)], Z standard normal, elementwise (Gauss-Hermite quadrature)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(GAUSS_HERMITE_NODES)
    weights = weights / weights.sum()  # the probabilists' weights sum to sqrt(2 pi)
    return expit(means[..., None] + stds[..., None] * nodes) @ weights


def sample_questions(rng: np.random.Generator, count: int) -> list[str]:
    """`count` questions, each a template of QUESTIONS filled with a verb and a noun."""
    return [QUESTIONS[rng.integers(len(QUESTIONS))].format(VERBS[rng.integers(len(VERBS))],
                                                           NOUNS[rng.integers(len(NOUNS))]) for _ in range(count)]


def render_reply(tags) -> str:
    """A reply's text, as it follows the question: its tags' words, or the anchor reply for none."""
    return f"\n\nAssistant: {' '.join(tags) or ANCHOR_REPLY}"


def render_dialogue(question: str, tags) -> str:
    return f"\n\nHuman: {question}" + render_reply(tags)


def sample_pairs(task: SyntheticTask, rng: np.random.Generator, count: int,
                 annotators: np.ndarray | None = None) -> dict:
    """`count` labelled pairs: texts and [P, V] tag counts of the chosen and rejected responses.
    `annotators` [count, V]: who labels each pair (their own tag rewards); None: a fresh one each."""
    questions = sample_questions(rng, count)
    first = task.sample_responses(rng, count)
    second = task.sample_responses(rng, count)
    for i in range(count):
        while second[i] == first[i]:  # an identical pair carries no preference
            second[i] = task.sample_responses(rng, 1)[0]
    counts_a, counts_b = task.tag_counts(first), task.tag_counts(second)
    a_wins = task.sample_labels(rng, counts_a, counts_b, annotators)
    chosen = [f if win else s for f, s, win in zip(first, second, a_wins)]
    rejected = [s if win else f for f, s, win in zip(first, second, a_wins)]

    def texts(responses):
        return [render_dialogue(q, [task.tags[t] for t in r]) for q, r in zip(questions, responses)]

    return {"chosen": texts(chosen), "rejected": texts(rejected), "anchors": texts([[]] * count),
            "chosen_tags": task.tag_counts(chosen), "rejected_tags": task.tag_counts(rejected)}


def spread_or_scale(task: SyntheticTask, personal_std: float, num_pairs: int = 40_000, seed: int = 0) -> dict:
    """How far apart single-annotator labels put two tasks that differ in their spread.

    The alternative is `task` with personal deviations of `personal_std` instead of its own and
    every tag reward multiplied by the c that makes its labels likeliest to look like the truth's.
    A wider spread inside each group flattens P(a preferred to b) much as a smaller reward scale
    does (an average of sigmoids is close to a shallower sigmoid), so c can make up for most of
    it. Returned: c and the Kullback-Leibler divergence, in nats per pair, from the truth's label
    distribution to the alternative's over `num_pairs` fresh pairs; times the number of training
    pairs, it is about how many nats of log-likelihood the whole training set has to tell the two
    apart with (docs/objectives.md#spread-or-scale)."""
    rng = np.random.default_rng(seed)
    a, b = (task.tag_counts(task.sample_responses(rng, num_pairs)) for _ in range(2))
    p = task.preference_probability(a, b)

    def divergence(scale: float) -> float:
        other = replace(task, rewards=task.rewards * scale, personal_std=personal_std)
        q = np.clip(other.preference_probability(a, b), 1e-300, 1 - 1e-16)
        return float(np.mean(xlogy(p, p / q) + xlogy(1 - p, (1 - p) / (1 - q))))

    best = minimize_scalar(divergence, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-6})
    return {"scale": float(best.x), "kl_per_pair": float(best.fun)}
