"""The synthetic task: its files, its determinism, and its truth against the generator itself
(Monte Carlo over simulated annotators) and against scipy."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import integrate, stats
from scipy.special import expit

from factories import load_tool
from minqr import MinqrError, load_gpt2, load_tokenizer
from minqr.data.pairs import read_pairs_file
from minqr.objectives.references import quantile_levels
from minqr.synthetic.folder import TINY_MODEL, make_synthetic_task
from minqr.synthetic.task import ANCHOR_REPLY, TASK_VARIANTS, SyntheticTask, sample_pairs, spread_or_scale
from minqr.synthetic.truth import TRUTH_ARRAYS, bayes_accuracy, load_truth, mixture_quantiles

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(num_train=300, num_test=300, num_samples=200)
DIALOGUE = re.compile(r"\n\nHuman: (?P<question>[^\n]+)\n\nAssistant: (?P<tags>[a-z ]+)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_synthetic_task(tmp_path_factory.mktemp("task") / "synthetic", seed=0, **SIZES)


@pytest.fixture(scope="module")
def truth(folder):
    with np.load(folder / "test_truth.npz") as arrays:
        return dict(arrays)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_task_other_seed_other_task(folder, tmp_path):
    again = make_synthetic_task(tmp_path / "again", seed=0, **SIZES)
    for name in ("train.jsonl", "test.jsonl", "task.json", "tokenizer/tokenizer.json", "model/model.safetensors",
                 "model/config.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    with np.load(folder / "test_truth.npz") as first, np.load(again / "test_truth.npz") as second:
        assert first.files == second.files
        for key in first.files:
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    other = make_synthetic_task(tmp_path / "other", seed=1, **SIZES)
    assert (other / "train.jsonl").read_bytes() != (folder / "train.jsonl").read_bytes()
    assert (other / "model/model.safetensors").read_bytes() != (folder / "model/model.safetensors").read_bytes()


def test_files_are_what_the_trainer_reads(folder, truth):
    task = SyntheticTask()
    for split, count in (("train", SIZES["num_train"]), ("test", SIZES["num_test"])):
        pairs, stats_ = read_pairs_file(folder / f"{split}.jsonl")
        assert len(pairs) == count and stats_.identical == 0
    test = read_jsonl(folder / "test.jsonl")
    for side in ("chosen", "rejected"):
        tags = np.zeros((len(test), len(task.tags)), dtype=np.int8)
        for row, record in enumerate(test):
            match = DIALOGUE.fullmatch(record[side])
            assert match, record[side]
            for tag in match["tags"].split():
                if tag != ANCHOR_REPLY:  # the anchor: no tags
                    tags[row, task.tags.index(tag)] += 1
        np.testing.assert_array_equal(tags, truth[f"{side}_tags"])  # the truth is aligned line by line
    for record in test:  # the two responses answer the same question: a shared prefix
        assert DIALOGUE.fullmatch(record["chosen"])["question"] == DIALOGUE.fullmatch(record["rejected"])["question"]

    tokenizer = load_tokenizer(folder / "tokenizer")
    assert load_tokenizer(folder / "model").backend.to_str() == tokenizer.backend.to_str()
    assert tokenizer.eos_id == tokenizer.vocab_size - 1
    ids = tokenizer.encode_batch([r[side] for r in test for side in ("chosen", "rejected")])
    assert tokenizer.eos_id not in {i for row in ids for i in row}
    assert tokenizer.decode(ids[0]) == test[0]["chosen"]
    model = load_gpt2(folder / "model")
    config = model.config
    assert {k: getattr(config, k) for k in TINY_MODEL} == TINY_MODEL
    assert (config.vocab_size, config.eos_token_id) == (tokenizer.vocab_size, tokenizer.eos_id)
    assert max(map(len, ids)) <= config.n_positions

    P, S, G, V = SIZES["num_test"], SIZES["num_samples"], len(task.groups), len(task.tags)
    shapes = {"group_weights": (G,), "quantile_levels": (10,), "preference_probability": (P,), "anchor_texts": (P,),
              "tag_names": (V,), "controversial_tags": (V,)}
    for side in ("chosen", "rejected"):
        shapes.update({f"{side}_samples": (P, S), f"{side}_group_means": (P, G), f"{side}_group_stds": (P, G),
                       f"{side}_quantiles": (P, 10), f"{side}_tags": (P, V)})
    assert {k: v.shape for k, v in truth.items()} == shapes
    assert truth["tag_names"].tolist() == list(task.tags)
    assert truth["controversial_tags"].tolist() == task.controversial.tolist()
    np.testing.assert_allclose(truth["quantile_levels"], [(2 * i + 1) / 20 for i in range(10)], rtol=0, atol=1e-15)
    # the levels of the quantile head (N = 10), bit for bit: truth and model line up column by column
    assert np.array_equal(truth["quantile_levels"], quantile_levels(10, dtype=torch.float64).numpy())


def test_task_json_holds_the_bayes_accuracy_of_the_test_pairs(folder, truth):
    summary = json.loads((folder / "task.json").read_text())
    p = truth["preference_probability"]
    assert summary["bayes_accuracy"] == pytest.approx(np.maximum(p, 1 - p).mean(), abs=1e-12)
    # a pair both sides of which every group values alike (e.g. the anchor against "joke formal") is a coin toss
    assert summary["bayes_accuracy_on_labels"] == pytest.approx(np.mean((p > 0.5) + 0.5 * (p == 0.5)), abs=1e-12)
    assert summary["tags"]["joke"] == {"casual": 4.0, "formal": -4.0}
    assert (summary["num_train"], summary["num_test"], summary["seed"]) == (300, 300, 0)


def test_preference_probability_is_exact(truth):
    """Against scipy's adaptive quadrature of the same integral, written out independently."""
    task = SyntheticTask()
    for row in range(0, 300, 37):
        difference = (truth["chosen_tags"][row] - truth["rejected_tags"][row]).astype(float)
        std = task.personal_std * np.sqrt((difference ** 2).sum())
        p = 0.0
        for weight, rewards in zip(task.group_weights, task.rewards):
            mean = difference @ rewards
            p += weight * integrate.quad(lambda x: expit(x) * stats.norm.pdf(x, mean, std), -np.inf, np.inf,
                                         epsabs=1e-13, epsrel=1e-12)[0]
        assert truth["preference_probability"][row] == pytest.approx(p, abs=1e-10)
    a, b = truth["chosen_tags"], truth["rejected_tags"]
    np.testing.assert_allclose(task.preference_probability(a, b) + task.preference_probability(b, a), 1.0, atol=1e-12)


def test_spread_or_scale_against_quadrature():
    """The divergence at the returned scale, written out with scipy's quadrature on the same pairs
    (drawn as the function draws them), and the scale is its minimum."""
    task, wider, n = TASK_VARIANTS["shifted"], 1.5, 10
    found = spread_or_scale(task, wider, num_pairs=n, seed=3)
    rng = np.random.default_rng(3)
    a, b = (task.tag_counts(task.sample_responses(rng, n)) for _ in range(2))

    def probability(difference, std, scale):
        spread = std * np.sqrt((difference ** 2).sum())
        return sum(weight * integrate.quad(lambda x: expit(x) * stats.norm.pdf(x, scale * (difference @ rewards),
                                                                                spread), -np.inf, np.inf,
                                           epsabs=1e-12, epsrel=1e-10)[0] if spread > 0
                   else weight * expit(scale * (difference @ rewards))
                   for weight, rewards in zip(task.group_weights, task.rewards))

    def divergence(scale):
        total = 0.0
        for row in range(n):
            difference = (a[row] - b[row]).astype(float)
            p, q = probability(difference, task.personal_std, 1.0), probability(difference, wider, scale)
            total += p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
        return total / n

    # the function integrates by Gauss-Hermite (64 nodes), the test adaptively: 1e-9 apart in p
    assert found["kl_per_pair"] == pytest.approx(divergence(found["scale"]), rel=1e-4)
    assert divergence(found["scale"] * 1.01) > found["kl_per_pair"] < divergence(found["scale"] * 0.99)


@pytest.mark.slow  # a search over two likelihoods on 40,000 pairs: about 3.3 s of CPU
def test_labels_barely_tell_a_wider_spread_from_a_larger_scale():
    """docs/objectives.md#spread-or-scale: on `shifted`, personal deviations 1.5 times as wide with rewards
    rescaled are about 3 nats away from the truth over the 40,000 training pairs, while no personal
    deviations at all are about 27 nats away; with the task's own spread, c = 1 and nothing. (The
    divergence per pair is estimated here on 10,000 pairs, for speed.)"""
    task, pairs = TASK_VARIANTS["shifted"], 10_000
    same = spread_or_scale(task, task.personal_std, pairs)
    assert same["scale"] == pytest.approx(1.0, abs=1e-4) and same["kl_per_pair"] < 1e-10
    wider = spread_or_scale(task, 1.5 * task.personal_std, pairs)
    none = spread_or_scale(task, 1e-6, pairs)
    assert wider["scale"] > 1.2 and 40_000 * wider["kl_per_pair"] < 5
    assert none["scale"] < 0.7 and 40_000 * none["kl_per_pair"] > 20


def test_bayes_accuracy_against_simulated_annotators(truth):
    """The generator's own annotators label the test pairs afresh many times: the Bayes ranker's
    accuracy and each pair's win rate must agree with the exact values."""
    task = SyntheticTask()
    rng = np.random.default_rng(123)
    repeats, p = 2000, truth["preference_probability"]
    chosen = np.tile(truth["chosen_tags"], (repeats, 1))  # [repeats * P, V]
    rejected = np.tile(truth["rejected_tags"], (repeats, 1))
    wins = task.sample_labels(rng, chosen, rejected).reshape(repeats, -1)  # [repeats, P]
    # each pair's win count is Binomial(repeats, p): neither tail may be implausibly small
    count = wins.sum(0)
    assert stats.binom.cdf(count, repeats, p).min() > 1e-5
    assert stats.binom.sf(count - 1, repeats, p).min() > 1e-5
    simulated_accuracy = np.mean(wins == (p > 0.5))
    assert simulated_accuracy == pytest.approx(bayes_accuracy(p), abs=4 * 0.5 / np.sqrt(wins.size))


def test_the_default_task_has_a_bayes_accuracy_a_model_can_approach():
    task = SyntheticTask()
    pairs = sample_pairs(task, np.random.default_rng(7), 4000)
    accuracy = bayes_accuracy(task.preference_probability(pairs["chosen_tags"], pairs["rejected_tags"]))
    assert 0.85 <= accuracy <= 0.92  # a model can reach 0.80, yet many pairs are genuinely contested


def test_the_anchor_is_worth_0_to_everyone_and_answers_each_question(folder, truth):
    """One response in twenty is the neutral reply, no tags: its reward is exactly 0 for every
    simulated annotator, and the truth holds that reply to every test pair's question."""
    test = read_jsonl(folder / "test.jsonl")
    train = read_jsonl(folder / "train.jsonl")
    for side in ("chosen", "rejected"):
        anchors = truth[f"{side}_tags"].sum(1) == 0
        assert anchors.any()
        assert np.all(truth[f"{side}_samples"][anchors] == 0) and np.all(truth[f"{side}_quantiles"][anchors] == 0)
        assert all(test[row][side].endswith("Assistant: " + ANCHOR_REPLY) for row in np.flatnonzero(anchors))
    replies = [DIALOGUE.fullmatch(r[side])["tags"] for r in train + test for side in ("chosen", "rejected")]
    share = np.mean([reply == ANCHOR_REPLY for reply in replies])
    assert abs(share - SyntheticTask().anchor_rate) < 4 * np.sqrt(0.05 * 0.95 / len(replies))
    for record, anchor in zip(test, truth["anchor_texts"]):
        assert DIALOGUE.fullmatch(str(anchor))["tags"] == ANCHOR_REPLY
        assert DIALOGUE.fullmatch(str(anchor))["question"] == DIALOGUE.fullmatch(record["chosen"])["question"]


def test_variants_differ_in_shares_and_spreads(tmp_path):
    shifted = TASK_VARIANTS["shifted"]
    assert shifted.group_weights.tolist() != TASK_VARIANTS["demo"].group_weights.tolist()
    assert shifted.personal_std != TASK_VARIANTS["demo"].personal_std
    folder = make_synthetic_task(tmp_path / "shifted", num_train=50, num_test=40, num_samples=20, variant="shifted")
    summary = json.loads((folder / "task.json").read_text())
    assert summary["variant"] == "shifted" and summary["groups"] == {"casual": 0.75, "formal": 0.25}
    with pytest.raises(MinqrError, match="variant must be one of demo, shifted, not 'other'"):
        make_synthetic_task(tmp_path / "x", variant="other")


def test_truth_quantiles_and_samples_are_the_mixture(truth):
    task = SyntheticTask()
    levels = truth["quantile_levels"]
    for side in ("chosen", "rejected"):
        tagged = truth[f"{side}_tags"].sum(1) > 0  # the anchor's point mass is checked above
        means, stds, q = (truth[f"{side}_{name}"][tagged] for name in ("group_means", "group_stds", "quantiles"))
        # the mixture CDF at each quantile is its level (scipy's normal CDF, not minqr's bisection)
        cdf = (task.group_weights * stats.norm.cdf(q[..., None], means[:, None], stds[:, None])).sum(-1)
        np.testing.assert_allclose(cdf, np.broadcast_to(levels, cdf.shape), atol=1e-9)
        # the samples (simulated annotators, tag by tag) follow the same distribution
        samples = truth[f"{side}_samples"][tagged]
        below = (samples[:, :, None] < q[:, None, :]).mean(axis=(0, 1))  # [10]
        np.testing.assert_allclose(below, levels, atol=0.01)
        # group moments by hand: each group's mean is the sum of its tag rewards
        np.testing.assert_allclose(means, truth[f"{side}_tags"][tagged] @ task.rewards.T)
    # mixture_quantiles on a case with a closed form: one Gaussian
    q = mixture_quantiles(np.array([[1.0, 1.0]]), np.array([[2.0, 2.0]]), np.array([0.3, 0.7]), levels)
    np.testing.assert_allclose(q[0], stats.norm.ppf(levels, 1.0, 2.0), atol=1e-10)


def test_controversial_responses_have_wider_reward_distributions(truth):
    task = SyntheticTask()
    tags = np.concatenate([truth["chosen_tags"], truth["rejected_tags"]])
    quantiles = np.concatenate([truth["chosen_quantiles"], truth["rejected_quantiles"]])
    samples = np.concatenate([truth["chosen_samples"], truth["rejected_samples"]])
    spread = quantiles[:, -1] - quantiles[:, 0]
    controversial = tags[:, task.controversial].any(1)
    assert 0.3 < controversial.mean() < 0.8
    # clear-cut responses: one Gaussian of std 0.5 sqrt(tags) for everybody, so a known spread
    clear = ~controversial
    expected = 2 * stats.norm.ppf(0.95) * task.personal_std * np.sqrt(tags[clear].sum(1))
    np.testing.assert_allclose(spread[clear], expected, atol=1e-8)
    assert np.median(spread[controversial]) > 3 * np.median(spread[clear])
    assert np.median(samples[controversial].std(1)) > 3 * np.median(samples[clear].std(1))


@pytest.mark.parametrize("kwargs,words", [
    (dict(group_weights=np.array([0.5, 0.6])), "group_weights"),
    (dict(personal_std=0.0), "personal_std"),
    (dict(rewards=np.zeros((3, 15))), "rewards"),
    (dict(tags_per_response=(0, 3)), "tags_per_response"),
    (dict(anchor_rate=1.0), "anchor_rate"),
])
def test_bad_task_parameters(kwargs, words):
    with pytest.raises(MinqrError, match=words):
        SyntheticTask(**kwargs)


def test_bad_sizes(tmp_path):
    # checked by SyntheticConfig's declared ranges, which name the option as the command line spells it
    with pytest.raises(MinqrError, match="--num-train must be at least 1"):
        make_synthetic_task(tmp_path / "x", num_train=0)
    with pytest.raises(MinqrError, match="num_samples must be at least 1"):
        make_synthetic_task(tmp_path / "x", num_samples=0)
    assert not (tmp_path / "x").exists()


def test_the_command_writes_a_variant(tmp_path):
    command = load_tool("synthetic")
    out = tmp_path / "shifted"
    result = CliRunner().invoke(command, ["--out", str(out), "--variant", "shifted", "--num-train", "40",
                                          "--num-test", "30", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote the shifted task into {out}\n"
    summary = json.loads((out / "task.json").read_text())
    assert (summary["variant"], summary["num_train"], summary["num_test"], summary["seed"]) == ("shifted", 40, 30, 3)
    assert len(read_jsonl(out / "train.jsonl")) == 40
    refused = CliRunner().invoke(command, ["--out", str(out), "--variant", "other"])
    assert refused.exit_code == 2 and "'other' is not one of 'demo', 'shifted'" in refused.output
    # a task minqr made is replaced by the next one only with --overwrite (never by a folder of
    # candidate sets, with --overwrite or not); once a user adds to it, or in a folder of the
    # user's, the command refuses with --overwrite too and deletes nothing
    small = ["--num-train", "20", "--num-test", "10"]
    refused = CliRunner().invoke(command, ["--out", str(out), *small])
    assert refused.exit_code == 1 and refused.output.startswith(f"Error: --out {out} exists and holds ")
    assert "pass --overwrite to replace it" in refused.output
    assert json.loads((out / "task.json").read_text())["variant"] == "shifted"
    for overwrite in ([], ["--overwrite"]):
        candidates = CliRunner().invoke(load_tool("candidates"), ["--out", str(out), "--num-prompts", "3", *overwrite])
        assert candidates.exit_code == 1 and (out / "train.jsonl").exists()
        assert candidates.output.startswith(f"Error: --out {out} is a synthetic task that minqr wrote, not a folder "
                                            "of candidate sets: --overwrite replaces only a folder of candidate sets")
    assert CliRunner().invoke(command, ["--out", str(out), *small, "--overwrite"]).exit_code == 0
    assert json.loads((out / "task.json").read_text())["variant"] == "demo"
    small.append("--overwrite")
    (out / "keep.txt").write_text("mine")
    home = tmp_path / "home"
    home.mkdir()
    (home / "keep.txt").write_text("mine")
    for folder, reason in [(out, "holds files added since minqr wrote it (keep.txt)"),
                           (home, "is not a folder that minqr wrote as a whole (it holds keep.txt)")]:
        refused = CliRunner().invoke(command, ["--out", str(folder), *small])
        assert refused.exit_code == 1 and refused.output.startswith(f"Error: --out {folder} {reason}")
        assert (folder / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in home.iterdir()) == ["keep.txt"]


def test_the_truths_levels_are_the_papers_and_the_truth_needs_no_torch():
    """test_truth.npz's quantile levels are quantile_levels(10), written in numpy so that reading a
    truth (the analysis) never imports torch."""
    import subprocess
    import sys

    from minqr.objectives.references import quantile_levels
    from minqr.synthetic.truth import TRUTH_LEVELS
    np.testing.assert_array_equal(TRUTH_LEVELS, quantile_levels(10, dtype=torch.float64).numpy())
    code = "import sys, minqr.synthetic.truth; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_every_array_of_a_written_truth_passes_its_check(folder):
    """The checks of load_truth (TRUTH_ARRAYS) describe what make_synthetic_task writes."""
    with np.load(folder / "test_truth.npz") as arrays:
        names = [name for name in arrays.files if name in TRUTH_ARRAYS]
    assert {"chosen_samples", "chosen_tags", "controversial_tags", "anchor_texts", "preference_probability"} <= set(names)
    assert len(load_truth(folder / "test_truth.npz", SIZES["num_test"], tuple(names))) == len(names)


@pytest.mark.parametrize("change, names, message", [
    (lambda t: t.update(chosen_samples=t["chosen_samples"][:, 0]), ("chosen_samples", "rejected_samples"),
     r"chosen_samples is float\d+ of shape \(\d+,\), but a truth file's chosen_samples is numbers of shape \[P, S\]"),
    (lambda t: t.update(rejected_samples=t["rejected_samples"][:, :3]), ("chosen_samples", "rejected_samples"),
     r"chosen_samples has S = \d+, rejected_samples has S = 3: they must agree"),
    (lambda t: t.update(chosen_samples=t["chosen_samples"].astype(str)), ("chosen_samples", "rejected_samples"),
     r"chosen_samples is <U\d+ of shape"),
    (lambda t: t.update(controversial_tags=t["controversial_tags"][:-1]), ("chosen_tags", "controversial_tags"),
     r"chosen_tags has V = \d+, controversial_tags has V = \d+: they must agree"),
    (lambda t: t.update(preference_probability=t["preference_probability"][:5]), ("preference_probability",),
     r"preference_probability has shape \(5,\), but the scores hold \d+ pairs"),
    (lambda t: t["chosen_samples"].__setitem__((0, 0), np.nan), ("chosen_samples", "rejected_samples"),
     r"chosen_samples holds a number that is not finite"),
    (lambda t: t["preference_probability"].__setitem__(3, 7.0), ("preference_probability",),
     r"preference_probability holds a value outside \[0, 1\], which no probability is"),
])
def test_a_damaged_truth_file_is_refused_by_name(folder, truth, tmp_path, change, names, message):
    damaged = dict(truth)
    change(damaged)
    np.savez(tmp_path / "t.npz", **damaged)
    with pytest.raises(MinqrError, match=message):
        load_truth(tmp_path / "t.npz", SIZES["num_test"], names)


def test_annotator_groups_must_index_the_groups(tmp_path):
    p = 4
    arrays = dict(annotator_probability=np.full(p, 0.5), annotator_group=np.array([0, 1, 2, 1]),
                  annotator_group_probability=np.full((p, 2), 0.5))
    np.savez(tmp_path / "t.npz", **arrays)
    with pytest.raises(MinqrError, match=r"annotator_group must hold group indices 0 \.\.\. 1"):
        load_truth(tmp_path / "t.npz", p, tuple(arrays))
