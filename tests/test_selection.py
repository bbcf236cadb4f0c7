"""Best-of-N choices against the truth: the captured share is 1 for the oracle's own picks, 0 in
expectation for random picks, and the measures read the picked candidates."""
import numpy as np
import pytest

from minqr.synthetic.candidates import candidate_truth, sample_candidate_sets
from minqr.synthetic.task import TASK_VARIANTS
from minqr.study.selection import atom_records, compare, picked, spread_auroc, true_values

STATISTICS = ["mean", "cvar:0.25", "preference"]


def records_of(picks: dict, spread=None):
    Q = len(next(iter(picks.values())))
    return [{"chosen": {s: int(p[q]) for s, p in picks.items()},
             # mean - mean_minus_std:1 is the spread that spread_auroc reads
             "statistics": {} if spread is None else {"mean": np.ones_like(spread[q]),
                                                      "mean_minus_std:1": 1 - spread[q]}}
            for q in range(Q)]


@pytest.mark.parametrize("reference", ["reply", "group"])
def test_oracle_and_random_picks_capture_all_and_nothing(reference):
    task = TASK_VARIANTS["shifted"]
    rng = np.random.default_rng(0)
    truth = candidate_truth(task, sample_candidate_sets(task, rng, 400, 6)["counts"])
    oracle = {s: true_values(truth, s, reference).argmax(1) for s in STATISTICS}
    rows = compare(truth, records_of(oracle), STATISTICS, reference)
    for s in STATISTICS:
        assert rows[s]["captured"] == 1.0
        model = rows[s]["model"]
        q = np.arange(400)
        assert model["share_harmed"] == truth["share_harmed"][q, oracle[s]].mean()
        assert model["worst_group"] == truth["group_means"][q, oracle[s]].min(-1).mean()
    # uniformly random picks: the captured share is 0 up to sampling (a few hundredths at Q = 400)
    shares = [compare(truth, records_of({s: rng.integers(0, 6, 400) for s in STATISTICS}), STATISTICS, reference)
              for _ in range(20)]
    for s in STATISTICS:
        assert abs(np.mean([r[s]["captured"] for r in shares])) < 0.03
    # the group's average is the same for all of a prompt's candidates: the mean picks as well (the
    # same candidate but for ties: two replies of the same tags in another order)
    mean = true_values(truth, "mean")
    np.testing.assert_allclose(picked(mean, true_values(truth, "mean", "group").argmax(1)), mean.max(1), atol=1e-9)
    # the mean's own picks gain nothing beyond the mean
    assert rows["mean"]["beyond_mean"] is None or rows["mean"]["beyond_mean"] == 1.0
    # candidates all alike in the truth (one prompt, the same reply twice): no gain to capture
    alike = {name: values[:1, [0, 0]] for name, values in truth.items() if getattr(values, "ndim", 0) >= 2}
    same = compare({**truth, **alike}, records_of({s: np.array([1]) for s in STATISTICS}), STATISTICS, reference)
    assert all(same[s]["captured"] is None and same[s]["beyond_mean"] is None for s in STATISTICS)


def test_spread_auroc_reads_the_std_from_the_statistics():
    task = TASK_VARIANTS["demo"]
    truth = candidate_truth(task, sample_candidate_sets(task, np.random.default_rng(1), 50, 4)["counts"])
    gap = truth["group_means"].max(-1) - truth["group_means"].min(-1)  # [Q, K]
    picks = {"mean": np.zeros(50, dtype=int)}
    perfect = spread_auroc(truth, records_of(picks, spread=gap))  # the true gap separates perfectly ...
    assert perfect["candidates"] == perfect["mean's pick"] == 1.0
    assert spread_auroc(truth, records_of(picks, spread=-gap))["candidates"] == 0.0  # ... and backwards
    assert perfect["shares"]["candidates"] == np.mean(gap > 1)
    favourites = truth["group_means"].argmax(1)  # [Q, G]
    differ = favourites[:, 0] != favourites[:, 1]
    # a prompt's score is its largest spread: make it say exactly whether the favourites differ
    flags = np.where(differ[:, None], np.arange(4) + 10.0, np.arange(4))
    assert spread_auroc(truth, records_of(picks, spread=flags))["favourites"] == 1.0
    assert spread_auroc(truth, records_of(picks)) is None


@pytest.mark.parametrize("reference", ["reply", "group"])
def test_the_truth_in_atoms(reference):
    """One atom is the median, whatever the statistic; many atoms pick as the oracle does."""
    task = TASK_VARIANTS["demo"]
    truth = candidate_truth(task, sample_candidate_sets(task, np.random.default_rng(2), 100, 5)["counts"])
    one = atom_records(truth, ["cvar:0.25", "mean_minus_std:1"], 1, reference)
    median = true_values(truth, "quantile:0.5", reference)
    for statistic in ("cvar:0.25", "mean_minus_std:1"):
        picks = np.array([r["chosen"][statistic] for r in one])
        np.testing.assert_allclose(picked(median, picks), median.max(1), atol=1e-9)
    many = compare(truth, atom_records(truth, STATISTICS, 100, reference), STATISTICS, reference)
    for statistic in STATISTICS:
        assert many[statistic]["captured"] > 0.999
