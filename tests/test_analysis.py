"""The measures of minqr.study (analysis, divergences, bootstrap, accuracy, coverage) and the
synthetic truth's readers against scipy, brute force, or the formula written out."""
import math

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import binomtest, entropy, gaussian_kde, spearmanr, wasserstein_distance

from minqr.errors import MinqrError
from minqr.ranking import negative_log_likelihood
from minqr.study import accuracy as R, analysis as A, bootstrap as B, coverage as C, divergences as D, tables as T
from minqr.study.scores_file import FORMAT, Scores
from minqr.synthetic.probe import linear_probe
from minqr.synthetic.truth import load_truth, response_truth

SIZES = [(1, 1), (1, 5), (7, 3), (200, 300), (2000, 1500)]


def scores_of(chosen, rejected, head="quantile", **extra) -> Scores:
    n = chosen.shape[1]
    taus = ((2 * np.arange(n) + 1) / (2 * n)).tolist() if head == "quantile" else None
    return Scores(chosen, rejected, {"format": FORMAT, "model": "m", "head": head, "data": "d", "split": "test",
                                     "workload": "w", "num_quantiles": n, "minqr_version": "0", "taus": taus,
                                     **extra})


def quantile_outputs(num_pairs, n, seed=0, shift=0.7):
    """Outputs of a made-up quantile model: a centre and a spread per response, sorted quantiles."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(2, num_pairs, 1)) + np.array([shift, 0.0])[:, None, None]
    spread = rng.gamma(2.0, 0.4, size=(2, num_pairs, 1))
    return centre + spread * np.sort(rng.normal(size=(2, num_pairs, n)), axis=-1)  # [2, P, N]


# --- divergences --------------------------------------------------------------------------------

def reference_histograms(p, q, bins, eps):
    """The paper's construction, written out: pooled-range edges, counts + eps (not normalised)."""
    low, high = min(p.min(), q.min()), max(p.max(), q.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    return np.histogram(p, edges)[0] + eps, np.histogram(q, edges)[0] + eps


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("bins, eps", [(1, 1e-10), (7, 1e-10), (50, 1e-10), (50, 0.5), (200, 1e-6)])
def test_histogram_kl_and_js_against_scipy(sizes, bins, eps):
    rng = np.random.default_rng(hash((sizes, bins)) % 2**32)
    p, q = rng.normal(0.4, 1.0, sizes[0]), rng.standard_t(4, sizes[1])
    p_counts, q_counts = reference_histograms(p, q, bins, eps)
    assert D.histogram_kl(p, q, bins, eps) == pytest.approx(entropy(p_counts, q_counts), rel=1e-10, abs=1e-12)
    js = jensenshannon(p_counts, q_counts) ** 2  # scipy gives the distance, in nats by default
    assert D.js_divergence(p, q, bins, eps) == pytest.approx(js, rel=1e-8, abs=1e-12)
    assert 0 <= D.js_divergence(p, q, bins, eps) <= math.log(2) + 1e-12


def test_histogram_kl_edge_cases():
    x = np.random.default_rng(0).normal(size=300)
    assert D.histogram_kl(x, x) == 0.0 and D.js_divergence(x, x) == pytest.approx(0.0, abs=1e-15)
    assert D.histogram_kl([2.0, 2.0], [2.0], eps=0) == 0.0  # one value everywhere: one non-empty bin
    assert D.histogram_kl([0.0, 1.0], [1.0, 1.0], bins=2, eps=0) == math.inf  # empty Q bin under P mass
    assert D.histogram_kl([0.0, 1.0], [1.0, 1.0], bins=2, eps=0) == entropy([1, 1], [0, 2])
    # the bin edges follow the pooled range, so an increasing affine map changes nothing
    y = np.random.default_rng(1).normal(0.3, 1.2, size=400)
    assert D.histogram_kl(2.5 * x - 1, 2.5 * y - 1) == pytest.approx(D.histogram_kl(x, y), rel=1e-9)
    with pytest.raises(MinqrError, match="at least one value"):
        D.histogram_kl([], [1.0])
    with pytest.raises(MinqrError, match="bins >= 1"):
        D.histogram_kl(x, y, bins=0)


def test_kl_by_bins_is_histogram_kl_at_each_count():
    rng = np.random.default_rng(2)
    p, q = rng.normal(size=500), rng.normal(0.5, 1, size=400)
    sweep = D.histogram_kl_by_bins(p, q, (3, 30, 300), eps=1e-8)
    assert sweep.tolist() == [D.histogram_kl(p, q, b, 1e-8) for b in (3, 30, 300)]


@pytest.mark.parametrize("sizes", SIZES)
def test_wasserstein_against_scipy(sizes):
    rng = np.random.default_rng(sizes[0] * 7 + sizes[1])
    p, q = rng.normal(size=sizes[0]), rng.exponential(size=sizes[1])
    assert D.wasserstein_1(p, q) == pytest.approx(wasserstein_distance(p, q), rel=1e-10, abs=1e-12)
    ties_p, ties_q = rng.integers(0, 4, sizes[0]).astype(float), rng.integers(0, 4, sizes[1]).astype(float)
    assert D.wasserstein_1(ties_p, ties_q) == pytest.approx(wasserstein_distance(ties_p, ties_q), abs=1e-12)
    spread = np.std(np.concatenate([p, q]))
    assert D.wasserstein_1_sd(p, q) == pytest.approx(wasserstein_distance(p, q) / spread, rel=1e-10)
    assert D.wasserstein_1_sd(3 * p + 5, 3 * q + 5) == pytest.approx(D.wasserstein_1_sd(p, q), rel=1e-9)
    assert D.wasserstein_1_sd([1.0, 1.0], [1.0]) == 0.0


@pytest.mark.parametrize("sizes", [(5, 9), (300, 200)])
def test_kde_kl_against_scipy_kde(sizes):
    rng = np.random.default_rng(sizes[0])
    p, q = rng.normal(0.5, 1.0, sizes[0]), rng.normal(0.0, 1.5, sizes[1])
    kde_p, kde_q = gaussian_kde(p), gaussian_kde(q)
    reach = 4 * math.sqrt(max(kde_p.covariance[0, 0], kde_q.covariance[0, 0]))
    grid = np.linspace(min(p.min(), q.min()) - reach, max(p.max(), q.max()) + reach, 512)
    density_p, density_q = kde_p(grid), kde_q(grid)
    expected = np.trapezoid(density_p * np.log(density_p / density_q), grid)
    assert D.kde_kl(p, q) == pytest.approx(expected, rel=1e-8)


def test_kde_kl_finds_the_gaussian_kl():
    rng = np.random.default_rng(3)
    p, q = rng.normal(0.0, 1.0, 6000), rng.normal(1.0, 1.0, 6000)
    assert D.kde_kl(p, q) == pytest.approx(0.5, abs=0.06)  # KL(N(0,1) || N(1,1)) = 1/2
    with pytest.raises(D.NotMeasurable, match="the 5 chosen rewards all equal 1, and a density estimate needs"):
        D.kde_kl(np.ones(5), q)


def testweighted_kde_kl_is_the_weighted_density_written_out():
    """The bootstrap's path: rows of K values sharing a weight, many weightings in one product."""
    rng = np.random.default_rng(4)
    p_rows, q_rows = rng.normal(0.3, 1, (40, 3)), rng.normal(0, 1, (40, 3))
    weights = rng.integers(0, 3, (4, 40)).astype(float)
    got = D.weighted_kde_kl(p_rows, q_rows, weights, weights, 256)
    h_p = math.sqrt(gaussian_kde(p_rows.ravel()).covariance[0, 0])
    h_q = math.sqrt(gaussian_kde(q_rows.ravel()).covariance[0, 0])
    reach = 4 * max(h_p, h_q)
    grid = np.linspace(min(p_rows.min(), q_rows.min()) - reach, max(p_rows.max(), q_rows.max()) + reach, 256)
    for b, w in enumerate(weights):
        def density(rows, h):
            kernels = np.exp(-0.5 * ((grid[:, None, None] - rows[None]) / h) ** 2) / (h * math.sqrt(2 * math.pi))
            return (kernels * w[None, :, None]).sum(axis=(1, 2)) / (3 * w.sum())
        dp, dq = density(p_rows, h_p), density(q_rows, h_q)
        assert got[b] == pytest.approx(np.trapezoid(dp * np.log(dp / dq), grid), rel=1e-9)
    # all weights one: the plain kde_kl of the pooled values
    ones = np.ones((1, 40))
    assert D.weighted_kde_kl(p_rows, q_rows, ones, ones, 512)[0] == pytest.approx(
        D.kde_kl(p_rows.ravel(), q_rows.ravel()), rel=1e-10)


# --- bootstrap ----------------------------------------------------------------------------------

def test_bootstrap_estimate_is_the_bias_corrected_value_with_a_basic_interval():
    rng = np.random.default_rng(5)
    c, r = rng.normal(0.5, 1, 50), rng.normal(0, 1, 50)

    def statistic(c, r):
        return np.mean(c - r)

    result = B.bootstrap(statistic, c, r, n_resamples=200, seed=9, bounds=B.ANY_REAL)
    indices = np.random.default_rng(9).integers(0, 50, size=(200, 50))
    values = np.array([statistic(c[i], r[i]) for i in indices])
    low, high = np.percentile(values, [2.5, 97.5])
    point = statistic(c, r)
    assert result == pytest.approx({"value": point, "corrected": 2 * point - values.mean(), "ci_low": 2 * point - high,
                                    "ci_high": 2 * point - low, "bootstrap_mean": values.mean()})


@pytest.mark.parametrize("value, resampled, bounds, expected", [
    # JS 0.019 whose resamples sit higher still: all of it is bias; the truth lies in [0, 0.011]
    (0.019, np.linspace(0.027, 0.063, 101), B.JS_RANGE, (0.0, 0.0, 0.0101)),
    # near JS's ceiling ln 2: the interval stops there
    (0.69, np.linspace(0.66, 0.70, 101), B.JS_RANGE, (0.70, 0.681, math.log(2))),
    # the resamples all above 2·value: the clipped interval is [0, 0], still holding the corrected 0
    (0.1, np.linspace(0.3, 0.4, 101), B.NON_NEGATIVE, (0.0, 0.0, 0.0)),
    # a model whose resamples cannot vary (all rewards equal): a point
    (0.0, np.zeros(50), B.NON_NEGATIVE, (0.0, 0.0, 0.0)),
])
def test_bootstrap_estimates_stay_in_the_range_and_hold_the_corrected_value(value, resampled, bounds, expected):
    result = B.bootstrap_estimate(value, resampled, bounds=bounds)
    corrected, low, high = expected
    assert result["value"] == value and result["corrected"] == pytest.approx(min(corrected, bounds[1]), abs=1e-4)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((low, high), abs=1e-4)
    assert bounds[0] <= result["ci_low"] <= result["corrected"] <= result["ci_high"] <= bounds[1]


def test_bootstrap_estimate_without_resamples_or_with_an_infinite_value():
    none = {"corrected": None, "ci_low": None, "ci_high": None, "bootstrap_mean": None}
    assert B.bootstrap_estimate(0.3, []) == {"value": 0.3, **none}
    assert B.bootstrap_estimate(math.inf, [1.0, 2.0]) == {"value": math.inf, **none,
                                                          "no_interval": "the value itself is not finite"}
    assert B.bootstrap_estimate(0.3, [0.2, math.inf, math.nan]) == {
        "value": 0.3, **none, "no_interval": "2 of 3 resamples gave no finite value"}
    assert T.with_interval(B.bootstrap_estimate(0.3, [0.2, math.nan])) == "0.300 (no interval)"


def interval_coverage(measure, truth, bounds, shift, pairs, replicates, resamples, seed):
    """Over replicates of two Gaussians `shift` sd apart: the share of intervals that hold the truth,
    the share of percentile intervals (the resamples' own 2.5-97.5%) that do, and the mean plug-in
    and corrected values."""
    rng = np.random.default_rng(seed)
    hits, percentile_hits, plug_in, corrected = 0, 0, [], []
    for _ in range(replicates):
        c, r = rng.normal(shift, 1, pairs), rng.normal(0, 1, pairs)
        indices = rng.integers(0, pairs, size=(resamples, pairs))
        resampled = [measure(c[i], r[i]) for i in indices]
        result = B.bootstrap_estimate(measure(c, r), resampled, bounds=bounds)
        hits += result["ci_low"] <= truth <= result["ci_high"]
        percentile_hits += bool(np.percentile(resampled, 2.5) <= truth <= np.percentile(resampled, 97.5))
        plug_in.append(result["value"])
        corrected.append(result["corrected"])
    return hits / replicates, percentile_hits / replicates, np.mean(plug_in), np.mean(corrected)


def test_the_interval_covers_the_true_kl_which_the_plug_in_overshoots():
    """KL(N(0.5, 1) || N(0, 1)) = 0.125; the plug-in histogram KL of 2,000 pairs is about 0.24."""
    coverage, percentile, plug_in, corrected = interval_coverage(D.histogram_kl, 0.125, B.NON_NEGATIVE, 0.5, 2000,
                                                                 replicates=40, resamples=100, seed=15)
    assert coverage >= 0.85 and percentile <= 0.1
    assert plug_in > 0.2 and abs(corrected - 0.125) < abs(plug_in - 0.125) / 2


def gaussian_js(shift: float) -> float:
    """JS(N(shift, 1), N(0, 1)) in nats, by numerical integration."""
    from scipy import integrate
    from scipy.stats import norm

    def integrand(x):
        p, q = norm.pdf(x, shift), norm.pdf(x)
        return 0.5 * p * np.log(2 * p / (p + q)) + 0.5 * q * np.log(2 * q / (p + q))
    return integrate.quad(integrand, -12, 12)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name, shift", [("kl", 0.5), ("js", 0.5), ("w1", 0.5), ("kl", 0.0), ("js", 0.0)])
def test_interval_coverage_is_near_nominal_by_simulation(name, shift):
    """200 replicates of 2,000 pairs, 200 resamples each (about 20 s a case): the 95% intervals hold
    the true value in at least 85% of them (measured 90-100%; see B.bootstrap_estimate). W1 at
    shift 0 is left out: the truth 0 sits on its boundary, and its coverage is about 0.8."""
    measure, truth, bounds = {
        "kl": (D.histogram_kl, shift ** 2 / 2, B.NON_NEGATIVE),
        "js": (D.js_divergence, gaussian_js(shift), B.JS_RANGE),
        "w1": (D.wasserstein_1_sd, shift / math.sqrt(1 + shift ** 2 / 4), B.NON_NEGATIVE),  # W1 / sd of the mixture
    }[name]
    coverage, _, _, _ = interval_coverage(measure, truth, bounds, shift, 2000, replicates=200, resamples=200, seed=21)
    assert coverage >= 0.85


def test_bootstrap_holds_the_estimate_and_shrinks_with_n():
    widths = []
    for n in (100, 10_000):
        rng = np.random.default_rng(n)
        c, r = rng.normal(0.5, 1, n), rng.normal(0, 1, n)
        for statistic in (lambda c, r: R.pair_accuracy(c, r), D.wasserstein_1):
            result = B.bootstrap(statistic, c, r, n_resamples=200, seed=1)
            assert result["ci_low"] <= result["corrected"] <= result["ci_high"]
            assert result["ci_low"] <= statistic(c, r) <= result["ci_high"]  # nearly unbiased: the plug-in too
        widths.append(result["ci_high"] - result["ci_low"])  # W1's
        # the interval of a mean difference matches normal theory: width ≈ 2 · 1.96 · sqrt(2/n)
        result = B.bootstrap(lambda c, r: np.mean(c - r), c, r, n_resamples=400, seed=2, bounds=B.ANY_REAL)
        assert result["ci_high"] - result["ci_low"] == pytest.approx(2 * 1.96 * math.sqrt(2 / n), rel=0.2)
    assert widths[1] < widths[0] / 5  # 100x the pairs: about 10x narrower


# --- ranking ------------------------------------------------------------------------------------

def test_pair_accuracy_counts_ties_half():
    assert R.pair_accuracy([1.0, 2.0, 3.0, 5.0], [0.0, 2.0, 4.0, 1.0]) == (1 + 0.5 + 0 + 1) / 4
    rng = np.random.default_rng(6)
    c, r = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(c, r)) / 300
    assert R.pair_accuracy(c, r) == pytest.approx(expected)


@pytest.mark.parametrize("successes, trials", [(0, 10), (3, 10), (10, 10), (1, 1), (620, 1000), (7, 2312)])
def test_wilson_against_scipy(successes, trials):
    expected = binomtest(successes, trials).proportion_ci(0.95, method="wilson")
    assert R.wilson_interval(successes, trials) == pytest.approx((expected.low, expected.high), abs=1e-12)
    expected = binomtest(successes, trials).proportion_ci(0.8, method="wilson")
    assert R.wilson_interval(successes, trials, 0.8) == pytest.approx((expected.low, expected.high), abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_quantile_accuracy_ranks_by_each_quantile(n):
    chosen, rejected = quantile_outputs(60, n, seed=n)
    expected = [R.pair_accuracy(chosen[:, k], rejected[:, k]) for k in range(n)]
    np.testing.assert_allclose(R.quantile_accuracy(chosen, rejected), expected)
    # constructed: chosen wins on q0 only, loses on q1, ties on q2
    assert R.quantile_accuracy([[1.0, 1.0, 2.0]], [[0.0, 3.0, 2.0]]).tolist() == [1.0, 0.0, 0.5]


def test_preference_probabilities():
    chosen, rejected = quantile_outputs(30, 4, seed=7)
    expected = 1 / (1 + np.exp(-(chosen.mean(axis=1) - rejected.mean(axis=1))))
    np.testing.assert_allclose(R.bradley_terry_probability(chosen, rejected), expected, rtol=1e-12)
    brute = [np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in c for b in r]) for c, r in zip(chosen, rejected)]
    np.testing.assert_allclose(R.distributional_probability(chosen, rejected), brute)
    assert R.distributional_probability([[0.0, 2.0]], [[1.0, 2.0]])[0] == (0 + 0 + 1 + 0.5) / 4


def test_calibration_against_a_direct_loop():
    rng = np.random.default_rng(8)
    prob = np.concatenate([rng.uniform(size=500), [0.0, 1.0, 0.5, 0.1]])  # bin edges included
    result = R.calibration(prob, bins=10)
    points = [(p, 1.0) for p in prob] + [(1 - p, 0.0) for p in prob]
    ece, curve = 0.0, []
    for b in range(10):
        inside = [(p, y) for p, y in points if b / 10 <= p < (b + 1) / 10 or (b == 9 and p == 1.0)]
        if inside:
            confidence = sum(p for p, _ in inside) / len(inside)
            frequency = sum(y for _, y in inside) / len(inside)
            ece += len(inside) / len(points) * abs(frequency - confidence)
            curve.append((b / 10, confidence, frequency, len(inside)))
    assert result["ece"] == pytest.approx(ece, rel=1e-12)
    assert result["brier"] == pytest.approx(sum((p - y) ** 2 for p, y in points) / len(points), rel=1e-12)
    got = list(zip(*(result["curve"][k] for k in ("bin_low", "mean_prob", "frequency", "count"))))
    assert np.allclose(got, curve)
    # perfectly calibrated predictions: outcomes drawn with the predicted probability
    p = rng.uniform(size=200_000)
    won = rng.uniform(size=p.size) < p
    assert R.calibration(np.where(won, p, 1 - p))["ece"] < 0.01


# --- quantile diagnostics -----------------------------------------------------------------------

def test_crossing_rate():
    rows = [[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 0.5, 2.0], [0.0, 2.0, 1.9]]
    assert C.crossing_rate(rows) == 0.5
    assert C.crossing_rate([[3.0], [1.0]]) == 0.0  # one quantile never crosses
    rng = np.random.default_rng(9)
    random_rows = rng.normal(size=(400, 5)).cumsum(axis=1)
    expected = np.mean([any(b < a for a, b in zip(row, row[1:])) for row in random_rows])
    assert C.crossing_rate(random_rows) == expected


@pytest.mark.parametrize("sizes", [(1, 1), (3, 8), (150, 90)])
def test_auroc_against_brute_force(sizes):
    rng = np.random.default_rng(sizes[0])
    for positive, negative in ((rng.normal(0.3, 1, sizes[0]), rng.normal(0, 1, sizes[1])),
                               (rng.integers(0, 3, sizes[0]), rng.integers(0, 3, sizes[1]))):  # ties
        brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in positive for b in negative])
        assert C.auroc(positive, negative) == pytest.approx(brute, abs=1e-12)
    assert math.isnan(C.auroc([], [1.0]))


def test_spread_error_auroc():
    # two pairs ranked wrongly (chosen mean below rejected) with wide quantiles, three right and narrow
    chosen = np.array([[0.0, 4.0], [1.0, 5.0], [2.0, 2.1], [3.0, 3.2], [1.0, 1.1]])
    rejected = np.array([[2.0, 6.0], [3.0, 7.0], [0.0, 0.1], [1.0, 1.2], [0.0, 0.1]])
    assert C.spread_error_auroc(chosen, rejected) == 1.0
    assert C.spread_error_auroc(rejected, chosen) == 0.0  # now the narrow pairs are the wrong ones
    c, r = quantile_outputs(200, 5, seed=10)
    spread = (c[:, -1] - c[:, 0] + r[:, -1] - r[:, 0]) / 2
    margin = c.mean(1) - r.mean(1)
    assert C.spread_error_auroc(c, r) == pytest.approx(C.auroc(spread[margin < 0], spread[margin > 0]))


# --- coverage -----------------------------------------------------------------------------------

def test_quantile_coverage_against_a_direct_count():
    rng = np.random.default_rng(11)
    pred, true = np.sort(rng.normal(size=(6, 3)), axis=1), rng.normal(size=(6, 17))
    expected = [sum(true[m, s] < pred[m, k] for m in range(6) for s in range(17)) / (6 * 17) for k in range(3)]
    np.testing.assert_allclose(C.quantile_coverage(pred, true), expected)
    # strictly below: a true value equal to the predicted quantile is not covered
    assert C.quantile_coverage([[1.0, 2.0]], [[1.0, 1.5, 2.0, 3.0]]).tolist() == [0.0, 0.5]


def test_coverage_of_true_quantiles_in_other_units():
    """A model that knows each response's distribution, in its own shift and scale, covers well
    once aligned; without the alignment it does not."""
    rng = np.random.default_rng(12)
    num, n = 400, 10
    taus = (2 * np.arange(n) + 1) / (2 * n)
    centre, width = rng.normal(0, 3, (num, 1)), rng.uniform(0.5, 3, (num, 1))
    true = centre + width * rng.normal(size=(num, 2000))
    exact = centre + width * np.array([np.quantile(rng.normal(size=200_000), taus)])  # N(c, w²) quantiles
    pred = 0.3 * exact + 5.0
    aligned = C.coverage_summary(pred, true, taus)
    assert aligned["slope"] == pytest.approx(0.3, rel=0.05) and aligned["intercept"] == pytest.approx(5, abs=0.1)
    assert aligned["mean_abs_error"] < 0.02
    np.testing.assert_allclose(aligned["coverage"], C.quantile_coverage(pred, 0.3 * true + 5.0), atol=0.01)
    assert C.coverage_summary(pred, true, taus, align=False)["mean_abs_error"] > 0.3
    pred_spread = pred[:, -1] - pred[:, 0]
    true_spread = np.quantile(true, taus[-1], axis=1) - np.quantile(true, taus[0], axis=1)
    assert aligned["spread_spearman"] == pytest.approx(spearmanr(pred_spread, true_spread).statistic, abs=1e-12)
    assert aligned["spread_spearman"] > 0.95
    scalar = C.coverage_summary(pred.mean(axis=1, keepdims=True), true, [0.5])
    assert scalar["spread_spearman"] is None and scalar["mean_abs_error"] < 0.05
    with pytest.raises(MinqrError, match="mean rewards fall as the true means rise"):
        C.coverage_summary(-pred, true, taus)
    with pytest.raises(MinqrError, match="one tau per quantile"):
        C.coverage_summary(pred, true, taus[:3])


def test_anchored_coverage_of_a_mixture_with_a_free_constant_per_kind(tmp_path):
    """A mixture model that knows every kind's reward but adds its own constant c_k to output k (the
    one thing pairs cannot identify), with its outputs in no particular order: aligned on the anchor
    (outputs minus the anchor's, per output, then sorted) its quantiles are the truth's with no fit
    at all; sorted without the alignment, the constants inflate every spread."""
    rng = np.random.default_rng(21)
    num_pairs, kinds, samples = 300, 8, 400
    kind_rewards = rng.normal(0, 1, (2, num_pairs, 1)) + rng.normal(0, 1.5, (2, num_pairs, kinds))  # [2, P, K]
    true = kind_rewards[..., rng.integers(0, kinds, samples)]  # an annotator is one of the K kinds
    true[0, :20] = 0.0  # the first 20 chosen responses are the anchor reply itself
    kind_rewards[0, :20] = 0.0
    constants = rng.normal(0, 4, kinds)
    outputs = kind_rewards + constants  # raw outputs, kind k in column k
    np.savez(tmp_path / "truth.npz", chosen_samples=true[0], rejected_samples=true[1])
    anchor = np.broadcast_to(constants, (num_pairs, kinds))  # what the model gives the anchor
    scores = scores_of(outputs[0], outputs[1], truth=str(tmp_path / "truth.npz"), readout="sorted")
    scores.anchor = anchor.astype(np.float32)
    np.testing.assert_allclose(scores.quantiles("chosen", anchored=True), np.sort(kind_rewards[0], axis=1), atol=1e-5)
    np.testing.assert_array_equal(scores.quantiles("chosen", anchored=False), np.sort(scores.chosen.astype(np.float64), axis=1))
    np.testing.assert_array_equal(scores.quantiles("chosen"), scores.quantiles("chosen", anchored=True))  # the default
    predictions, truth, kept = response_truth(scores, tmp_path / "truth.npz")
    assert len(predictions) == len(truth) == 2 * num_pairs - 20 == kept.sum()  # the anchor replies left out
    np.testing.assert_array_equal(kept, ~np.all(true.reshape(2 * num_pairs, -1) == 0, axis=1))
    coverage = A.summarize(scores, n_resamples=0)["coverage"]
    assert coverage["anchored"] and not coverage["aligned_by_fit"]
    taus = (2 * np.arange(kinds) + 1) / (2 * kinds)
    # each kind holds 1/K of the annotators: exact at the midpoints, up to the sampling of 400 of them
    assert coverage["mean_abs_error"] < 0.02 and coverage["spread_spearman"] > 0.99
    assert coverage["slope"] == pytest.approx(1.0, abs=0.01) and coverage["intercept"] == pytest.approx(0.0, abs=0.02)
    unaligned = C.coverage_summary(np.concatenate([scores.quantiles("chosen", False), scores.quantiles("rejected", False)]),
                                   true.reshape(-1, samples), taus)
    assert unaligned["spread_spearman"] < 0.8


@pytest.mark.parametrize("objective", ["mixture", "independent", "paper", "bradley_terry", None])
def test_the_objective_probability_is_the_likelihood_the_objective_trains(objective):
    """Its negative log-likelihood is the objective's own loss on the same outputs (minqr.objectives's
    references; for paper, its Bradley-Terry term alone), so a held-out NLL in the report is the
    training objective evaluated on held-out pairs."""
    import torch

    from minqr.objectives.loss import pair_loss

    rng = np.random.default_rng(23)
    n = 1 if objective == "bradley_terry" else 5
    chosen, rejected = rng.normal(0, 3, (2, 40, n))
    p = R.objective_probability(chosen, rejected, objective)
    loops = {"mixture": [np.mean([1 / (1 + np.exp(-(c[i] - r[i]))) for i in range(n)]) for c, r in zip(chosen, rejected)],
             "independent": [np.mean([1 / (1 + np.exp(-(a - b))) for a in c for b in r]) for c, r in zip(chosen, rejected)]}
    expected = loops.get(objective, 1 / (1 + np.exp(-(chosen.mean(1) - rejected.mean(1)))))
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    trained = {"paper": dict(objective="paper", lam=0.0), None: dict(objective="bradley_terry" if n == 1 else "paper",
                                                                        lam=0.0)}.get(objective, dict(objective=objective))
    if trained["objective"] == "bradley_terry":
        trained.pop("lam", None)
    loss = pair_loss(torch.tensor(chosen), torch.tensor(rejected), impl="reference", **trained)
    assert negative_log_likelihood(p) == pytest.approx(loss.item(), rel=1e-10)
    assert -np.mean(R.objective_log_probability(chosen, rejected, objective)) == pytest.approx(loss.item(), rel=1e-10)
    # pairs ranked wrong by hundreds of logits: the log-probability itself, where the probability is 0
    # in float64 (the NLL read from it was clipped at 690 nats)
    far = np.array([[-700.0], [-1000.0], [-1e5]]) + np.arange(n)  # [3, n], the kinds a logit apart
    log_p = R.objective_log_probability(far, np.zeros_like(far), objective)

    def log_sigmoid(x):  # for x far below 0
        return x - math.log1p(math.exp(x))

    def log_mean_sigmoid(row):  # log (1/n) Σ σ(x_i), by its largest term
        top = max(map(log_sigmoid, row))
        return top + math.log(sum(math.exp(log_sigmoid(x) - top) for x in row)) - math.log(len(row))
    # against a rejected side of zeros, kinds and draws both average σ over the chosen side's outputs
    by_kind = objective in ("mixture", "independent")
    expected = [log_mean_sigmoid(row) if by_kind else log_sigmoid(row.mean()) for row in far]
    np.testing.assert_allclose(log_p, expected, rtol=1e-12)
    assert -log_p.mean() > 30_000  # never the 690 of a clip


def test_linear_probe_finds_what_the_features_encode():
    rng = np.random.default_rng(22)
    labels = rng.integers(0, 2, (1000, 3))
    encoded = np.hstack([labels[:, :2] @ rng.normal(size=(2, 16)), rng.normal(size=(1000, 16))])  # not label 2
    accuracy, chance = linear_probe(encoded + 0.1 * rng.normal(size=encoded.shape), labels)
    held = np.random.default_rng(0).permutation(1000)[500:]  # the probe's held-out half
    share = labels[held].mean(0)
    np.testing.assert_allclose(chance, np.maximum(share, 1 - share))
    assert accuracy[0] > 0.98 and accuracy[1] > 0.98 and abs(accuracy[2] - 0.5) < 0.08


def test_load_truth(tmp_path):
    path = tmp_path / "test_truth.npz"
    np.savez(path, chosen_samples=np.zeros((4, 6), np.float32), rejected_samples=np.ones((4, 6), np.float32))
    chosen, rejected = load_truth(path, 4)
    assert chosen.shape == rejected.shape == (4, 6) and rejected.min() == 1
    with pytest.raises(MinqrError, match="the scores hold 5 pairs"):
        load_truth(path, 5)
    with pytest.raises(MinqrError, match="does not exist"):
        load_truth(tmp_path / "none.npz", 4)
    np.savez(path, samples=np.zeros((4, 6)))
    with pytest.raises(MinqrError, match="not a minqr truth file"):
        load_truth(path, 4)


# --- views and summarize ------------------------------------------------------------------------

def test_views():
    outputs = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(D.view_rows(outputs, "mean"), outputs.mean(axis=1, keepdims=True))
    np.testing.assert_array_equal(D.view_rows(outputs, "q2"), outputs[:, 2:])
    np.testing.assert_array_equal(D.view_rows(outputs, "all"), outputs)
    np.testing.assert_array_equal(D.view_rows(outputs[:, :1], "all"), outputs[:, :1])
    with pytest.raises(MinqrError, match="view 'q0' needs a quantile model.*N=1.*scalar"):
        D.check_view("q0", 1, "scalar.npz")
    with pytest.raises(MinqrError, match="out of range.*q0 ... q9"):
        D.check_view("q10", 10)
    with pytest.raises(MinqrError, match="unknown view 'median'"):
        D.check_view("median", 10)


def test_paired_kl_difference():
    (c_a, r_a), (c_b, r_b) = quantile_outputs(150, 3, seed=16, shift=1.0), quantile_outputs(150, 3, seed=17, shift=0.3)
    a, b = scores_of(c_a, r_a), scores_of(c_b, r_b)
    rows = [D.view_rows(x, "q2") for x in (a.chosen, b.chosen, a.rejected, b.rejected)]

    def difference(ca, cb, ra, rb):
        return D.histogram_kl(ca, ra, 20) - D.histogram_kl(cb, rb, 20)

    result = A.paired_kl_difference(a, b, view="q2", bins=20, n_resamples=40, seed=5)
    assert result["value"] == difference(*rows) > 0
    assert result == B.bootstrap(difference, *rows, n_resamples=40, seed=5, bounds=B.ANY_REAL)
    with pytest.raises(MinqrError, match="do not score the same pairs"):
        A.paired_kl_difference(a, scores_of(c_b[:100], r_b[:100]))
    with pytest.raises(MinqrError, match="do not score the same pairs"):
        A.paired_kl_difference(a, scores_of(c_b, r_b, split="train"))


def kinds_with_constants(seed: int, shift: float, num_pairs: int = 200, kinds: int = 4):
    """A mixture's scores: kind k's reward plus a free constant c_k in column k, with the anchor's
    outputs (the constants themselves: the anchor is worth 0 to every kind); sorted read-out."""
    rng = np.random.default_rng(seed)
    rewards = rng.normal(0, 1, (2, num_pairs, kinds)) + np.array([shift, 0.0])[:, None, None]  # [2, P, K]
    constants = np.array([5.0, -3.0, 10.0, 0.0])[:kinds]
    scores = scores_of(*(rewards + constants).astype(np.float32), readout="sorted", objective="mixture")
    scores.anchor = np.broadcast_to(constants, (num_pairs, kinds)).astype(np.float32)
    return scores, np.sort(rewards, axis=-1)  # the scores, and their quantiles relative to the anchor [2, P, K]


@pytest.mark.parametrize("view", ["q0", "q3", "all"])
def test_a_mixtures_views_read_its_quantiles_relative_to_the_anchor_everywhere(view, tmp_path):
    """Table 1's divergences, the paired difference and the figures all take a quantile view from
    the quantiles aligned on the anchor (not from the raw outputs, whose column k is kind k with its
    free constant), so the paired difference is exactly the difference of the two summaries' values."""
    (a, truth_a), (b, truth_b) = kinds_with_constants(31, 1.0), kinds_with_constants(32, 0.3)
    summaries = [A.summarize(s, view=view, bins=20, n_resamples=0) for s in (a, b)]
    for summary, quantiles in zip(summaries, (truth_a, truth_b)):
        c, r = D.view_rows(quantiles[0], view).ravel(), D.view_rows(quantiles[1], view).ravel()
        assert summary["histogram_kl"]["value"] == pytest.approx(D.histogram_kl(c, r, 20), rel=1e-9)
    difference = A.paired_kl_difference(a, b, view=view, bins=20, n_resamples=0)["value"]
    assert difference == pytest.approx(summaries[0]["histogram_kl"]["value"] - summaries[1]["histogram_kl"]["value"])
    np.testing.assert_allclose(A.scores_view(a, "chosen", view), D.view_rows(truth_a[0], view), atol=1e-5)
    np.testing.assert_array_equal(A.scores_view(a, "chosen", "mean"), D.view_rows(a.chosen, "mean"))  # raw mean


def test_a_mixtures_quantile_measures_without_an_anchor_are_not_taken(tmp_path):
    """Without anchor outputs a mixture's sorted outputs mix the kinds' constants into the
    distribution: a quantile view is refused, and the quantile measures are not taken (the mean's
    are, as ever)."""
    scores, _ = kinds_with_constants(33, 1.0)
    scores.anchor = None
    with pytest.raises(MinqrError, match="view 'q0' reads the quantiles, and the quantiles of a head whose outputs are "
                                         "kinds of annotator mean something only relative to a reference reply"):
        A.summarize(scores, view="q0", n_resamples=0)
    summary = A.summarize(scores, n_resamples=0)
    assert summary["quantile_accuracy"] is None and summary["calibration"]["distributional"] is None
    assert summary["spread_auroc"]["value"] is None and "no anchor outputs" in summary["spread_auroc"]["not_measured"]
    assert summary["accuracy"]["value"] > 0.6 and summary["histogram_kl"]["value"] > 0
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "truth.npz", chosen_samples=rng.normal(size=(200, 50)), rejected_samples=rng.normal(size=(200, 50)))
    coverage = A.summarize(scores, n_resamples=0, truth=tmp_path / "truth.npz")["coverage"]
    assert "no anchor outputs" in coverage["not_computed"]
    # a head whose outputs are quantiles needs no anchor
    paper = scores_of(*quantile_outputs(120, 4, seed=34), objective="paper")
    assert A.summarize(paper, view="q0", n_resamples=0)["quantile_accuracy"] is not None


@pytest.mark.parametrize("view", ["mean", "q0", "q4", "all"])
def test_summarize_matches_the_functions(view):
    scores = scores_of(*quantile_outputs(120, 5, seed=13))
    chosen, rejected = scores.chosen.astype(np.float64), scores.rejected.astype(np.float64)  # as stored
    summary = A.summarize(scores, view=view, bins=20, eps=1e-6, n_resamples=30, seed=3)
    c, r = D.view_rows(chosen, view).ravel(), D.view_rows(rejected, view).ravel()
    assert summary["histogram_kl"]["value"] == D.histogram_kl(c, r, 20, 1e-6)
    assert summary["js_divergence"]["value"] == D.js_divergence(c, r, 20, 1e-6)
    assert summary["wasserstein_1_sd"]["value"] == D.wasserstein_1_sd(c, r)
    assert summary["kde_kl"]["value"] == pytest.approx(D.kde_kl(c, r), rel=1e-10)
    assert summary["kl_by_bins"]["kl"] == D.histogram_kl_by_bins(c, r, D.BIN_SWEEP, 1e-6).tolist()
    assert summary["accuracy"]["value"] == R.pair_accuracy(chosen.mean(1), rejected.mean(1))
    assert summary["quantile_accuracy"] == R.quantile_accuracy(chosen, rejected).tolist()
    assert summary["crossing_rate"] == 0.0
    assert summary["spread_auroc"]["value"] == C.spread_error_auroc(chosen, rejected)
    assert summary["calibration"]["bradley_terry"] == R.calibration(R.bradley_terry_probability(chosen, rejected))
    # the same resamples for every measure: W1's is the bootstrap with the same seed
    assert summary["wasserstein_1_sd"] == B.bootstrap(lambda a, b: D.wasserstein_1_sd(a.ravel(), b.ravel()),
                                                      D.view_rows(chosen, view), D.view_rows(rejected, view),
                                                      n_resamples=30, seed=3)
    for name in ("histogram_kl", "js_divergence", "wasserstein_1_sd", "kde_kl", "spread_auroc"):
        assert 0 <= summary[name]["ci_low"] <= summary[name]["corrected"] <= summary[name]["ci_high"]
    assert summary["js_divergence"]["ci_high"] <= math.log(2) and summary["spread_auroc"]["ci_high"] <= 1
    assert summary["coverage"] is None


def test_summarize_scalar_and_truth(tmp_path):
    rng = np.random.default_rng(14)
    true = rng.normal(size=(2, 80, 1)) + rng.normal(size=(2, 80, 50))  # [2, P, S]
    np.savez(tmp_path / "truth.npz", chosen_samples=true[0], rejected_samples=true[1])
    predicted = 2 * true.mean(axis=2, keepdims=True) + 1  # [2, P, 1]
    scalar = scores_of(predicted[0], predicted[1], head="scalar", truth=str(tmp_path / "truth.npz"))
    summary = A.summarize(scalar, n_resamples=0)
    for name in ("quantile_accuracy", "crossing_rate", "spread_auroc"):
        assert summary[name] is None
    assert summary["calibration"]["distributional"] is None and summary["histogram_kl"]["ci_low"] is None
    coverage = summary["coverage"]
    assert coverage["taus"] == [0.5] and coverage["slope"] == pytest.approx(2.0)
    expected = C.quantile_coverage(predicted.reshape(160, 1), 2 * true.reshape(160, 50) + 1)
    assert coverage["coverage"] == pytest.approx(expected.tolist())
    with pytest.raises(MinqrError, match="needs a quantile model"):
        A.summarize(scalar, view="q0")


def test_a_collapsed_model_is_measured_where_it_can_be_and_says_why_not_elsewhere():
    """Every response gets the same reward: no density to estimate and no error to flag, but the
    histogram measures, accuracy and calibration are there (a collapsed model is worth seeing)."""
    collapsed = scores_of(np.full((10, 2), 0.5), np.full((10, 2), 0.5))
    summary = A.summarize(collapsed, n_resamples=20)
    assert summary["kde_kl"] == {"value": None, "not_measured": (
        "the 10 chosen rewards all equal 0.5, and a density estimate needs rewards that differ (a model that "
        "gives every response the same reward, or too few pairs)")}
    assert summary["spread_auroc"] == {"value": None, "not_measured": (
        "the mean reward ranks 0 pairs wrongly and 0 rightly (ties left out), and the AUROC compares the spreads "
        "of both kinds")}
    assert summary["histogram_kl"] == {"value": 0.0, "corrected": 0.0, "ci_low": 0.0, "ci_high": 0.0,
                                       "bootstrap_mean": 0.0}
    assert summary["accuracy"]["value"] == 0.5 and summary["calibration"]["bradley_terry"]["ece"] == 0.0
    # one pair: nothing varies either
    one = A.summarize(scores_of(*quantile_outputs(1, 3)), n_resamples=5)
    assert "not_measured" in one["kde_kl"]
    # and its every resample is itself: no interval (one of width 0 made the report call float noise
    # between two one-pair models larger than its uncertainty)
    assert one["histogram_kl"]["ci_low"] is None and one["histogram_kl"]["corrected"] is None
    chosen, rejected = quantile_outputs(1, 3)
    difference = A.paired_kl_difference(scores_of(chosen, rejected), scores_of(rejected, chosen), n_resamples=50)
    assert difference["ci_low"] is None and difference["ci_high"] is None


@pytest.mark.parametrize("num_pairs, n", [(2, 3), (3, 1), (9, 2)])
def test_summarize_small_cases(num_pairs, n):
    chosen, rejected = quantile_outputs(num_pairs, n, seed=num_pairs)
    head = "quantile" if n > 1 else "scalar"
    summary = A.summarize(scores_of(chosen, rejected, head=head), view="all", n_resamples=5)
    scores = scores_of(chosen, rejected, head=head)
    assert summary["num_pairs"] == num_pairs
    assert summary["accuracy"]["value"] == R.pair_accuracy(scores.chosen.mean(1), scores.rejected.mean(1))
    assert (summary["quantile_accuracy"] is None) == (n == 1)


def test_paired_accuracy_difference():
    (c_a, r_a), (c_b, r_b) = quantile_outputs(400, 3, seed=18, shift=1.0), quantile_outputs(400, 3, seed=19, shift=0.4)
    a, b = scores_of(c_a, r_a), scores_of(c_b, r_b)
    result = A.paired_accuracy_difference(a, b, confidence=0.9)
    per_pair = (c_a.mean(axis=1) > r_a.mean(axis=1)).astype(float) - (c_b.mean(axis=1) > r_b.mean(axis=1))
    assert result["value"] == pytest.approx(per_pair.mean(), abs=1e-12) and result["value"] > 0.1
    # a percentile bootstrap of the pairs, with many resamples, finds about the same interval
    means = per_pair[np.random.default_rng(0).integers(0, 400, size=(10_000, 400))].mean(axis=1)
    assert [result["ci_low"], result["ci_high"]] == pytest.approx(np.percentile(means, [5, 95]), abs=0.005)
    assert A.paired_accuracy_difference(a, a) == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    with pytest.raises(MinqrError, match="do not score the same pairs"):
        A.paired_accuracy_difference(a, scores_of(c_b, r_b, split="train"))
