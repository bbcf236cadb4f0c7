"""Personal held-out metrics during training (minqr/training/personal_metrics.py): each held-out pair
scored by its annotator's posterior from their training pairs, against float64 posteriors,
probabilities and per-annotator figures written out here from the model run on each text alone; an
annotator absent from the training data is the population; training end to end: the metrics in
metrics.jsonl, eval_annotators.json and the log's lines, a head without kinds (said, no metrics),
held-out pairs without ids (nothing changes), --annotator-likelihood's earlier evaluations."""
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_personal import loop_log_posteriors
from test_scoring import MAX_LENGTH, alone, make_pairs, random_reward_model, tokenizer  # noqa: F401 (a fixture)
from test_train import EVAL_KEYS, tiny_options, write_run_inputs

from minqr.data.batching import tokenize_pairs
from minqr.data.pairs import read_pairs_file
from minqr.distribution.personal import Annotators
from minqr.distribution.scale import fit_scale
from minqr.models.reward import RewardModel
from minqr.models.tokenizer import load_tokenizer
from minqr.training.config import TrainConfig
from minqr.training.distributed import Processes
from minqr.training.evaluation import held_out_metrics, training_posteriors
from minqr.training.loop import train
from minqr.training.metrics import read_metrics
from minqr.training.personal_metrics import MIN_PAIRS, PERSONAL_EVAL_FILE, PERSONAL_KEYS, PersonalEvaluation


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def credit(p):
    return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0


def expected_metrics(chosen, rejected, ids, log_q: dict, num_kinds):
    """The metrics by their definitions, in float64 loops: `log_q` maps a known annotator to their
    log-posterior (a list of N), others get 1/N. Returns (metrics, {id: (pairs, personal, population)},
    the pairs' personal and population probabilities)."""
    c, r = chosen.double().tolist(), rejected.double().tolist()
    per, personal_p, population_p = {}, [], []
    for j, annotator in enumerate(ids):
        q = [math.exp(v) for v in log_q[annotator]] if annotator in log_q else [1.0 / num_kinds] * num_kinds
        personal = sum(q[k] * sigmoid(c[j][k] - r[j][k]) for k in range(num_kinds))
        population = sum(sigmoid(c[j][k] - r[j][k]) for k in range(num_kinds)) / num_kinds
        personal_p.append(personal)
        population_p.append(population)
        n, a, b = per.get(annotator, (0, 0.0, 0.0))
        per[annotator] = (n + 1, a + credit(personal), b + credit(population))
    accuracies = [a / n for n, a, _ in per.values()]
    measured = sorted(a / n for n, a, _ in per.values() if n >= MIN_PAIRS)
    metrics = {"eval_personal_accuracy": sum(a for _, a, _ in per.values()) / len(ids),
               "eval_population_accuracy": sum(b for _, _, b in per.values()) / len(ids),
               "eval_annotators": len(per), "eval_known_annotators": sum(a in log_q for a in per),
               "eval_annotator_accuracy_mean": sum(accuracies) / len(accuracies),
               "eval_annotators_measured": len(measured)}
    if measured:
        worst = measured[: max(1, len(measured) // 10)]
        metrics["eval_annotator_accuracy_worst_decile"] = sum(worst) / len(worst)
    return metrics, per, personal_p, population_p


def assert_metrics(got: dict, expected: dict):
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def outputs_alone(model, text_tokenizer, pairs, max_length):
    chosen = torch.tensor(np.stack([alone(model, text_tokenizer, p.chosen, max_length) for p in pairs]))
    rejected = torch.tensor(np.stack([alone(model, text_tokenizer, p.rejected, max_length) for p in pairs]))
    return chosen, rejected  # [P, N] each


def test_personal_metrics_of_a_random_model(tokenizer, tmp_path):  # noqa: F811 (the fixture)
    """held_out_metrics with the posteriors of training_posteriors, on a random mixture (N = 5) and
    random pairs with ids: every figure as written out in float64, and eval_annotators.json."""
    n, rng = 5, np.random.default_rng(int(torch.seed() % 2**31))
    model = random_reward_model("quantile", n, seed=int(rng.integers(1000)))
    train_pairs = [replace(p, annotator=["a", "b", "c"][k % 3], pair_margin=float(rng.uniform(-0.5, 0.5)))
                   for k, p in enumerate(make_pairs(seed=1) + make_pairs(seed=2))]
    # held out: a, b and "new" (absent from the training data) with 5+ pairs (measured), c with 2
    held_ids = ["a"] * 9 + ["b"] * 12 + ["c"] * 2 + ["new"] * 7
    held_ids = [held_ids[k] for k in rng.permutation(len(held_ids))]
    held_pairs = [replace(p, annotator=annotator) for p, annotator in zip(make_pairs(seed=3) + make_pairs(seed=4),
                                                                           held_ids)]
    train_tokens = tokenize_pairs(train_pairs, tokenizer, MAX_LENGTH)
    held_tokens = tokenize_pairs(held_pairs, tokenizer, MAX_LENGTH)
    procs = Processes(0, 1, torch.device("cpu"))

    # the training annotators' posteriors: the pass over the training pairs, with their margins
    known, scale = training_posteriors(model, train_tokens, 4, True, procs, torch.float32)
    assert known.ids == ("a", "b", "c") and known.pairs == (10, 10, 10)
    chosen, rejected = outputs_alone(model, tokenizer, train_pairs, MAX_LENGTH)
    margins = torch.tensor([p.pair_margin for p in train_pairs])
    log_q = loop_log_posteriors(chosen, rejected, torch.arange(30) % 3, 3, margins)
    torch.testing.assert_close(known.log_posteriors, log_q, rtol=1e-5, atol=1e-5)
    # and where the same labels put the scale (the search itself: tests/test_scale.py)
    expected = fit_scale(chosen.double() - rejected.double(), torch.arange(30) % 3, 3, margins.double())
    assert scale.per_label == pytest.approx(expected.per_label, rel=2e-3)
    assert scale.annotator_level == pytest.approx(expected.annotator_level, rel=2e-3)

    personal = PersonalEvaluation(held_tokens.annotator_ids, train_tokens.annotator_ids, list(known.pairs), n)
    assert personal.known.tolist() == [annotator != "new" for annotator in held_tokens.annotator_ids]
    held_log_q = personal.log_posteriors(known.log_posteriors)  # [4, N]: a known row each, "new" uniform
    for row, annotator in enumerate(held_tokens.annotator_ids):
        uniform = torch.full((n,), -math.log(n), dtype=torch.float64)
        want = uniform if annotator == "new" else log_q["abc".index(annotator)]
        torch.testing.assert_close(held_log_q[row], want, rtol=1e-5, atol=1e-5)
    metrics = held_out_metrics(model, held_tokens, 4, True, procs, torch.float32, personal=personal,
                               log_posteriors=held_log_q)
    expected, per, personal_p, population_p = expected_metrics(
        *outputs_alone(model, tokenizer, held_pairs, MAX_LENGTH), held_ids,
        {a: log_q[k].tolist() for k, a in enumerate("abc")}, n)
    # no probability within rounding of 1/2 (a credit would be the rounding's), and the posteriors
    # change some pair's verdict, or this test could not tell personal from population
    assert min(abs(p - 0.5) for p in personal_p + population_p) > 1e-5
    assert any(credit(a) != credit(b) for a, b in zip(personal_p, population_p))
    assert_metrics({k: v for k, v in metrics.items() if k.startswith(("eval_personal", "eval_population",
                                                                        "eval_annotator", "eval_known"))}, expected)
    assert isinstance(metrics["eval_annotators"], int) and metrics["eval_annotators_measured"] == 3

    # the file: the figures of the final evaluation, one row per held-out annotator
    path = personal.write(tmp_path, {"step": 7, "eval_loss": 0.1, **metrics})
    assert path == tmp_path / PERSONAL_EVAL_FILE
    saved = json.loads(path.read_text())
    assert saved["step"] == 7 and saved["min_pairs"] == MIN_PAIRS and saved["metrics"] == {
        k: metrics[k] for k in PERSONAL_KEYS if k in metrics}
    rows = {row["id"]: row for row in saved["annotators"]}
    assert set(rows) == set(per)
    for annotator, (pairs, right, population_right) in per.items():
        row = rows[annotator]
        assert (row["known"], row["train_pairs"], row["eval_pairs"]) == (annotator != "new",
                                                                         0 if annotator == "new" else 10, pairs)
        assert row["personal_accuracy"] == pytest.approx(right / pairs)
        assert row["population_accuracy"] == pytest.approx(population_right / pairs)

    # without posteriors (an evaluation before any cache): no personal metrics
    plain = held_out_metrics(model, held_tokens, 4, True, procs, torch.float32, personal=personal)
    assert set(plain) == EVAL_KEYS - {"step"}


def test_the_worst_decile_of_many_annotators():
    """The per-annotator figures of a random tally against numpy: 37 annotators with 1 to 12 pairs."""
    rng = np.random.default_rng(int(torch.seed() % 2**31))
    pairs = rng.integers(1, 13, 37).astype(float)
    right = np.floor(rng.uniform(0, 1, 37) * (pairs + 1))
    population = np.floor(rng.uniform(0, 1, 37) * (pairs + 1))
    personal = PersonalEvaluation(tuple(range(37)), tuple(range(0, 74, 2)), [3] * 37, 4)
    got = personal.metrics(torch.tensor(np.stack([pairs, right, population], -1)))
    measured = np.sort((right / pairs)[pairs >= MIN_PAIRS])
    assert got["eval_annotators_measured"] == len(measured) and got["eval_known_annotators"] == 19  # the even ids
    assert got["eval_annotator_accuracy_worst_decile"] == pytest.approx(measured[: max(1, len(measured) // 10)].mean())
    assert got["eval_annotator_accuracy_mean"] == pytest.approx(np.mean(right / pairs))
    assert got["eval_personal_accuracy"] == pytest.approx(right.sum() / pairs.sum())


def labelled(source, target: Path, ids) -> str:
    lines = Path(source).read_text().splitlines()
    target.write_text("".join(json.dumps({**json.loads(line), "annotator": ids[k % len(ids)]}) + "\n"
                              for k, line in enumerate(lines)))
    return str(target)


def test_training_reports_personal_metrics(tmp_path, capsys):
    """End to end: the final evaluation's personal metrics in metrics.jsonl and eval_annotators.json
    equal the figures written out from the saved model (the final weights) run on each text alone;
    earlier evaluations have none (the per-label objective keeps no posteriors); a head without
    kinds says why it has none; held-out pairs without ids change nothing, and take the file of the
    run they replace with them."""
    inputs = write_run_inputs(tmp_path / "inputs", num_train=24)
    train_data = labelled(inputs["data"], tmp_path / "train.jsonl", ["u0", "u1", "u2"])
    held_ids = ["u0", "u1", "u1", "stranger"]  # 24 held-out pairs: u1 12, u0 6, the stranger 6
    held_data = labelled(inputs["eval_data"], tmp_path / "test.jsonl", held_ids)
    out = tmp_path / "run"
    train(TrainConfig(**tiny_options(inputs, out, data=train_data, eval_data=held_data, num_quantiles=4,
                                     max_steps=4, eval_every=2, save_every=0)), progress=False)
    log = capsys.readouterr().err
    assert "held-out pairs name 3 annotators, 2 of them in the training data: personal metrics at the final" in log
    evaluations = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert [set(r) for r in evaluations[:-1]] == [EVAL_KEYS]
    final = evaluations[-1]

    model, saved_tokenizer = RewardModel.from_pretrained(out), load_tokenizer(out)
    train_pairs, _ = read_pairs_file(train_data)
    held_pairs, _ = read_pairs_file(held_data)
    chosen, rejected = outputs_alone(model, saved_tokenizer, train_pairs, 96)
    log_q = loop_log_posteriors(chosen, rejected, torch.arange(len(train_pairs)) % 3, 3)
    torch.testing.assert_close(Annotators.load(out, 4).log_posteriors, log_q, rtol=1e-4, atol=1e-4)
    expected, per, personal_p, population_p = expected_metrics(
        *outputs_alone(model, saved_tokenizer, held_pairs, 96), [p.annotator for p in held_pairs],
        {f"u{k}": log_q[k].tolist() for k in range(3)}, 4)
    assert min(abs(p - 0.5) for p in personal_p + population_p) > 1e-5
    assert set(final) == EVAL_KEYS | set(expected)
    for key, value in expected.items():
        assert final[key] == pytest.approx(value, rel=1e-9), key
    saved = json.loads((out / PERSONAL_EVAL_FILE).read_text())
    assert saved["step"] == 4 and saved["metrics"] == {k: final[k] for k in expected}
    assert {row["id"]: (row["known"], row["eval_pairs"]) for row in saved["annotators"]} == {
        "u0": (True, 6), "u1": (True, 12), "stranger": (False, 6)}
    assert f"personal metrics at step 4: accuracy {final['eval_personal_accuracy']:.4f}" in log
    assert f"per annotator in {out / PERSONAL_EVAL_FILE}" in log

    # held-out pairs without ids: the metrics as before, and the replaced run's file goes
    train(TrainConfig(**tiny_options(inputs, out, data=train_data, num_quantiles=4, max_steps=2, eval_every=0,
                                     save_every=0, overwrite=True)), progress=False)
    assert all(set(r) == EVAL_KEYS for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r)
    assert not (out / PERSONAL_EVAL_FILE).exists()
    log = capsys.readouterr().err
    assert f"removed {out / PERSONAL_EVAL_FILE}: the personal metrics of the run this one replaced" in log
    assert "held-out pairs name" not in log and "personal metrics at step" not in log

    # a head without kinds: said once, no personal metrics, no file
    scalar = tmp_path / "scalar"
    train(TrainConfig(**tiny_options(inputs, scalar, head="scalar", data=train_data, eval_data=held_data,
                                     max_steps=2, eval_every=1, save_every=0)), progress=False)
    log = capsys.readouterr().err
    assert log.count("held-out pairs name 3 annotators, but there are no personal metrics: personal rewards "
                     "need a mixture head") == 1
    assert all(set(r) == EVAL_KEYS for r in read_metrics(scalar / "metrics.jsonl") if "eval_loss" in r)
    assert not (scalar / PERSONAL_EVAL_FILE).exists()


def test_the_annotator_likelihood_reports_at_every_evaluation_after_its_first_pass(tmp_path, capsys):
    """--annotator-likelihood caches posteriors after the first pass (24 pairs: 3 steps of 8), so
    the evaluations from then on report personal metrics, and those before do not."""
    inputs = write_run_inputs(tmp_path / "inputs", num_train=24)
    train_data = labelled(inputs["data"], tmp_path / "train.jsonl", ["u0", "u1", "u2"])
    held_data = labelled(inputs["eval_data"], tmp_path / "test.jsonl", ["u0", "u1", "x"])
    out = tmp_path / "run"
    train(TrainConfig(**tiny_options(inputs, out, data=train_data, eval_data=held_data, num_quantiles=4,
                                     max_steps=5, eval_every=2, save_every=0, annotator_likelihood=True)),
          progress=False)
    assert "personal metrics at every evaluation once the annotator-level likelihood" in capsys.readouterr().err
    evaluations = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r}
    assert sorted(evaluations) == [2, 4, 5]
    assert set(evaluations[2]) == EVAL_KEYS
    assert all(set(PERSONAL_KEYS) - {"eval_annotator_accuracy_worst_decile"} <= set(evaluations[s]) for s in (4, 5))
