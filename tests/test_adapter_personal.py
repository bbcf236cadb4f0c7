"""The reward-function adapters give one annotator's personal reward: the statistic with the
mixture's kinds weighted by the posterior saved with the model, checked against float64 sums
written out here; TRL's GRPOTrainer passes an annotator column through; unknown annotators and
heads without kinds refused."""
import math

import pytest
import torch
from test_adapter_trl import PROMPTS, Recorder, policy, run_grpo
from tiny_reward import tiny_reward_folder

from minqr import MinqrError
from minqr.adapters.texts import TextRewards
from minqr.adapters.trl import RewardFunction
from minqr.distribution.personal import Annotators

datasets = pytest.importorskip("datasets")
N = 6


def save_people(folder, seed=0):
    """Two annotators, "alice" and 3, with random posteriors over the N kinds."""
    log_q = torch.log_softmax(torch.randn(2, N, generator=torch.Generator().manual_seed(seed),
                                          dtype=torch.float64) * 2, -1)
    Annotators(("alice", 3), log_q, (5, 5)).save(folder)
    return {"alice": log_q[0].exp().tolist(), 3: log_q[1].exp().tolist()}


def personal_by_definition(model, tokenizer, texts, groups, statistic, weights):
    """Per text: sum_k q_k d_k (mean) or sum_k q_k sigma(d_k) (preference), d relative to the group's
    mean output kind by kind; q the text's annotator's posterior (None: 1/N)."""
    with torch.no_grad():
        outputs = [model(torch.tensor([tokenizer.encode(t)]))[0].double().tolist() for t in texts]
    values = []
    for i, h in enumerate(outputs):
        members = [outputs[j] for j in range(len(texts)) if groups[j] == groups[i]]
        d = [h[k] - sum(m[k] for m in members) / len(members) for k in range(N)]
        q = weights[i] or [1 / N] * N
        values.append(sum(w * (x if statistic == "mean" else 1 / (1 + math.exp(-x))) for w, x in zip(q, d)))
    return values


@pytest.mark.parametrize("statistic", ["mean", "preference"])
def test_one_annotator_for_every_completion(tmp_path, statistic):
    folder, model, tokenizer = tiny_reward_folder(tmp_path, n=N)
    people = save_people(folder)
    prompts, completions = ["The cat sat"] * 3 + ["A bird"] * 2, [" on a mat", " a bird", " down", " flew", " sang"]
    texts = [p + c for p, c in zip(prompts, completions)]
    for who, key in (("alice", "alice"), ("3", 3)):  # a command line's "3" is the integer id 3
        reward = RewardFunction(str(folder), statistic=statistic, annotator=who, dtype="float32")
        want = personal_by_definition(model, tokenizer, texts, prompts, statistic, [people[key]] * len(texts))
        assert reward(prompts=prompts, completions=completions) == pytest.approx(want, abs=1e-5)
    population = RewardFunction(str(folder), statistic=statistic, dtype="float32")(prompts=prompts,
                                                                                   completions=completions)
    assert population == pytest.approx(personal_by_definition(model, tokenizer, texts, prompts, statistic,
                                                              [None] * len(texts)), abs=1e-5)
    assert population != pytest.approx(want, abs=1e-3)  # the person's reward is another reward


def test_a_column_of_annotators_and_the_population_for_null(tmp_path):
    folder, model, tokenizer = tiny_reward_folder(tmp_path, n=N)
    people = save_people(folder, seed=1)
    prompts, completions = ["Rain fell on"] * 4, [" the roof", " us", " a cat", " nothing"]
    ids = ["alice", None, 3, "alice"]
    reward = RewardFunction(str(folder), statistic="preference", annotator_column="user", dtype="float32")
    got = reward(prompts=prompts, completions=completions, user=ids)
    want = personal_by_definition(model, tokenizer, [p + c for p, c in zip(prompts, completions)], prompts,
                                  "preference", [None if i is None else people[i] for i in ids])
    assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(MinqrError, match="annotator_column='user': the data set has no such column"):
        reward(prompts=prompts, completions=completions, other=ids)
    with pytest.raises(MinqrError, match="annotator 'zoe' is not known to the reward model"):
        reward(prompts=prompts, completions=completions, user=["zoe"] * 4)


def test_unknown_annotators_and_heads_without_kinds_are_refused(tmp_path):
    folder, _, _ = tiny_reward_folder(tmp_path, n=N)
    with pytest.raises(MinqrError, match="annotator 'alice' is not known"):  # no annotators.json at all
        RewardFunction(str(folder), annotator="alice")
    with pytest.raises(MinqrError, match="not both"):
        RewardFunction(str(folder), annotator="alice", annotator_column="user")
    rewards = TextRewards.load(folder)
    rewards.model.head_config = rewards.model.head_config.__class__.make("quantile", N, "paper")
    with pytest.raises(MinqrError, match="personal rewards need a mixture head"):
        rewards.statistic_values(["a"], [" b"], annotators=["alice"])


def test_grpo_passes_the_annotator_column(tmp_path):
    pytest.importorskip("trl")
    folder, model, tokenizer = tiny_reward_folder(tmp_path, n=N)
    people = save_people(folder, seed=2)
    policy_model, policy_tokenizer = policy(tmp_path)
    recorder = Recorder(RewardFunction(str(folder), statistic="mean", annotator_column="user", dtype="float32"))
    users = ["alice", "3", "alice", "3"]  # one type a column: "3" is the integer id 3
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS, "user": users})
    seen = []
    original = recorder.inner.rewards.statistic_values

    def spy(prompts, completions, **kwargs):
        seen.append((list(prompts), list(completions), kwargs["annotators"]))
        return original(prompts, completions, **kwargs)

    recorder.inner.rewards.statistic_values = spy
    run_grpo(tmp_path, recorder, dataset, policy_tokenizer, policy_model)
    assert seen
    for (prompts, completions, annotators), (_, _, rewards, _) in zip(seen, recorder.calls):
        assert annotators == [users[PROMPTS.index(p)] for p in prompts]  # each prompt's own row's user
        want = personal_by_definition(model, tokenizer, [p + c for p, c in zip(prompts, completions)], prompts,
                                      "mean", [people["alice" if a == "alice" else 3] for a in annotators])
        assert rewards == pytest.approx(want, abs=1e-5)


def test_verl_reads_the_annotator_from_extra_info(tmp_path):
    from minqr.adapters.verl import compute_score_batch

    folder, model, tokenizer = tiny_reward_folder(tmp_path, n=N)
    people = save_people(folder, seed=3)
    prompts = ["The cat sat", "The cat sat", "Rain fell on", "Rain fell on"]
    solutions = [" on a mat", " far", " the roof", " us"]
    users = [3, "alice", None, 3]
    infos = [{"prompt": p, "user": u} for p, u in zip(prompts, users)]
    results = compute_score_batch(solution_strs=solutions, extra_infos=infos, model=str(folder), statistic="mean",
                                  annotator_key="user", dtype="float32")
    want = personal_by_definition(model, tokenizer, [p + s for p, s in zip(prompts, solutions)], prompts, "mean",
                                  [None if u is None else people[u] for u in users])
    assert [r["score"] for r in results] == pytest.approx(want, abs=1e-5)
    with pytest.raises(MinqrError, match="extra_info has no 'rater' \\(reward_kwargs annotator_key\\)"):
        compute_score_batch(solution_strs=solutions, extra_infos=infos, model=str(folder), annotator_key="rater")
