"""The synthetic task with annotator pools (minqr/synthetic/pools.py) against what it claims:
labels drawn by the named annotator, the truth's probabilities against Monte Carlo and float64
loops, the files' bookkeeping; and the personal accuracy measure (minqr/study/personal_accuracy.py)
against a loop written out here."""
import json
import math

import numpy as np
import pytest
import torch

from minqr.distribution.scale import fit_scale
from minqr.synthetic.folder import make_synthetic_task
from minqr.synthetic.pools import NEW_CONTEXT_SIZES, NEW_HELD_OUT, pooled_task
from minqr.synthetic.task import TASK_VARIANTS
from minqr.errors import MinqrError
from minqr.study.personal_accuracy import expected_accuracy, personal_accuracy, personal_markdown
from minqr.study.scores_file import load_scores, save_scores

K = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_synthetic_task(tmp_path_factory.mktemp("pools") / "task", num_train=400, num_test=60, seed=3,
                               num_samples=16, variant="shifted", labels_per_annotator=K)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def tag_counts(text, tags):
    words = text.rsplit("Assistant: ", 1)[1].split()
    return np.array([w in words for w in tags], dtype=np.float64)


def test_every_known_annotator_labels_k_pairs_and_new_people_are_apart(folder):
    train = read_jsonl(folder / "train.jsonl")
    ids, counts = np.unique([row["annotator"] for row in train], return_counts=True)
    assert len(train) == 400 and set(counts) == {K} and len(ids) == 400 // K
    known = set(ids)
    assert {row["annotator"] for row in read_jsonl(folder / "known_test.jsonl")} <= known
    assert "annotator" not in read_jsonl(folder / "test.jsonl")[0]  # the population's split, as before
    new_test = read_jsonl(folder / "new_test.jsonl")
    new = {row["annotator"] for row in new_test}
    assert not new & known and len(new_test) == len(new) * NEW_HELD_OUT
    contexts = {k: read_jsonl(folder / f"new_context_{k}.jsonl") for k in NEW_CONTEXT_SIZES}
    for k, rows in contexts.items():
        people, per = np.unique([row["annotator"] for row in rows], return_counts=True)
        assert set(people) == new and set(per) == {k}
    # each smaller context is the first pairs of each person's larger one
    for person in new:
        longest = [r for r in contexts[max(NEW_CONTEXT_SIZES)] if r["annotator"] == person]
        for k in NEW_CONTEXT_SIZES:
            assert [r for r in contexts[k] if r["annotator"] == person] == longest[:k]
    summary = json.loads((folder / "task.json").read_text())
    assert summary["labels_per_annotator"] == K
    # the truth's own scale, from the training file as written: the groups' rewards as the kinds
    task, pool = TASK_VARIANTS["shifted"], np.load(folder / "annotators_truth.npz")
    row_of = {name: i for i, name in enumerate(pool["ids"])}
    differences = torch.tensor(np.array([tag_counts(r["chosen"], task.tags) - tag_counts(r["rejected"], task.tags)
                                         for r in train]) @ task.rewards.T)  # [P, G]
    owners = torch.tensor([row_of[r["annotator"]] for r in train])
    fit = fit_scale(differences, owners, len(pool["ids"]), weights=torch.tensor(task.group_weights))
    assert summary["group_rewards_scale"] == {"per_label": pytest.approx(fit.per_label, abs=1e-4),
                                              "annotator_level": pytest.approx(fit.annotator_level, abs=1e-4)}


def test_the_truth_is_each_annotators_own_rewards(folder):
    """The held-out truths against a float64 loop over the saved annotators and the texts' tags."""
    task = TASK_VARIANTS["shifted"]
    pool = np.load(folder / "annotators_truth.npz")
    index = {name: i for i, name in enumerate(pool["ids"])}
    for name in ("known_test", "new_test"):
        rows = read_jsonl(folder / f"{name}.jsonl")
        truth = np.load(folder / f"{name}_truth.npz")
        for j, row in enumerate(rows):
            a = index[row["annotator"]]
            own = pool["rewards"][a]
            chosen = sum(own[v] * c for v, c in enumerate(tag_counts(row["chosen"], task.tags)))
            rejected = sum(own[v] * c for v, c in enumerate(tag_counts(row["rejected"], task.tags)))
            assert truth["chosen_annotator_reward"][j] == pytest.approx(chosen, abs=1e-9)
            assert truth["annotator_probability"][j] == pytest.approx(1 / (1 + math.exp(rejected - chosen)), abs=1e-12)
            assert truth["annotator_group"][j] == pool["groups"][a]
    # own rewards are the group's plus deviations of the task's spread
    deviations = pool["rewards"] - task.rewards[pool["groups"]]
    assert abs(deviations.std() - task.personal_std) < 0.1 and abs(deviations.mean()) < 0.1


def test_labels_come_from_the_named_annotator(folder):
    """Under the named annotator's labels, E[p_a(chosen)] = E[p² + (1 − p)²] (the pair's two
    orientations weighted by their chances); labels of anybody else break it."""
    task = TASK_VARIANTS["shifted"]
    pool = np.load(folder / "annotators_truth.npz")
    index = {name: i for i, name in enumerate(pool["ids"])}
    rows = read_jsonl(folder / "train.jsonl")
    p = []
    for row in rows:
        own = pool["rewards"][index[row["annotator"]]]
        margin = own @ (tag_counts(row["chosen"], task.tags) - tag_counts(row["rejected"], task.tags))
        p.append(1 / (1 + math.exp(-margin)))
    p = np.array(p)
    difference = p - (p ** 2 + (1 - p) ** 2)
    assert abs(difference.mean()) < 4 * difference.std() / math.sqrt(len(p)) + 1e-3


def test_group_probability_against_monte_carlo():
    task = TASK_VARIANTS["demo"]
    rng = np.random.default_rng(0)
    a, b = (task.tag_counts(task.sample_responses(rng, 12)) for _ in range(2))
    exact = task.group_preference_probability(a, b)  # [P, G]
    draws = 200_000
    for g in range(len(task.groups)):
        own = task.rewards[g] + rng.normal(0, task.personal_std, size=(draws, len(task.tags)))  # [S, V]
        simulated = (1 / (1 + np.exp(-(own @ (a - b).T)))).mean(0)  # [P]
        np.testing.assert_allclose(exact[:, g], simulated, atol=4e-3)
    np.testing.assert_allclose(exact @ task.group_weights, task.preference_probability(a, b), atol=1e-12)


def test_given_annotators_label_with_their_own_probability():
    task = TASK_VARIANTS["demo"]
    rng = np.random.default_rng(1)
    a, b = (task.tag_counts(task.sample_responses(rng, 1)) for _ in range(2))
    while (a == b).all():
        b = task.tag_counts(task.sample_responses(rng, 1))
    own = task.sample_annotators(rng, 1)  # [1, V]
    repeats = 40_000
    wins = task.sample_labels(rng, np.repeat(a, repeats, 0), np.repeat(b, repeats, 0), np.repeat(own, repeats, 0))
    p = 1 / (1 + np.exp(-(own[0] @ (a[0] - b[0]))))
    assert abs(wins.mean() - p) < 4 * math.sqrt(p * (1 - p) / repeats) + 1e-4


def test_bad_labels_per_annotator(tmp_path):
    with pytest.raises(MinqrError, match=r"--labels-per-annotator must be at least 0 \(got -1\)"):
        make_synthetic_task(tmp_path / "x", num_train=10, num_test=5, labels_per_annotator=-1)
    with pytest.raises(MinqrError, match=r"--labels-per-annotator 11 is more than the 10 training pairs"):
        make_synthetic_task(tmp_path / "x", num_train=10, num_test=5, labels_per_annotator=11)


def test_plain_task_unchanged_by_the_option(tmp_path):
    """K = 0 is the plain task, byte for byte the same data as before the option existed."""
    plain = make_synthetic_task(tmp_path / "a", num_train=30, num_test=10, num_samples=4)
    again = make_synthetic_task(tmp_path / "b", num_train=30, num_test=10, num_samples=4, labels_per_annotator=0)
    assert (plain / "train.jsonl").read_text() == (again / "train.jsonl").read_text()
    assert "annotator" not in (plain / "train.jsonl").read_text()


def test_personal_accuracy_against_a_loop(tmp_path):
    rng = np.random.default_rng(5)
    num, n = 50, 4
    p_a = rng.uniform(0, 1, num)
    group = rng.integers(0, 2, num)
    group_p = rng.uniform(0, 1, (num, 2))
    true_c, true_r = rng.normal(size=num), rng.normal(size=num)
    truth = tmp_path / "truth.npz"
    np.savez(truth, annotator_probability=p_a, annotator_group=group, annotator_group_probability=group_p,
             chosen_annotator_reward=true_c, rejected_annotator_reward=true_r)
    personal = rng.uniform(0, 1, num)
    personal[[3, 7]] = np.nan  # rows of nobody the model knows
    personal[5] = 0.5  # a tie counts half
    reward = np.stack([2 * true_c + 0.1, 2 * true_r + 0.1], 1) + rng.normal(0, 1e-3, (num, 2))
    chosen, rejected = rng.normal(size=(num, n)), rng.normal(size=(num, n))
    metadata = {"model": "runs/m", "head": "quantile", "data": "data/test.jsonl", "split": "test",
                "workload": "known", "taus": ((2 * np.arange(n) + 1) / (2 * n)).tolist(), "objective": "mixture",
                "personal_reference": "the anchor reply"}
    save_scores(tmp_path / "s.npz", chosen.astype(np.float32), rejected.astype(np.float32), metadata,
                personal={"personal_probability": personal.astype(np.float32),
                          "personal_posterior": np.where(np.isnan(personal)[:, None], np.nan, 1 / n) * np.ones(n),
                          "personal_reward": np.where(np.isnan(personal)[:, None], np.nan, reward)})
    scores = load_scores(tmp_path / "s.npz")
    result = personal_accuracy(scores, truth)

    def loop(prob):
        total, count = 0.0, 0
        for j in range(num):
            if math.isnan(personal[j]):
                continue
            if prob[j] > 0.5:
                total += p_a[j]
            elif prob[j] < 0.5:
                total += 1 - p_a[j]
            else:
                total += 0.5
            count += 1
        return total / count

    population = [np.mean(1 / (1 + np.exp(-(chosen[j] - rejected[j])))) for j in range(num)]
    assert result["pairs"] == num - 2 and result["pairs_without"] == 2
    assert result["personal"] == pytest.approx(loop(personal), abs=1e-6)
    assert result["population"] == pytest.approx(loop(population), abs=1e-12)
    assert result["group_oracle"] == pytest.approx(loop([group_p[j, group[j]] for j in range(num)]), abs=1e-12)
    assert result["exact_oracle"] == pytest.approx(np.mean(np.maximum(p_a, 1 - p_a)[~np.isnan(personal)]))
    # the best kind: for each group, the one kind most accurate on its pairs, weighted by the group's pairs
    best_total = 0.0
    for g in (0, 1):
        mine = [j for j in range(num) if group[j] == g and not math.isnan(personal[j])]
        accuracies = []
        for k in range(n):
            kind = {j: 1 / (1 + math.exp(rejected[j, k] - chosen[j, k])) for j in mine}
            accuracies.append(sum(p_a[j] if kind[j] > 0.5 else 1 - p_a[j] for j in mine))  # no ties: random outputs
        best_total += max(accuracies)
    assert result["best_kind"] == pytest.approx(best_total / (num - 2), abs=1e-6)
    assert result["best_kind"] >= max(loop([1 / (1 + math.exp(rejected[j, k] - chosen[j, k])) for j in range(num)])
                                      for k in range(n)) - 1e-12  # never below the best kind for all groups at once
    assert result["fit_slope"] == pytest.approx(2.0, abs=1e-2)
    assert expected_accuracy(np.array([1.0]), np.array([0.8])) == pytest.approx(0.8)
    # rewards relative to something else than the anchor (worth 0, as the truth's are): no fit slope
    metadata["personal_reference"] = "the pair's mean, kind by kind"
    save_scores(tmp_path / "other.npz", chosen.astype(np.float32), rejected.astype(np.float32), metadata,
                personal=scores.personal)
    assert "fit_slope" not in personal_accuracy(load_scores(tmp_path / "other.npz"), truth)
    # no row of a known annotator (new people scored without --context): not measured, and analyze goes on
    save_scores(tmp_path / "none.npz", chosen.astype(np.float32), rejected.astype(np.float32), metadata,
                personal={name: np.full_like(array, np.nan) for name, array in scores.personal.items()})
    unmeasured = personal_accuracy(load_scores(tmp_path / "none.npz"), truth)
    assert unmeasured["value"] is None and "score known annotators' pairs" in unmeasured["not_measured"]
    markdown = personal_markdown([{"workload": "new", "label": "m", "personal": unmeasured}])
    assert "| new | m | 0 | not measured: no row has a personal probability" in markdown
    # every row scored as one person's (--annotator): the truth is each row's own annotator's, so not measured
    save_scores(tmp_path / "as_one.npz", chosen.astype(np.float32), rejected.astype(np.float32),
                {**metadata, "annotator": "a3"}, personal=scores.personal)
    assert personal_accuracy(load_scores(tmp_path / "as_one.npz"), truth) == {
        "value": None, "not_measured": "the rows were all scored as annotator 'a3' (--annotator), but the truth holds "
                                       "each pair's own annotator's preference: score without --annotator to "
                                       "measure it"}


def test_within_class_spread_rho_against_scipy(tmp_path):
    """Classes by the set of controversial tags, Spearman per class (scipy), weighted by size."""
    from scipy.stats import spearmanr

    from minqr.study.spread_classes import MIN_CLASS, within_class_spread_rho

    rng = np.random.default_rng(11)
    num, n, v, s = 80, 4, 5, 400
    controversial = np.array([False, False, True, True, False])
    tags = {side: (rng.random((num, v)) < 0.5).astype(np.int8) for side in ("chosen", "rejected")}
    widths = {side: rng.uniform(0.5, 3, num) for side in tags}
    samples = {side: rng.normal(0, 1, (num, s)) * widths[side][:, None] for side in tags}
    truth = tmp_path / "truth.npz"
    np.savez(truth, chosen_samples=samples["chosen"], rejected_samples=samples["rejected"],
             chosen_tags=tags["chosen"], rejected_tags=tags["rejected"], controversial_tags=controversial)
    taus = (2 * np.arange(n) + 1) / (2 * n)
    noisy = {side: widths[side] + rng.normal(0, 0.7, num) for side in tags}
    outputs = {side: np.sort(rng.normal(size=(num, n)), 1) * noisy[side][:, None] for side in tags}
    metadata = {"model": "runs/m", "head": "quantile", "data": "data/test.jsonl", "split": "test",
                "workload": "w", "taus": taus.tolist(), "objective": "mixture"}
    save_scores(tmp_path / "s.npz", outputs["chosen"].astype(np.float32), outputs["rejected"].astype(np.float32),
                metadata)
    result = within_class_spread_rho(load_scores(tmp_path / "s.npz"), truth)

    all_tags = np.concatenate([tags["chosen"], tags["rejected"]])
    predicted = np.concatenate([outputs[side].astype(np.float32).astype(np.float64) for side in tags])
    true = np.concatenate([samples[side] for side in tags])
    pred_spread = predicted[:, -1] - predicted[:, 0]
    true_spread = np.quantile(true, taus[-1], axis=1) - np.quantile(true, taus[0], axis=1)
    rhos, sizes = [], []
    for key in {tuple(row) for row in all_tags[:, 2:4]}:
        members = [i for i in range(len(all_tags)) if tuple(all_tags[i, 2:4]) == key]
        if len(members) >= MIN_CLASS:
            rhos.append(spearmanr(pred_spread[members], true_spread[members]).statistic)
            sizes.append(len(members))
    assert result["classes"] == len(rhos) and result["responses"] == sum(sizes)
    assert result["rho"] == pytest.approx(np.average(rhos, weights=sizes), abs=1e-9)
    assert result["rho"] > 0.3  # the noisy widths follow the true ones


def test_every_training_pair_is_labelled_when_k_does_not_divide_the_pairs():
    """num_train = 10 with K = 3: four annotators, three labels each and the last one the tenth
    (not 9 pairs, three annotators, and a task.json that says 10)."""
    files, _ = pooled_task(TASK_VARIANTS["demo"], np.random.default_rng(0), np.random.default_rng(1), num_train=10,
                           num_test=10, per_annotator=3, num_samples=4)
    train = files["train.jsonl"][1]
    assert train["ids"] == ["a0"] * 3 + ["a1"] * 3 + ["a2"] * 3 + ["a3"]
