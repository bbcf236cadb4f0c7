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
  outputs can be compared with the truth in absolute terms (minqr/study/analysis.py aligns on it).
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

Files written by `make_synthetic_task(folder)`:

    train.jsonl, test.jsonl   {"chosen": ..., "rejected": ...} a line (minqr's data format)
    test_truth.npz            aligned with test.jsonl line by line (P test pairs, G groups, V tags):
        chosen_samples, rejected_samples     [P, S] float32  the response's reward for S random
                                                             annotators of the population
        chosen_group_means, ..._group_stds   [P, G]          the Gaussian of each group: the exact
        rejected_group_means, ..._group_stds [P, G]          distribution is their mixture with
        group_weights                        [G]             these weights (see mixture_quantiles)
        quantile_levels                      [10]            tau_i = (2i+1)/20, the paper's N=10
        chosen_quantiles, rejected_quantiles [P, 10]         the exact quantiles at those levels
        preference_probability               [P]             P(chosen preferred to rejected)
        chosen_tags, rejected_tags           [P, V] int8     which tags each response has
        tag_names, controversial_tags        [V] str, bool   the tags, and which split the groups
        anchor_texts                         [P] str         the anchor reply to each test pair's
                                                             question, whose reward is 0 for all
    task.json                 the task's parameters, the tag table, the Bayes accuracy
    tokenizer/                a byte-level BPE trained on train.jsonl (minqr.load_tokenizer reads it)
    model/                    a tiny random GPT-2 (2 layers, 64 wide) with that tokenizer inside:
                              the `--model` of the offline demo

Rewards are in logit units (a difference of 1 is odds e:1), so a model trained by a
Bradley-Terry likelihood learns them in the same units: only the additive constants are free, and
the anchor fixes those.

Two variants of the task (TASK_VARIANTS, `make_synthetic_task(..., variant=...)`): "demo" as
above, and "shifted", with other group shares (75/25), wider personal deviations (std 1.0) and
more controversial tags (rate 0.4), to check that a result is not a property of one task.
"""
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import expit, ndtr, xlogy
from tokenizers import models, pre_tokenizers, trainers

from minqr.atomic import atomic_dir, check_replaceable
from minqr.errors import MinqrError
from minqr.models.gpt2 import GPT2, GPT2Config
from minqr.models.hf_folder import save_gpt2
from minqr.models.tokenizer import Tokenizer, byte_level_bpe
from minqr.objectives.references import quantile_levels
from minqr.options import option, seed_option

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

# The demo's backbone: small enough to train in seconds on a 2-core CPU, deep enough to add up tags.
TINY_MODEL = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
TOKENIZER_VOCAB_SIZE = 512  # a target: the BPE stops earlier once every word is one token
TRUTH_LEVELS = quantile_levels(10, dtype=torch.float64).numpy()  # the levels of minqr's default head, N = 10
ANCHOR_REPLY = "ok"  # the neutral reply: no tags, reward 0 for every annotator
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
        group = rng.choice(len(self.groups), size=shape, p=self.group_weights)
        deviation = rng.normal(0.0, self.personal_std, size=(*np.atleast_1d(shape), len(self.tags)))
        return self.rewards[group] + deviation

    def sample_rewards(self, rng: np.random.Generator, counts: np.ndarray, num_annotators: int) -> np.ndarray:
        """[P, V] tag counts -> [P, S] the responses' rewards for S annotators drawn afresh for each."""
        annotators = self.sample_annotators(rng, (len(counts), num_annotators))  # [P, S, V]
        return np.einsum("psv,pv->ps", annotators, counts.astype(np.float64))

    def sample_labels(self, rng: np.random.Generator, counts_a: np.ndarray, counts_b: np.ndarray) -> np.ndarray:
        """[P] bool: does the pair's annotator (one per pair, drawn here) prefer a to b?"""
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
        difference = (counts_a - counts_b).astype(np.float64)  # [P, V]
        means, stds = self.group_moments(difference)  # [P, G] each
        nodes, weights = np.polynomial.hermite_e.hermegauss(GAUSS_HERMITE_NODES)
        weights = weights / weights.sum()  # the probabilists' weights sum to sqrt(2 pi)
        per_group = expit(means[..., None] + stds[..., None] * nodes) @ weights  # [P, G]
        return per_group @ self.group_weights

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


def mixture_quantiles(means: np.ndarray, stds: np.ndarray, weights: np.ndarray, levels) -> np.ndarray:
    """Quantiles of Gaussian mixtures: means, stds [P, G] (stds >= 0; 0 is a point mass, the
    anchor's), weights [G] -> [P, K] for the K levels in (0, 1), by bisection on the mixture's CDF
    to float64 precision."""
    levels = np.asarray(levels, dtype=np.float64)
    means, stds = means[:, None, :], stds[:, None, :]  # [P, 1, G], broadcast over the levels
    lo = np.broadcast_to((means - 40 * stds).min(-1), (means.shape[0], len(levels))).copy()  # [P, K]
    hi = np.broadcast_to((means + 40 * stds).max(-1), lo.shape).copy()
    for _ in range(100):  # each halves the bracket: 2^-100 of it is below float64's resolution
        mid = (lo + hi) / 2
        offset = mid[..., None] - means  # [P, K, G]
        with np.errstate(divide="ignore", invalid="ignore"):  # a point mass: a step at its mean
            z = np.where(stds > 0, offset / stds, np.where(offset >= 0, np.inf, -np.inf))
        below = ndtr(z) @ weights < levels  # [P, K]
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return (lo + hi) / 2


def render_dialogue(question: str, tags) -> str:
    return f"\n\nHuman: {question}\n\nAssistant: {' '.join(tags) or ANCHOR_REPLY}"


def sample_pairs(task: SyntheticTask, rng: np.random.Generator, count: int) -> dict:
    """`count` labelled pairs: texts and [P, V] tag counts of the chosen and rejected responses."""
    questions = [QUESTIONS[rng.integers(len(QUESTIONS))].format(VERBS[rng.integers(len(VERBS))],
                                                                NOUNS[rng.integers(len(NOUNS))])
                 for _ in range(count)]
    first = task.sample_responses(rng, count)
    second = task.sample_responses(rng, count)
    for i in range(count):
        while second[i] == first[i]:  # an identical pair carries no preference
            second[i] = task.sample_responses(rng, 1)[0]
    counts_a, counts_b = task.tag_counts(first), task.tag_counts(second)
    a_wins = task.sample_labels(rng, counts_a, counts_b)
    chosen = [f if win else s for f, s, win in zip(first, second, a_wins)]
    rejected = [s if win else f for f, s, win in zip(first, second, a_wins)]

    def texts(responses):
        return [render_dialogue(q, [task.tags[t] for t in r]) for q, r in zip(questions, responses)]

    return {"chosen": texts(chosen), "rejected": texts(rejected), "anchors": texts([[]] * count),
            "chosen_tags": task.tag_counts(chosen), "rejected_tags": task.tag_counts(rejected)}


def truth_arrays(task: SyntheticTask, pairs: dict, rng: np.random.Generator, num_samples: int) -> dict:
    """The true reward distributions of the pairs' responses (the test_truth.npz arrays)."""
    arrays = {"group_weights": task.group_weights, "quantile_levels": TRUTH_LEVELS,
              "anchor_texts": np.array(pairs["anchors"]), "tag_names": np.array(task.tags),
              "controversial_tags": task.controversial}
    for side in ("chosen", "rejected"):
        counts = pairs[f"{side}_tags"]
        means, stds = task.group_moments(counts)
        arrays[f"{side}_tags"] = counts
        arrays[f"{side}_group_means"] = means
        arrays[f"{side}_group_stds"] = stds
        arrays[f"{side}_quantiles"] = mixture_quantiles(means, stds, task.group_weights, TRUTH_LEVELS)
        arrays[f"{side}_samples"] = task.sample_rewards(rng, counts, num_samples).astype(np.float32)
    arrays["preference_probability"] = task.preference_probability(pairs["chosen_tags"], pairs["rejected_tags"])
    return arrays


def bayes_accuracy(preference_probability: np.ndarray) -> float:
    """Expected accuracy of the Bayes-optimal ranker over fresh labels of these pairs: it picks
    the likelier side, which the annotator picks with probability max(p, 1 - p)."""
    return float(np.maximum(preference_probability, 1 - preference_probability).mean())


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


def train_tokenizer(texts, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on `texts`, with <|endoftext|> as its last id."""
    # vocab_size - 1 learnt tokens, then EOS as the last id, as in GPT-2
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return Tokenizer(byte_level_bpe(models.BPE(), texts, trainer))


def tiny_backbone(tokenizer: Tokenizer, seed: int) -> GPT2:
    """A randomly initialised GPT-2 of TINY_MODEL's shape over the tokenizer's vocabulary."""
    config = GPT2Config(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.eos_id,
                        eos_token_id=tokenizer.eos_id, **TINY_MODEL)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        return GPT2(config)


def _write_jsonl(path: Path, chosen, rejected) -> None:
    with open(path, "w") as f:
        for c, r in zip(chosen, rejected):
            f.write(json.dumps({"chosen": c, "rejected": r}) + "\n")


@dataclass
class SyntheticConfig:
    """The options of `minqr synthetic` (make_synthetic_task)."""

    out: str = option(help="folder to write (replaced as a whole)")
    variant: str = option("demo", "demo: the offline demo's task; shifted: other group shares (75/25), wider "
                          "personal deviations and more controversial tags", TASK_VARIANTS)
    num_train: int = option(40_000, "training pairs", low=1)
    num_test: int = option(1000, "held-out pairs", low=1)
    seed: int = seed_option("seed of the data, the truth samples and the tiny model")


def make_synthetic_task(folder, num_train: int = 40_000, num_test: int = 1000, seed: int = 0,
                        num_samples: int = 256, variant: str = "demo") -> Path:
    """Write the task's data, truth, tokenizer and tiny model into `folder` (replaced as a whole,
    atomically; a folder that holds anything minqr did not write is refused, minqr.atomic). The same arguments give the same data, truth, tokenizer and weights. `variant`
    names one of TASK_VARIANTS."""
    if num_train < 1 or num_test < 1 or num_samples < 1:
        raise MinqrError(f"num_train, num_test and num_samples must be at least 1, "
                         f"got {num_train}, {num_test} and {num_samples}")
    if variant not in TASK_VARIANTS:
        raise MinqrError(f"variant must be one of {', '.join(TASK_VARIANTS)}, not {variant!r}")
    task = TASK_VARIANTS[variant]
    check_replaceable(folder, "--out")  # before the minute of work below
    # independent streams, so that e.g. more truth samples leave the data unchanged
    data_rng, truth_rng = (np.random.default_rng([seed, stream]) for stream in (0, 1))
    train = sample_pairs(task, data_rng, num_train)
    test = sample_pairs(task, data_rng, num_test)
    truth = truth_arrays(task, test, truth_rng, num_samples)
    p = truth["preference_probability"]
    summary = {
        "description": "minqr synthetic preference task (see minqr/data/synthetic.py)",
        "seed": seed, "variant": variant, "num_train": num_train, "num_test": num_test,
        "truth_samples": num_samples,
        **task.to_dict(),
        # the ceiling for a reward model on test.jsonl: expected over fresh labels ...
        "bayes_accuracy": bayes_accuracy(p),
        # ... and on the labels test.jsonl actually holds (the chosen side is the likelier one)
        "bayes_accuracy_on_labels": float(np.mean(np.where(p == 0.5, 0.5, p > 0.5))),
        "model": TINY_MODEL,
    }
    tokenizer = train_tokenizer(train["chosen"] + train["rejected"])
    with atomic_dir(folder, "--out") as tmp:
        _write_jsonl(tmp / "train.jsonl", train["chosen"], train["rejected"])
        _write_jsonl(tmp / "test.jsonl", test["chosen"], test["rejected"])
        with open(tmp / "test_truth.npz", "wb") as f:
            np.savez_compressed(f, **truth)
        (tmp / "task.json").write_text(json.dumps(summary, indent=2) + "\n")
        tokenizer.save(tmp / "tokenizer")
        save_gpt2(tiny_backbone(tokenizer, seed), tmp / "model")
        tokenizer.save(tmp / "model")  # a Hugging Face model folder carries its tokenizer
    return Path(folder)
