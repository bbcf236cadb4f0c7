"""minqr.distribution.personal against float64 posteriors written out here with Python floats,
annotator by annotator and pair by pair; the batched pass against that loop; the prior over the
kinds against EM written out the same way and against shares it must recover; the saved file's
round trip; the heads that have no kinds refused."""
import json
import math
import time

import numpy as np
import pytest
import torch

from minqr.atomic import MARKER, atomic_dir, check_replaceable
from minqr.distribution.personal import (ANNOTATORS_FILE, PRIOR_ANNOTATORS_A_KIND, PRIOR_FLOOR, PRIOR_ITERATIONS,
                                         Annotators, annotators_from_pairs, check_personal, log_likelihood_sums,
                                         normalised, personal_preference, population_prior)
from minqr.errors import MinqrError


def log_posteriors(chosen, rejected, annotator, num_annotators, margin=None):
    """The library's posteriors under a uniform prior: its likelihood sums, normalised per annotator."""
    return normalised(log_likelihood_sums(chosen, rejected, annotator, num_annotators, margin))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def loop_log_posteriors(chosen, rejected, annotator, num_annotators, margin=None):
    """log q_a(k) by the definition: for each annotator, for each kind, the sum over their pairs of
    log sigma(h_k(c) - h_k(r) - m), then minus the log of the sum over kinds of its exponential."""
    c, r, ids = chosen.double().tolist(), rejected.double().tolist(), annotator.tolist()
    m = [0.0] * len(ids) if margin is None else margin.double().tolist()
    n = len(c[0])
    result = []
    for a in range(num_annotators):
        sums = [sum(log_sigmoid(c[j][k] - r[j][k] - m[j]) for j in range(len(ids)) if ids[j] == a)
                for k in range(n)]
        top = max(sums)
        total = top + math.log(sum(math.exp(s - top) for s in sums))
        result.append([s - total for s in sums])
    return torch.tensor(result, dtype=torch.float64)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


@pytest.mark.parametrize("n", [2, 5, 20])
@pytest.mark.parametrize("with_margin", [False, True])
def test_posteriors_against_the_loop(n, with_margin, generator):
    p, a = 60, 7  # annotator 6 labels nothing: the uniform posterior
    chosen = torch.randn(p, n, generator=generator) * 3
    rejected = torch.randn(p, n, generator=generator) * 3
    annotator = torch.randint(0, a - 1, (p,), generator=generator)
    margin = torch.rand(p, generator=generator) if with_margin else None
    got = log_posteriors(chosen, rejected, annotator, a, margin)
    assert got.shape == (a, n) and got.dtype == torch.float64
    torch.testing.assert_close(got, loop_log_posteriors(chosen, rejected, annotator, a, margin),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[a - 1], torch.full((n,), -math.log(n), dtype=torch.float64))


def test_posterior_finds_the_kind_that_gave_the_labels(generator):
    # 4 kinds that disagree; an annotator of kind 2 labels 40 pairs by that kind's rewards
    chosen, rejected = torch.randn(40, 4, generator=generator) * 2, torch.randn(40, 4, generator=generator) * 2
    flip = torch.rand(40, generator=generator) > torch.sigmoid(chosen[:, 2] - rejected[:, 2])
    chosen[flip], rejected[flip] = rejected[flip].clone(), chosen[flip].clone()
    q = log_posteriors(chosen, rejected, torch.zeros(40, dtype=torch.long), 1).exp()[0]
    assert int(q.argmax()) == 2


def test_personal_preference_against_the_loop(generator):
    b, n = 9, 6
    chosen, rejected = torch.randn(b, n, generator=generator), torch.randn(b, n, generator=generator)
    log_q = torch.log_softmax(torch.randn(b, n, generator=generator, dtype=torch.float64) * 2, -1)
    expected = [sum(math.exp(log_q[i, k].item()) / (1 + math.exp(-(chosen[i, k].item() - rejected[i, k].item())))
                    for k in range(n)) for i in range(b)]
    torch.testing.assert_close(personal_preference(chosen, rejected, log_q),
                               torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_a_thousand_annotators_in_one_pass(generator, capsys):
    """1,000 annotators x 100 pairs each: the batched pass equals the loop on a sample of them, and
    its time is printed (pytest -s)."""
    a, k, n = 1000, 100, 20
    annotator = torch.arange(a).repeat_interleave(k)[torch.randperm(a * k, generator=generator)]  # [A*K] shuffled
    chosen, rejected = torch.randn(a * k, n, generator=generator), torch.randn(a * k, n, generator=generator)
    start = time.perf_counter()
    got = log_posteriors(chosen, rejected, annotator, a)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nposteriors of {a:,} annotators x {k} pairs, N = {n}: {seconds * 1000:.1f} ms")
    sample = [0, 17, 999]
    rows = torch.isin(annotator, torch.tensor(sample))
    index = torch.tensor([sample.index(i) for i in annotator[rows].tolist()])
    torch.testing.assert_close(got[sample], loop_log_posteriors(chosen[rows], rejected[rows], index, len(sample)),
                               rtol=1e-10, atol=1e-10)
    assert seconds < 5.0  # a loop in Python per annotator and pair takes minutes


def loop_prior(sums, steps, floor=0.0, tolerance=0.0):
    """EM for the kinds' shares, written out: steps of pi_k <- (1/A) sum_a pi_k L_ak / sum_j pi_j L_aj,
    in Python floats from the log-likelihood sums [A, N] (each row shifted by its max: L_ak <= 1);
    with `floor`, no share below it (the others scaled down to make room); stopped early once no
    log-share moves by `tolerance`."""
    rows = sums.tolist()
    n = len(rows[0])
    pi = [1.0 / n] * n
    for _ in range(steps):
        new = [0.0] * n
        for row in rows:
            top = max(row)
            weights = [pi[k] * math.exp(row[k] - top) for k in range(n)]
            total = sum(weights)
            for k in range(n):
                new[k] += weights[k] / total / len(rows)
        new = [max(p, floor) for p in new]
        new = [p / sum(new) for p in new]
        settled = tolerance > 0 and max(abs(math.log(a) - math.log(b)) for a, b in zip(new, pi)) < tolerance
        pi = new
        if settled:
            break
    return pi


def draws_of_kinds(shares, labels, n, generator):
    """Annotators drawn with `shares` over n kinds, each labelling `labels` pairs by their kind's
    rewards: the log-likelihood sums [A, N] of their labels, and each annotator's kind."""
    a = sum(shares)
    kinds = torch.repeat_interleave(torch.arange(n), torch.tensor(shares))  # [A]
    chosen = torch.randn(a * labels, n, generator=generator) * 2
    rejected = torch.randn(a * labels, n, generator=generator) * 2
    annotator = torch.arange(a).repeat_interleave(labels)
    mine = kinds[annotator]
    by_kind = chosen.gather(1, mine[:, None])[:, 0] - rejected.gather(1, mine[:, None])[:, 0]
    flip = torch.rand(a * labels, generator=generator) > torch.sigmoid(by_kind)
    chosen[flip], rejected[flip] = rejected[flip].clone(), chosen[flip].clone()
    return log_likelihood_sums(chosen, rejected, annotator, a), kinds


def test_prior_against_em_written_out(generator):
    n = 4
    sums = log_likelihood_sums(torch.randn(300, n, generator=generator) * 2, torch.randn(300, n, generator=generator),
                               torch.randint(0, n * PRIOR_ANNOTATORS_A_KIND, (300,), generator=generator),
                               n * PRIOR_ANNOTATORS_A_KIND)
    got = population_prior(sums).exp()
    expected = loop_prior(sums, PRIOR_ITERATIONS, PRIOR_FLOOR, tolerance=1e-9)  # the same steps, one by one
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-8, atol=1e-12)
    # near a fixed point: the shares are the mean posterior under them (a share on its way to the
    # floor gets there slowly: within 1e-4), and no other shares explain the labels better
    q = torch.softmax(sums + got.log(), -1)
    torch.testing.assert_close(q.mean(0), got, rtol=1e-4, atol=1e-4)

    def marginal(pi):
        return float(torch.logsumexp(sums + pi.log(), -1).sum())

    for other in (torch.full((n,), 1.0 / n, dtype=torch.float64),
                  torch.softmax(torch.randn(n, generator=generator, dtype=torch.float64), 0)):
        assert marginal(got) >= marginal(other) - 1e-9


def test_prior_recovers_the_shares_of_the_kinds(generator):
    """Annotators of 3 kinds of 5 (shares 60%, 30%, 10%, none, none), 30 labels each: the fitted
    prior finds the shares, the empty kinds fall to the floor, and a new person's 3 labels are read
    more often right from it than from the uniform prior."""
    n, shares = 5, [120, 60, 20, 0, 0]
    sums, kinds = draws_of_kinds(shares, 30, n, generator)
    prior = population_prior(sums).exp()
    torch.testing.assert_close(prior[:3], torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.04, rtol=0)
    assert float(prior[3:].max()) < 0.01 and float(prior.min()) >= PRIOR_FLOOR * 0.999
    new, new_kinds = draws_of_kinds([300, 150, 50, 0, 0], 3, n, generator)
    right = [float((torch.softmax(new + log_prior, -1).argmax(-1) == new_kinds).double().mean())
             for log_prior in (torch.zeros(n, dtype=torch.float64), prior.log())]
    assert right[1] > right[0]
    # without fit_prior (people scored from --context) the prior stays uniform, however many they are
    unfitted = Annotators.from_sums(tuple(range(len(kinds))), sums, (30,) * len(kinds), fit_prior=False)
    assert unfitted.log_prior is None
    torch.testing.assert_close(unfitted.log_posteriors, torch.log_softmax(sums, -1), rtol=1e-12, atol=1e-12)


def test_an_annotator_no_kind_can_explain_is_left_out_of_the_prior_and_has_no_posterior(generator):
    sums, _ = draws_of_kinds([30, 20, 10], 4, 3, generator)
    broken = torch.cat([sums, torch.full((1, 3), float("-inf"), dtype=torch.float64)])  # a non-finite output's labels
    torch.testing.assert_close(population_prior(broken), population_prior(sums), rtol=0, atol=0)
    for row in ([float("-inf"), 0.0, 0.0], [float("nan"), 0.0, 0.0]):  # impossible under one kind: no posterior either
        broken[60] = torch.tensor(row, dtype=torch.float64)
        with pytest.raises(MinqrError, match="^the labels of annotator 60 are impossible under some kind"):
            Annotators.from_sums(tuple(range(61)), broken, (4,) * 61)


def test_too_few_annotators_keep_the_uniform_prior(generator):
    n = 3
    few = n * PRIOR_ANNOTATORS_A_KIND - 1
    chosen, rejected = torch.randn(4 * few, n, generator=generator), torch.randn(4 * few, n, generator=generator)
    annotator = torch.arange(few).repeat(4)
    assert population_prior(log_likelihood_sums(chosen, rejected, annotator, few)) is None
    uniform = annotators_from_pairs(chosen, rejected, annotator, tuple(range(few)))
    assert uniform.log_prior is None
    assert uniform.describe_prior() == ("the prior over the 3 kinds is uniform (a prior is fitted to at least 30 "
                                        "annotators, 10 a kind)")
    assert torch.equal(uniform.log_posteriors, log_posteriors(chosen, rejected, annotator, few))
    # a given prior is used as it is: the posteriors are q_a(k) ∝ π_k Π_j σ(...), written out
    log_prior = torch.log_softmax(torch.randn(n, generator=generator, dtype=torch.float64), 0)
    given = annotators_from_pairs(chosen, rejected, annotator, tuple(range(few)), log_prior=log_prior)
    expected = torch.log_softmax(loop_log_posteriors(chosen, rejected, annotator, few) + log_prior, -1)
    torch.testing.assert_close(given.log_posteriors, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(given.log_prior, log_prior)


def test_the_prior_is_saved_and_kept_by_merging(tmp_path, generator):
    sums, _ = draws_of_kinds([20, 10, 0], 5, 3, generator)
    annotators = Annotators.from_sums(tuple(range(30)), sums, (5,) * 30)
    assert annotators.log_prior is not None
    annotators.save(tmp_path)
    loaded = Annotators.load(tmp_path, num_kinds=3)
    assert torch.equal(loaded.log_prior, annotators.log_prior)
    prior = [math.exp(v) for v in annotators.log_prior.tolist()]
    spread = math.exp(-sum(p * math.log(p) for p in prior))
    assert loaded.describe_prior() == (f"the prior over the 3 kinds, fitted to the annotators: as spread as "
                                       f"{spread:.1f} equal kinds, the largest share {max(prior):.3f}; new people's "
                                       "labels start from it (docs/personal.md)")
    assert 1.5 < spread < 2.5  # two kinds of three gave the labels
    other = Annotators(("x",), torch.log_softmax(torch.randn(1, 3, generator=generator, dtype=torch.float64), -1), (2,))
    assert torch.equal(loaded.merged(other).log_prior, annotators.log_prior)
    assert other.merged(loaded).log_prior is None  # "x" stays, whose posterior is from the uniform prior
    everyone = Annotators(loaded.ids, loaded.log_posteriors, loaded.pairs)  # uniform prior, all replaced below
    assert torch.equal(everyone.merged(loaded).log_prior, annotators.log_prior)
    text = json.loads((tmp_path / ANNOTATORS_FILE).read_text())
    for bad in ([0.0, 0.0, 0.0], [float("nan")] * 3, [-1.0986]):
        (tmp_path / ANNOTATORS_FILE).write_text(json.dumps({**text, "log_prior": bad}))
        with pytest.raises(MinqrError, match="log_prior|not an annotators file"):
            Annotators.load(tmp_path)
    del text["log_prior"]
    (tmp_path / ANNOTATORS_FILE).write_text(json.dumps(text))
    assert Annotators.load(tmp_path).log_prior is None  # a uniform prior


def test_save_and_load_round_trip(tmp_path, generator):
    ids = ["alice", 7, "bob", 0]
    chosen, rejected = torch.randn(10, 3, generator=generator), torch.randn(10, 3, generator=generator)
    annotators = annotators_from_pairs(chosen, rejected, torch.arange(10) % 4, tuple(ids))
    assert annotators.ids == tuple(ids) and annotators.pairs == (3, 3, 2, 2)
    annotators.save(tmp_path)
    loaded = Annotators.load(tmp_path, num_kinds=3)
    assert loaded.ids == annotators.ids and loaded.pairs == annotators.pairs
    assert torch.equal(loaded.log_posteriors, annotators.log_posteriors)  # exactly: JSON keeps a float64
    assert loaded.index(["bob", 7, "7", None, "carol"]).tolist() == [2, 1, -1, -1, -1]
    # a command line's "7" is the id 7; what only looks numeric to str.isdigit() is no id, and no crash
    assert [loaded.resolve(name) for name in ("7", " 7 ", "bob", "--7", "²", "-0", "carol")] == [7, 7, "bob", None,
                                                                                                None, 0, None]
    with pytest.raises(MinqrError, match=r"annotator \['u1'\]: an annotator's id is a string or an integer"):
        loaded.resolve(["u1"])
    assert Annotators.load(tmp_path / "nothing") is None  # a model without the file loads as before
    with pytest.raises(MinqrError, match="3 kinds but the model has 5"):
        Annotators.load(tmp_path, num_kinds=5)
    # an id twice in the file: named with the file (a message without either before)
    path = tmp_path / "annotators.json"
    data = json.loads(path.read_text())
    data["annotators"][2]["id"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(MinqrError) as caught:
        Annotators.load(tmp_path)
    assert str(caught.value) == f"{path}: the annotator 7 is given twice; fix or delete it"
    # a blank id (no data reader gives one), a number too large for a float: each named with the file
    for field, value, words in [("id", " ", f"{path}: format 1 or its ids (strings that are not blank, or integers) "
                                             "are not what this minqr writes (format 1); fix or delete it"),
                                ("log_posterior", "1" + "0" * 400, f"{path}: not an annotators file minqr wrote (")]:
        row = json.dumps({**data["annotators"][0], field: "FIELD"})
        row = row.replace('"FIELD"', json.dumps(value) if field == "id" else f"[{value}, 0, 0]")
        path.write_text(json.dumps({**data, "annotators": ["ROW"]}).replace('"ROW"', row))
        with pytest.raises(MinqrError) as caught:
            Annotators.load(tmp_path)
        assert str(caught.value).startswith(words), field


def test_merged_replaces_the_same_ids(generator):
    one = Annotators(("a", "b"), torch.log_softmax(torch.randn(2, 3, generator=generator, dtype=torch.float64), -1),
                     (4, 5))
    two = Annotators(("b", 3), torch.log_softmax(torch.randn(2, 3, generator=generator, dtype=torch.float64), -1),
                     (1, 2))
    both = one.merged(two)
    assert both.ids == ("a", "b", 3) and both.pairs == (4, 1, 2)
    assert torch.equal(both.log_posteriors, torch.cat([one.log_posteriors[:1], two.log_posteriors]))


def test_saving_into_a_folder_minqr_made_keeps_it_replaceable(tmp_path):
    folder = tmp_path / "model"
    with atomic_dir(folder, overwrite=True, kind="a test folder") as staged:
        (staged / "config.json").write_text("{}")
    Annotators(("a",), torch.zeros(1, 1, dtype=torch.float64), (1,)).save(folder)
    assert ANNOTATORS_FILE in json.loads((folder / MARKER).read_text())["contents"]
    check_replaceable(folder, overwrite=True, kind="a test folder")  # no MinqrError: minqr wrote everything there


def test_bad_files_are_refused(tmp_path):
    path = tmp_path / ANNOTATORS_FILE
    for text in ("not json", '{"annotators": []}', '{"format": 1, "num_kinds": 2, "annotators": [{"id": 1.5, '
                 '"pairs": 1, "log_posterior": [-0.6931471805599453, -0.6931471805599453]}]}',
                 '{"format": 1, "num_kinds": 2, "annotators": [{"id": "a", "pairs": 1, "log_posterior": [0, 0]}]}',
                 '{"format": 1, "num_kinds": 2, "annotators": [{"id": "a", "pairs": 1, "log_posterior": [0]}]}',
                 '{"format": 1, "num_kinds": true, "annotators": [{"id": "a", "pairs": 1, "log_posterior": [0]}]}',
                 '{"format": 1, "num_kinds": 1, "annotators": [{"id": "a", "pairs": "lots", "log_posterior": [0]}]}',
                 '{"format": 1, "num_kinds": 1, "annotators": [{"id": "a", "pairs": -5, "log_posterior": [0]}]}'):
        path.write_text(text)
        with pytest.raises(MinqrError, match=ANNOTATORS_FILE):
            Annotators.load(tmp_path)


def test_heads_without_kinds_are_refused():
    check_personal("mixture", 4)
    for objective, why in (("bradley_terry", "one kind"), ("independent", "not kinds"), ("paper", "not kinds")):
        with pytest.raises(MinqrError, match=why):
            check_personal(objective, 1 if objective == "bradley_terry" else 8)
    with pytest.raises(MinqrError, match="N > 1"):
        check_personal("mixture", 1)


def test_bad_arguments(generator):
    h = torch.randn(4, 3, generator=generator)
    with pytest.raises(MinqrError, match="same shape"):
        log_posteriors(h, h[:, :2], torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(MinqrError, match="integer tensor"):
        log_posteriors(h, h, torch.zeros(4), 1)
    with pytest.raises(MinqrError, match=r"in 0\.\.1"):
        log_posteriors(h, h, torch.tensor([0, 1, 2, 0]), 2)


def test_personal_preference_is_a_probability_in_float32():
    """Float32 posteriors sum to 1 only within rounding; a sure preference must still read at most 1
    (scores files refuse more)."""
    rng = np.random.default_rng(0)
    n = 20
    log_q = torch.log_softmax(torch.tensor(rng.normal(0, 3, (500, n))), -1).float()
    chosen = torch.full((500, n), 40.0)
    rejected = torch.full((500, n), -40.0)
    p = personal_preference(chosen, rejected, log_q)
    assert bool((p <= 1).all()) and bool((p >= 0).all())
