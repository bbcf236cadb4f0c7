"""Personal rewards of a saved model: `personalize` writes each annotator's posterior, equal to
float64 posteriors written out here from the model run on each text alone; `score` gives the rows of
known annotators (saved, given by --context, or every row as --annotator) their personal
probability and rewards, NaN elsewhere; heads without kinds refused; the CLI's exit codes."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from factories import write_tiny_tokenizer
from test_personal import loop_log_posteriors, loop_prior
from test_scoring import MAX_LENGTH, alone, make_pairs, random_reward_model

from minqr import load_tokenizer
from minqr.distribution.personal import (ANNOTATORS_FILE, PRIOR_ANNOTATORS_A_KIND, PRIOR_FLOOR, PRIOR_ITERATIONS,
                                         Annotators)
from minqr.distribution.scale import fit_scale
import minqr.study.personalize
from minqr.study.personalize import personalize
from minqr.errors import MinqrError
from minqr.models.head import HeadConfig
from minqr.study.scores_file import load_scores
from minqr.study.scoring import score_to_file
from minqr_cli.commands import main

N = 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), layout="tokenizer.json"))


@pytest.fixture()
def mixture(tmp_path, tokenizer):
    """A saved mixture model (N = 5) and the model itself, to run texts alone."""
    model = random_reward_model("quantile", N, seed=11)
    assert model.head_config.objective == "mixture"
    model.save_pretrained(tmp_path / "model", tokenizer=tokenizer, training_args={"max_length": MAX_LENGTH})
    return tmp_path / "model", model


def write_labels(path, pairs, ids, margins=None):
    rows = []
    for k, (pair, annotator) in enumerate(zip(pairs, ids)):
        row = {"chosen": pair.chosen, "rejected": pair.rejected}
        if annotator is not None:
            row["annotator"] = annotator
        if margins is not None:
            row["margin"] = margins[k]
        rows.append(json.dumps(row))
    path.write_text("".join(line + "\n" for line in rows))
    return path


def outputs_alone(model, tokenizer, pairs):
    """[P, N] each: every text run by itself (no batch, no shared prefix)."""
    chosen = torch.tensor(np.stack([alone(model, tokenizer, p.chosen, MAX_LENGTH) for p in pairs]))
    rejected = torch.tensor(np.stack([alone(model, tokenizer, p.rejected, MAX_LENGTH) for p in pairs]))
    return chosen, rejected


def test_personalize_saves_the_posteriors_of_every_annotator(mixture, tokenizer, tmp_path, monkeypatch):
    folder, model = mixture
    pairs = make_pairs(seed=3)
    ids = ["ann", "bob", "cy"] * 5  # 15 pairs, three annotators
    margins = [0.1 * k for k in range(len(pairs))]
    data = write_labels(tmp_path / "labels.jsonl", pairs, ids, margins)
    summary = personalize(folder, data, progress=False)
    assert summary.added == 3 and summary.known == 3
    saved = Annotators.load(folder, N)
    assert saved.ids == ("ann", "bob", "cy") and saved.pairs == (5, 5, 5)
    chosen, rejected = outputs_alone(model, tokenizer, pairs)
    index = torch.tensor([("ann", "bob", "cy").index(a) for a in ids])
    expected = loop_log_posteriors(chosen, rejected, index, 3, torch.tensor(margins))
    torch.testing.assert_close(saved.log_posteriors, expected, rtol=1e-4, atol=1e-4)
    fit = fit_scale(chosen.double() - rejected.double(), index, 3, torch.tensor(margins, dtype=torch.float64))
    assert str(summary).endswith("\n" + fit.describe("the 15 pairs", trained_on=False))

    # the same annotators again: refused without --overwrite, before the scoring pass, nothing changed
    passes = []
    real_pass = minqr.study.personalize.score_tokenized
    monkeypatch.setattr(minqr.study.personalize, "score_tokenized",
                        lambda *args, **kwargs: passes.append(1) or real_pass(*args, **kwargs))
    with pytest.raises(MinqrError, match="already holds the posteriors of 3 annotators .*--overwrite"):
        personalize(folder, data, progress=False)
    assert torch.equal(Annotators.load(folder).log_posteriors, saved.log_posteriors)
    # one new person from a file that names nobody, added beside the others
    alone_file = write_labels(tmp_path / "dee.jsonl", pairs[:4], [None] * 4)
    with pytest.raises(MinqrError, match="names no annotators"):
        personalize(folder, alone_file, progress=False)
    with pytest.raises(MinqrError, match="annotator ' ' is empty: name the person"):
        personalize(folder, alone_file, annotator=" ", progress=False)
    with pytest.raises(MinqrError, match="annotator '' is empty: name the person"):  # as score and serve say it
        score_to_file(folder, data, tmp_path / "empty.npz", annotator="", progress=False)
    with pytest.raises(MinqrError, match="names its annotators .*--annotator names the one person"):
        personalize(folder, data, annotator="dee", progress=False)
    assert passes == []  # every refusal came before the pass over the pairs
    with pytest.raises(MinqrError, match="model .*nowhere does not exist: personalize writes annotators.json"):
        personalize(tmp_path / "nowhere", data, progress=False)
    assert personalize(folder, alone_file, annotator="dee", progress=False).scale is None  # one person: no fit
    both = Annotators.load(folder, N)
    assert both.ids == ("ann", "bob", "cy", "dee")
    torch.testing.assert_close(both.log_posteriors[3:], loop_log_posteriors(chosen[:4], rejected[:4],
                                                                            torch.zeros(4, dtype=torch.long), 1),
                               rtol=1e-4, atol=1e-4)
    assert personalize(folder, data, overwrite=True, progress=False).replaced == 3


def test_many_annotators_give_a_prior_that_new_people_start_from(mixture, tokenizer, tmp_path):
    """Labels of 10 annotators a kind: personalize fits the prior over the kinds and saves it, the
    saved posteriors start from it, and a new person's --context posterior starts from it too; each
    against the posteriors written out here (test_personal's loops) from every text run alone."""
    folder, model = mixture
    pairs = make_pairs(seed=6)
    many = PRIOR_ANNOTATORS_A_KIND * N
    rng = np.random.default_rng(0)
    picks = [int(j) for _ in range(many) for j in rng.choice(len(pairs), size=3, replace=False)]  # 3 pairs each
    ids = [f"u{a}" for a in range(many) for _ in range(3)]
    data = write_labels(tmp_path / "labels.jsonl", [pairs[j] for j in picks], ids)
    # many people added beside a few the model knows, whose posteriors are from the uniform prior:
    # the prior stays uniform, and theirs are from it too
    personalize(folder, write_labels(tmp_path / "few.jsonl", pairs[:4], ["old1", "old2"] * 2), progress=False)
    added = personalize(folder, data, progress=False)
    beside = Annotators.load(folder, N)
    assert beside.log_prior is None and len(beside.ids) == many + 2
    assert (f"\nthe prior over the {N} kinds stays uniform, the model's: its annotators' posteriors "
                               "are from it (a prior is fitted when the labels of every annotator are given together: "
                               "training, or personalize --overwrite of them all)\n") in str(added)
    # replacing every annotator the model knows makes them its population: a prior is fitted
    (folder / ANNOTATORS_FILE).unlink()
    summary = personalize(folder, data, progress=False)
    saved = Annotators.load(folder, N)
    assert f"\n{saved.describe_prior()}" in str(summary) and "fitted to the annotators" in str(summary)
    chosen, rejected = outputs_alone(model, tokenizer, pairs)
    index = torch.tensor([int(a[1:]) for a in ids])
    loop = loop_log_posteriors(chosen[picks], rejected[picks], index, many)  # [A, N] under the uniform prior
    prior = torch.tensor(loop_prior(loop, PRIOR_ITERATIONS, PRIOR_FLOOR, tolerance=1e-9), dtype=torch.float64)
    torch.testing.assert_close(saved.log_prior.exp(), prior, rtol=1e-3, atol=1e-6)
    assert float((prior - 1 / N).abs().max()) > 0.01  # a prior that is not the uniform one
    torch.testing.assert_close(saved.log_posteriors, torch.log_softmax(loop + prior.log(), -1), rtol=1e-3, atol=1e-3)
    context = write_labels(tmp_path / "eve.jsonl", pairs[:6], [None] * 6)
    test = write_labels(tmp_path / "test.jsonl", pairs, [None] * len(pairs))
    one = personalize(folder, context, annotator="eve", progress=False)  # beside them: the model's prior, kept
    assert "the model's, kept: as spread as" in str(one)
    torch.testing.assert_close(Annotators.load(folder, N).log_prior, saved.log_prior, rtol=0, atol=0)
    summary = score_to_file(folder, test, tmp_path / "s.npz", context=str(context), annotator="eve2", progress=False)
    assert any(note.startswith("note: the posteriors of --context's people start from the prior") for note in
               summary.notes)
    eve = loop_log_posteriors(chosen[:6], rejected[:6], torch.zeros(6, dtype=torch.long), 1)[0]
    np.testing.assert_allclose(load_scores(tmp_path / "s.npz").personal["personal_posterior"][0],
                               torch.softmax(eve + prior.log(), -1).numpy(), rtol=1e-3, atol=1e-4)
    saved_eve = Annotators.load(folder, N)  # personalize of one person starts from the prior as --context does
    torch.testing.assert_close(saved_eve.log_posteriors[saved_eve.ids.index("eve")].exp(),
                               torch.softmax(eve + prior.log(), -1), rtol=1e-3, atol=1e-4)
    # the same annotators again (--overwrite): all of them replaced, the prior fitted to them again
    personalize(folder, data, overwrite=True, progress=False)
    torch.testing.assert_close(Annotators.load(folder, N).log_prior, saved.log_prior, rtol=1e-9, atol=1e-12)


def personal_expected(log_q, chosen, rejected):
    """Sum_k q_k sigma(c_k - r_k), and the personal mean of each side relative to the pair's mean."""
    q = [math.exp(v) for v in log_q]
    probability = sum(w / (1 + math.exp(-(c - r))) for w, c, r in zip(q, chosen, rejected))
    half = sum(w * (c - r) / 2 for w, c, r in zip(q, chosen, rejected))
    return probability, half, -half


@pytest.mark.parametrize("layout", [".npz", ".jsonl"])
def test_score_gives_known_annotators_their_personal_columns(mixture, tokenizer, tmp_path, layout):
    folder, model = mixture
    pairs = make_pairs(seed=4)
    personalize(folder, write_labels(tmp_path / "train.jsonl", pairs, [7, 8, 9] * 5), progress=False)
    saved = Annotators.load(folder, N)
    test_ids = [8, 7, 1000] * 5  # 1000: an annotator the model does not know
    data = write_labels(tmp_path / "test.jsonl", pairs, test_ids)
    summary = score_to_file(folder, data, tmp_path / f"s{layout}", progress=False)
    assert any("5 of 15 rows are of annotators" in note for note in summary.notes)
    (line,) = [note for note in summary.notes if note.startswith("personal accuracy")]
    scores = load_scores(tmp_path / f"s{layout}")
    probability = scores.personal["personal_probability"]
    reward = scores.personal["personal_reward"]
    assert scores.metadata["personal_reference"] == "the pair's mean, kind by kind"
    chosen, rejected = outputs_alone(model, tokenizer, pairs)
    for p, annotator in enumerate(test_ids):
        if annotator == 1000:
            assert math.isnan(probability[p]) and np.isnan(reward[p]).all()
            assert np.isnan(scores.personal["personal_posterior"][p]).all()
            continue
        log_q = saved.log_posteriors[saved.ids.index(annotator)].tolist()
        expected = personal_expected(log_q, chosen[p].tolist(), rejected[p].tolist())
        np.testing.assert_allclose([probability[p], *reward[p]], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(scores.personal["personal_posterior"][p], np.exp(log_q), rtol=1e-5, atol=1e-7)
    known = [p for p, annotator in enumerate(test_ids) if annotator != 1000]
    personal = np.mean([probability[p] > 0.5 for p in known])
    population = np.mean([torch.sigmoid(chosen[p] - rejected[p]).mean() > 0.5 for p in known])
    assert line == (f"personal accuracy (P_a(chosen ≻ rejected) > 1/2) on the 10 rows whose annotator has a "
                    "posterior (the model's, or from --context): "
                    f"{personal:.4f}; the population's on the same rows: {population:.4f}")


def test_a_new_person_from_context_and_every_row_as_one_annotator(mixture, tokenizer, tmp_path):
    folder, model = mixture
    pairs = make_pairs(seed=5)
    context = write_labels(tmp_path / "eve.jsonl", pairs[:6], [None] * 6)
    data = write_labels(tmp_path / "test.jsonl", pairs, [None] * len(pairs))
    with pytest.raises(MinqrError, match="names no annotators"):
        score_to_file(folder, data, tmp_path / "x.npz", context=str(context), progress=False)
    score_to_file(folder, data, tmp_path / "s.npz", context=str(context), annotator="eve", anchor_reply=" OK.",
                  progress=False)
    scores = load_scores(tmp_path / "s.npz")
    # whose rows these are, in the metadata and the default row label of the analysis
    assert (scores.metadata["annotator"], scores.metadata["context"]) == ("eve", str(context))
    assert scores.workload.endswith(" (as eve, context eve.jsonl)")
    chosen, rejected = outputs_alone(model, tokenizer, pairs)
    log_q = loop_log_posteriors(chosen[:6], rejected[:6], torch.zeros(6, dtype=torch.long), 1)[0]
    q = log_q.exp().numpy()
    np.testing.assert_allclose(scores.personal["personal_posterior"], np.tile(q, (len(pairs), 1)), rtol=1e-4,
                               atol=1e-5)
    # relative to the anchor reply: sum_k q_k (h_k(y) - h_k(anchor))
    assert scores.metadata["personal_reference"] == "the anchor reply"
    anchor = scores.anchor.astype(np.float64)
    np.testing.assert_allclose(scores.personal["personal_reward"][:, 0], (chosen.numpy() - anchor) @ q, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(scores.personal["personal_reward"][:, 1], (rejected.numpy() - anchor) @ q, rtol=1e-4,
                               atol=1e-4)
    # eve is not saved with the model: --context is for this scoring
    assert Annotators.load(folder) is None
    with pytest.raises(MinqrError, match="annotator 'eve' is not known to"):
        score_to_file(folder, data, tmp_path / "y.npz", annotator="eve", progress=False)


def test_heads_without_kinds(tmp_path, tokenizer):
    pairs = make_pairs(seed=6)
    data = write_labels(tmp_path / "test.jsonl", pairs, ["a", "b", "c"] * 5)
    for kind, n, objective in (("scalar", 1, None), ("quantile", 4, "paper"), ("quantile", 4, "independent")):
        model = random_reward_model(kind, n, seed=1)
        if objective is not None:
            model.head_config = HeadConfig.make("quantile", n, objective)
        folder = tmp_path / f"{kind}-{objective}"
        model.save_pretrained(folder, tokenizer=tokenizer, training_args={"max_length": MAX_LENGTH})
        with pytest.raises(MinqrError, match="personal rewards need a mixture head"):
            personalize(folder, data, progress=False)
        with pytest.raises(MinqrError, match="personal rewards need a mixture head"):
            score_to_file(folder, data, tmp_path / "x.npz", annotator="a", progress=False)
        # ids in the data but nothing asked: the scores, and a note why there are no personal columns
        summary = score_to_file(folder, data, folder.with_suffix(".npz"), progress=False)
        assert any("no personal probabilities" in note for note in summary.notes)
        assert load_scores(folder.with_suffix(".npz")).personal == {}
        assert not (folder / ANNOTATORS_FILE).exists()


def test_labels_no_kind_can_give_are_refused_before_anything_is_saved(mixture, tmp_path):
    """Margins far beyond the rewards' scale make an annotator's likelihood 0 under some kind: no
    posterior exists, so nothing is saved (annotators.json held NaN, which then failed every score)."""
    folder, _ = mixture
    pairs = make_pairs(seed=9)[:6]
    data = write_labels(tmp_path / "labels.jsonl", pairs, ["ok"] * 3 + ["z1"] * 3, margins=[0.0] * 3 + [1e308] * 3)
    with pytest.raises(MinqrError) as refused:
        personalize(folder, data, progress=False)
    assert str(refused.value) == ("the labels of annotator 'z1' are impossible under some kind of the model (a "
                                  "log-likelihood that is infinite or not a number): a model output that is not "
                                  "finite on one of their texts, or a pair's margin far beyond the rewards' scale, "
                                  "does that; check the margins of their pairs")
    assert not (folder / ANNOTATORS_FILE).exists()
    with pytest.raises(MinqrError, match="^the labels of annotator 'z1' are impossible"):
        score_to_file(folder, data, tmp_path / "s.npz", context=str(data), progress=False)


def test_cli(mixture, tmp_path):
    folder, _ = mixture
    data = write_labels(tmp_path / "labels.jsonl", make_pairs(seed=7), [1, 2, 3] * 5)
    runner = CliRunner()
    result = runner.invoke(main, ["personalize", "--model", str(folder), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "posteriors of 3 new and 0 known annotators" in result.output
    result = runner.invoke(main, ["personalize", "--model", str(folder), "--data", str(data)])
    assert result.exit_code == 1 and "Error:" in result.output and "--overwrite" in result.output
    result = runner.invoke(main, ["score", "--model", str(folder), "--data", str(data), "--out",
                                  str(tmp_path / "s.npz"), "--annotator", "2"])  # the command line's "2" is id 2
    assert result.exit_code == 0, result.output
    assert not np.isnan(load_scores(tmp_path / "s.npz").personal["personal_probability"]).any()
    # so is personalize's: "2" for pairs without ids is the known 2, replaced with --overwrite only, never a new "2"
    unnamed = write_labels(tmp_path / "unnamed.jsonl", make_pairs(seed=8)[:4], [None] * 4)
    before = Annotators.load(folder, N)
    result = runner.invoke(main, ["personalize", "--model", str(folder), "--data", str(unnamed), "--annotator", "2"])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {folder} already holds the posteriors of 1 "
                                                              "annotator of ") and "(the first: 2)" in result.output
    result = runner.invoke(main, ["personalize", "--model", str(folder), "--data", str(unnamed), "--annotator", "2",
                                  "--overwrite"])
    assert result.exit_code == 0 and "posteriors of 0 new and 1 known annotators; the model knows 3" in result.output
    after = Annotators.load(folder, N)
    assert sorted(after.ids) == [1, 2, 3] and after.pairs[after.ids.index(2)] == 4
    assert not torch.equal(after.log_posteriors[after.ids.index(2)], before.log_posteriors[before.ids.index(2)])
    result = runner.invoke(main, ["personalize", "--model", str(tmp_path / "nowhere"), "--data", str(data)])
    assert result.exit_code == 1 and "local folder" in result.output


def test_training_saves_the_posteriors_of_its_annotators(tmp_path, capsys):
    from test_train import tiny_options, write_run_inputs

    from minqr.data.pairs import read_pairs_file
    from minqr.models.reward import RewardModel
    from minqr.training.config import TrainConfig
    from minqr.training.loop import train

    inputs = write_run_inputs(tmp_path / "inputs", num_train=24)
    lines = Path(inputs["data"]).read_text().splitlines()
    labelled = tmp_path / "labelled.jsonl"  # PRISM's column name, three people
    labelled.write_text("".join(json.dumps({**json.loads(line), "user_id": f"u{k % 3}"}) + "\n"
                                for k, line in enumerate(lines)))
    out = tmp_path / "run"
    train(TrainConfig(**tiny_options(inputs, out, data=str(labelled), annotator_field="user_id", num_quantiles=4,
                                     max_steps=3, eval_every=0, save_every=0)), progress=False)
    saved = Annotators.load(out, 4)
    assert saved.ids == ("u0", "u1", "u2") and saved.pairs == (8, 8, 8)
    model, tokenizer = RewardModel.from_pretrained(out), load_tokenizer(out)
    pairs, _ = read_pairs_file(labelled, annotator_field="user_id")
    chosen = torch.tensor(np.stack([alone(model, tokenizer, p.chosen, 96) for p in pairs]))
    rejected = torch.tensor(np.stack([alone(model, tokenizer, p.rejected, 96) for p in pairs]))
    expected = loop_log_posteriors(chosen, rejected, torch.arange(len(pairs)) % 3, 3)
    torch.testing.assert_close(saved.log_posteriors, expected, rtol=1e-4, atol=1e-4)
    # and where the labels put the kinds' scale, from the same outputs (tests/test_scale.py checks the fit)
    fit = fit_scale(chosen.double() - rejected.double(), torch.arange(len(pairs)) % 3, 3)
    assert fit.describe("the training pairs") in capsys.readouterr().err
    # a run that replaces it on data without ids takes the old model's annotators with it
    train(TrainConfig(**tiny_options(inputs, out, num_quantiles=4, max_steps=3, eval_every=0, save_every=0,
                                     overwrite=True)), progress=False)
    assert Annotators.load(out) is None
    with pytest.raises(MinqrError, match="--annotator-field rater: no pair of --data has that field"):
        train(TrainConfig(**tiny_options(inputs, tmp_path / "typo", data=str(labelled), annotator_field="rater")),
              progress=False)
    # a scalar head has no kinds: no posteriors, and a note that says why
    train(TrainConfig(**tiny_options(inputs, tmp_path / "scalar", head="scalar", data=str(labelled),
                                     annotator_field="user_id", max_steps=2, eval_every=0, save_every=0)),
          progress=False)
    assert Annotators.load(tmp_path / "scalar") is None
    assert "names 3 annotators, but no posteriors are saved" in capsys.readouterr().err


def test_scores_files_check_their_personal_arrays(tmp_path):
    from minqr.study.scores_file import save_scores

    chosen, rejected = np.zeros((3, 2), np.float32), np.ones((3, 2), np.float32)
    metadata = {"model": "m", "head": "quantile", "data": "d", "split": "test", "workload": "w",
                "taus": [0.25, 0.75], "readout": "sorted"}
    good = {"personal_posterior": np.array([[0.5, 0.5], [np.nan, np.nan], [1.0, 0.0]], np.float32),
            "personal_probability": np.array([0.3, np.nan, 0.2], np.float32),
            "personal_reward": np.array([[1, -1], [np.nan, np.nan], [0.5, -0.5]], np.float32)}
    for layout in (".npz", ".jsonl"):
        save_scores(tmp_path / f"s{layout}", chosen, rejected, metadata, personal=good)
        back = load_scores(tmp_path / f"s{layout}").personal
        for name, array in good.items():
            np.testing.assert_array_equal(back[name], array)
    bad_rows = {**good, "personal_posterior": np.array([[0.5, 0.6], [np.nan, np.nan], [1, 0]], np.float32)}
    for personal, words in ((bad_rows, "a posterior that sums to 1"),
                            ({**good, "personal_reward": np.zeros((3, 3), np.float32)}, r"float \[3, 2\]"),
                            ({"personal_probability": good["personal_probability"]}, "give all of"),
                            ({**good, "personal_reward": np.array([[1, np.inf], [np.nan, np.nan], [0.5, -0.5]],
                                                                  np.float32)}, "finite rewards")):
        with pytest.raises(MinqrError, match=words):
            save_scores(tmp_path / "bad.npz", chosen, rejected, metadata, personal=personal)
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"personal_probability": null', '"personal_probability": "high"')
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(MinqrError, match=f"{tmp_path / 'bad.jsonl'}:3: 'personal_probability' must be a number"):
        load_scores(tmp_path / "bad.jsonl")


def test_rows_of_annotators_a_model_does_not_know(mixture, tmp_path):
    folder, _ = mixture  # no annotators.json
    data = write_labels(tmp_path / "test.jsonl", make_pairs(seed=8), ["p", "q", "r"] * 5)
    summary = score_to_file(folder, data, tmp_path / "s.npz", progress=False)
    assert any("15 of 15 rows are of annotators" in note for note in summary.notes)
    personal = load_scores(tmp_path / "s.npz").personal
    assert all(np.isnan(array).all() for array in personal.values()) and len(personal) == 3
