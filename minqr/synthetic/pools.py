"""The synthetic task with annotator pools: each annotator labels K pairs, and the data says who.

The plain task (minqr/synthetic/task.py) draws a fresh annotator for every label, so nothing ties
two labels to one person. Here a pool of annotators is drawn once, each one of a group with their
own personal deviations (SyntheticTask.sample_annotators), and each labels K training pairs; the
rows carry `annotator`. What annotator ids can buy is then measurable, because the truth knows
every annotator's group and exact tag rewards:

    train.jsonl            num_train pairs, K per known annotator ("a0", "a1", ...), with `annotator`
    test.jsonl             the population's held-out pairs, drawn as the plain task draws them (no ids)
    known_test.jsonl       held-out pairs of known annotators (their ids), each pair a fresh draw
    new_context_{k}.jsonl  for k in NEW_CONTEXT_SIZES: the first k labelled pairs of each new person
                           ("n0", "n1", ...), people absent from train.jsonl
    new_test.jsonl         held-out pairs of those new people
    *_truth.npz            beside known_test and new_test: the plain task's truth arrays
                           (minqr.synthetic.truth.truth_arrays) plus, per pair (truth.PERSONAL_TRUTH),
                           the labelling annotator's group, their exact P(chosen ≻ rejected), the
                           group's P for each group (the annotator's deviations integrated out) and
                           their exact rewards of both responses (the anchor's is 0 for everyone)
    annotators_truth.npz   every annotator's id, group and exact tag rewards [A, V]
    task.json              adds group_rewards_scale: the scale c* at which the groups' exact rewards,
                           as a mixture's kinds, fit train.jsonl best, per label and annotator-level
                           (below 1: the annotators' own deviations; docs/personal.md)

Three rankers bound what a personal reward can do on a held-out pair of annotator a: the
population's (one answer for everybody), the group oracle (knows a's group, picks the likelier side
for that group) and the exact oracle (knows a's own rewards, picks the side a prefers more often).
Their accuracies are expected over fresh labels of a (pick chosen: credit p_a; the other side:
1 − p_a), which is less noisy than the one label the file holds. minqr/study/personal_accuracy.py
measures a model's personal probabilities against them.
"""
import numpy as np
import torch

from minqr.distribution.scale import fit_scale
from minqr.synthetic.task import SyntheticTask, sample_pairs
from minqr.synthetic.truth import truth_arrays

NEW_CONTEXT_SIZES = (1, 3, 10)  # labelled context pairs of a new person, as the analysis reports them
NEW_HELD_OUT = 5  # held-out pairs of each new person


def pool_pairs(task: SyntheticTask, rng: np.random.Generator, rewards: np.ndarray, owners: np.ndarray) -> dict:
    """Pairs labelled by pool members: owners [P] indices into rewards [A, V]; the pairs' dict of
    minqr.synthetic.task.sample_pairs with "owner" [P]."""
    pairs = sample_pairs(task, rng, len(owners), annotators=rewards[owners])
    pairs["owner"] = owners
    return pairs


def personal_truth(task: SyntheticTask, pairs: dict, groups: np.ndarray, rewards: np.ndarray) -> dict:
    """The truth.PERSONAL_TRUTH arrays of pairs labelled by pool members (pairs["owner"] indexes groups, rewards)."""
    owner = pairs["owner"]
    chosen = (rewards[owner] * pairs["chosen_tags"]).sum(-1)  # [P] the annotator's own rewards
    rejected = (rewards[owner] * pairs["rejected_tags"]).sum(-1)
    return {"annotator_group": groups[owner],
            "annotator_probability": 1.0 / (1.0 + np.exp(rejected - chosen)),
            "annotator_group_probability": task.group_preference_probability(pairs["chosen_tags"],
                                                                             pairs["rejected_tags"]),  # [P, G]
            "chosen_annotator_reward": chosen, "rejected_annotator_reward": rejected}


def group_rewards_scale(task: SyntheticTask, pairs: dict, groups: np.ndarray) -> dict:
    """Where each likelihood puts the scale of a model whose kinds are the groups' exact rewards,
    weighted by the groups' shares, on pool-labelled `pairs` (groups [A]: each annotator's group):
    {"per_label": c*, "annotator_level": c*} (minqr/distribution/scale.py). Below 1 by as much as
    the annotators' own deviations from their group weigh: to a kind they are label noise."""
    differences = (pairs["chosen_tags"] - pairs["rejected_tags"]) @ task.rewards.T  # [P, G]
    owners = torch.as_tensor(pairs["owner"], dtype=torch.long)
    fit = fit_scale(torch.as_tensor(differences, dtype=torch.float64), owners, len(groups),
                    weights=torch.as_tensor(task.group_weights))
    return {"per_label": round(fit.per_label, 4), "annotator_level": round(fit.annotator_level, 4)}


def pooled_task(task: SyntheticTask, data_rng: np.random.Generator, truth_rng: np.random.Generator,
                num_train: int, num_test: int, per_annotator: int, num_samples: int) -> tuple:
    """(files, facts): everything the pooled task's folder holds beyond the plain task's test split,
    name -> (kind, payload), kind "jsonl" (the pairs' dict with "ids") or "npz" (arrays); and what
    task.json adds, the scale the groups' rewards take on the training pairs (group_rewards_scale).
    ceil(num_train / per_annotator) known annotators label the training pairs, per_annotator each (the
    last one the rest); num_test held-out pairs go
    to random known annotators; max(1, num_test // NEW_HELD_OUT) new people get
    max(NEW_CONTEXT_SIZES) context pairs and NEW_HELD_OUT held-out pairs each."""
    num_known = -(-num_train // per_annotator)  # ceil: every training pair has an annotator
    num_new = max(1, num_test // NEW_HELD_OUT)
    groups, rewards = task.sample_pool(data_rng, num_known + num_new)
    ids = np.array([f"a{i}" for i in range(num_known)] + [f"n{i}" for i in range(num_new)])
    known, new = np.arange(num_known), num_known + np.arange(num_new)

    def labelled(owners):
        pairs = pool_pairs(task, data_rng, rewards, owners)
        pairs["ids"] = ids[owners].tolist()
        return pairs

    train = labelled(np.arange(num_train) // per_annotator)  # [num_train] annotator 0's K pairs, then 1's, ...
    known_test = labelled(data_rng.choice(known, size=num_test))
    context = labelled(np.repeat(new, max(NEW_CONTEXT_SIZES)))  # person by person, in order
    new_test = labelled(np.repeat(new, NEW_HELD_OUT))
    files = {"train.jsonl": ("jsonl", train), "known_test.jsonl": ("jsonl", known_test),
             "new_test.jsonl": ("jsonl", new_test),
             "annotators_truth.npz": ("npz", {"ids": ids, "groups": groups, "rewards": rewards,
                                              "known": np.arange(len(ids)) < num_known})}
    position = np.arange(len(context["ids"])) % max(NEW_CONTEXT_SIZES)  # each pair's place in its person's list
    for k in NEW_CONTEXT_SIZES:
        first = np.flatnonzero(position < k)
        files[f"new_context_{k}.jsonl"] = ("jsonl", {name: [context[name][i] for i in first]
                                                     for name in ("chosen", "rejected", "ids")})
    for name, pairs in (("known_test", known_test), ("new_test", new_test)):
        files[f"{name}_truth.npz"] = ("npz", {**truth_arrays(task, pairs, truth_rng, num_samples),
                                              **personal_truth(task, pairs, groups, rewards)})
    return files, {"group_rewards_scale": group_rewards_scale(task, train, groups)}
