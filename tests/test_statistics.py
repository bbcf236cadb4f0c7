"""minqr.distribution.statistics against float64 computations written out here, row by row, with
Python floats: each statistic by its definition (the CVaR by Rockafellar and Uryasev's formula, not
by the module's atom masses; the quantile by numpy.interp), on fresh random outputs."""
import math

import numpy as np
import pytest
import torch

from minqr.distribution.statistics import (Statistic, lone_member, mean_and_spread, parse_statistic, relative_outputs,
                                           statistic_values)
from minqr.errors import MinqrError

OBJECTIVES = ("mixture", "independent", "paper")
TEXTS = ("mean", "quantile:0.1", "quantile:0.5", "quantile:0", "quantile:1", "cvar:0.25", "cvar:0.07",
         "cvar:1", "mean_minus_std:1.0", "mean_minus_std:0.3", "preference")


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def reference_rows(outputs, reference, group, objective):
    """Per row, the reference vector as Python floats: kind by kind (mixture) or as quantiles."""
    rows = outputs.tolist()
    by_kind = objective == "mixture"
    if reference is not None:
        return [r if by_kind else sorted(r) for r in reference.tolist()]
    ids = group.tolist()
    result = []
    for i in range(len(rows)):
        members = [rows[j] if by_kind else sorted(rows[j]) for j in range(len(rows)) if ids[j] == ids[i]]
        result.append([sum(m[k] for m in members) / len(members) for k in range(len(rows[i]))])
    return result


def atoms(h, r, objective):
    if objective == "mixture":
        return [a - b for a, b in zip(h, r)]
    mean_r = sum(r) / len(r)
    return [a - mean_r for a in sorted(h)]


def cvar_rockafellar_uryasev(values, alpha):
    """CVaR_alpha = max over t of t - E[(t - X)^+] / alpha, the max being at an atom."""
    n = len(values)
    return max(t - sum(max(t - x, 0.0) for x in values) / (n * alpha) for t in values)


def expected(text, outputs, reference=None, group=None, objective="mixture"):
    """The statistic of each row, by its definition, in float64 Python."""
    stat = parse_statistic(text)
    ref_rows = reference_rows(outputs.double(), reference.double() if reference is not None else None, group,
                              objective)
    result = []
    for h, r in zip(outputs.double().tolist(), ref_rows):
        n = len(h)
        if stat.name == "preference":
            if objective == "mixture":
                value = sum(sigmoid(a - b) for a, b in zip(h, r)) / n
            elif objective == "paper":
                value = sigmoid(sum(h) / n - sum(r) / n)
            else:
                value = sum(sigmoid(a - b) for a in h for b in r) / n ** 2
            result.append(value)
            continue
        d = atoms(h, r, objective)
        mean = sum(d) / n
        if stat.name == "mean":
            value = mean
        elif stat.name == "mean_minus_std":
            value = mean - stat.level * math.sqrt(sum((x - mean) ** 2 for x in d) / n)
        elif stat.name == "quantile":
            value = float(np.interp(stat.level, [(2 * i + 1) / (2 * n) for i in range(n)], sorted(d)))
        else:
            value = cvar_rockafellar_uryasev(d, stat.level)
        result.append(value)
    return torch.tensor(result, dtype=torch.float64)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_against_the_definition_with_a_reference_per_row(text, objective, n, generator):
    outputs = torch.randn(6, n, generator=generator, dtype=torch.float64) * 3
    reference = torch.randn(6, n, generator=generator, dtype=torch.float64) * 3
    got = statistic_values(text, outputs, reference=reference, objective=objective)
    assert got.shape == (6,) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected(text, outputs, reference=reference, objective=objective),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("text", TEXTS)
def test_against_the_definition_with_groups(text, objective, generator):
    outputs = torch.randn(9, 5, generator=generator, dtype=torch.float64)
    group = torch.tensor([7, 3, 7, 100, 3, 3, 7, -2, -2])  # unsorted, not contiguous, one group of one
    got = statistic_values(text, outputs, group=group, objective=objective)
    torch.testing.assert_close(got, expected(text, outputs, group=group, objective=objective), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("text", TEXTS)
def test_mixture_is_invariant_to_per_kind_constants(text, generator):
    outputs = torch.randn(8, 10, generator=generator, dtype=torch.float64)
    reference = torch.randn(8, 10, generator=generator, dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    constants = torch.randn(10, generator=generator, dtype=torch.float64) * 5  # c_k, one per kind
    for kwargs, shifted in (({"reference": reference}, {"reference": reference + constants}),
                            ({"group": group}, {"group": group})):
        before = statistic_values(text, outputs, **kwargs)
        after = statistic_values(text, outputs + constants, **shifted)
        torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    # and the constants do change what raw outputs say: the invariance is not vacuous
    if text.startswith("quantile:0.1"):
        raw = outputs.sort(-1).values[:, 1]
        assert not torch.allclose((outputs + constants).sort(-1).values[:, 1] - raw, torch.zeros_like(raw), atol=1e-3)


@pytest.mark.parametrize("objective", ["independent", "paper"])
@pytest.mark.parametrize("text", TEXTS)
def test_draw_objectives_are_invariant_to_one_shared_constant(text, objective, generator):
    outputs = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    reference = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    before = statistic_values(text, outputs, reference=reference, objective=objective)
    after = statistic_values(text, outputs + 4.25, reference=reference + 4.25, objective=objective)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("objective", OBJECTIVES + ("bradley_terry",))
def test_one_output_is_the_reward_difference(objective, generator):
    r = torch.randn(7, 1, generator=generator, dtype=torch.float64)
    r0 = torch.randn(7, 1, generator=generator, dtype=torch.float64)
    for text in TEXTS:
        got = statistic_values(text, r, reference=r0, objective=objective)
        want = torch.sigmoid(r - r0)[:, 0] if text == "preference" else (r - r0)[:, 0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        if text != "preference":  # a scalar reward needs no reference: it is the reward
            torch.testing.assert_close(statistic_values(text, r, objective=objective), r[:, 0])


def test_relative_outputs(generator):
    h = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    h0 = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(relative_outputs(h, reference=h0), h - h0)
    torch.testing.assert_close(relative_outputs(h, reference=h0, objective="independent"),
                               h.sort(-1).values - h0.mean(-1, keepdim=True))
    group = torch.tensor([1, 1, 2, 2])
    want = torch.cat([h[:2] - h[:2].mean(0), h[2:] - h[2:].mean(0)])
    torch.testing.assert_close(relative_outputs(h, group=group), want)
    alone = relative_outputs(h, group=torch.arange(4))  # each its own group: nothing relative
    assert torch.equal(alone, torch.zeros_like(h))
    assert statistic_values("preference", h, group=torch.arange(4)).eq(0.5).all()


def test_special_levels_agree_with_plain_statistics(generator):
    h = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    h0 = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    d = h - h0
    torch.testing.assert_close(statistic_values("cvar:1", h, reference=h0), d.mean(-1))
    torch.testing.assert_close(statistic_values("cvar:0.125", h, reference=h0), d.min(-1).values)  # one atom of 8
    torch.testing.assert_close(statistic_values("quantile:0", h, reference=h0), d.min(-1).values)
    torch.testing.assert_close(statistic_values("quantile:1", h, reference=h0), d.max(-1).values)
    torch.testing.assert_close(statistic_values("mean_minus_std:0", h, reference=h0), d.mean(-1))
    # the mean without a reference is the expected reward, as export --scalar gives it
    torch.testing.assert_close(statistic_values("mean", h), h.mean(-1))


def test_dtypes():
    h = torch.randn(3, 4).half()
    h0 = torch.randn(3, 4).half()
    got = statistic_values("cvar:0.5", h, reference=h0)
    assert got.dtype == torch.float32  # half precision is widened, not rounded
    torch.testing.assert_close(got, expected("cvar:0.5", h, reference=h0).float())
    assert statistic_values("mean", h.double(), reference=h0.double()).dtype == torch.float64


def test_parse_statistic():
    assert parse_statistic("mean") == Statistic("mean")
    assert parse_statistic(" quantile:0.1") == Statistic("quantile", 0.1)
    assert parse_statistic("cvar:1") == Statistic("cvar", 1.0)
    assert parse_statistic("mean_minus_std:1.0").level == 1.0
    assert str(parse_statistic("cvar:0.25")) == "cvar:0.25" and str(Statistic("preference")) == "preference"
    assert str(parse_statistic("mean_minus_std:1.0")) == "mean_minus_std:1"
    # two levels that the short form would print alike keep their names apart (best-of-N's columns)
    names = [str(parse_statistic(f"quantile:{level}")) for level in ("0.1234567", "0.1234568")]
    assert names == ["quantile:0.1234567", "quantile:0.1234568"]
    assert [parse_statistic(name) for name in names] == [Statistic("quantile", 0.1234567), Statistic("quantile", 0.1234568)]
    # which need a reference: all but the mean at N > 1, and the preference at any N
    assert [Statistic(n).needs_reference(1) for n in ("mean", "preference")] == [False, True]
    assert parse_statistic("quantile:0.1").needs_reference(1) is False and parse_statistic("cvar:0.5").needs_reference(4)
    for bad, words in [("median", "mean, quantile:0.1"), ("quantile", "needs a level"), ("quantile:x", "not a number"),
                       ("quantile:1.5", "tau in [0, 1]"), ("cvar:0", "alpha in (0, 1]"), ("cvar:nan", "alpha"),
                       ("mean_minus_std:-1", "lambda >= 0"), ("mean:0.5", "takes no level"), ("", "choose one of"),
                       ("preference:1", "takes no level")]:
        with pytest.raises(MinqrError, match=None) as error:
            parse_statistic(bad)
        assert words in str(error.value), (bad, str(error.value))
        assert repr(bad) in str(error.value) or bad.partition(":")[0] in str(error.value)


def test_bad_input_is_a_clear_error(generator):
    h = torch.randn(4, 3, generator=generator)
    for text in ("quantile:0.1", "cvar:0.25", "mean_minus_std:1", "preference"):
        with pytest.raises(MinqrError, match="needs a reference"):
            statistic_values(text, h)
    with pytest.raises(MinqrError, match="needs a reference"):
        statistic_values("preference", h[:, :1])  # even a scalar reward has no preference without a y0
    with pytest.raises(MinqrError, match="needs a reference"):
        relative_outputs(h)
    with pytest.raises(MinqrError, match="not both"):
        statistic_values("mean", h, reference=h, group=torch.zeros(4, dtype=torch.long))
    with pytest.raises(MinqrError, match="shape"):
        statistic_values("mean", h, reference=h[:, :2])
    with pytest.raises(MinqrError, match="integer tensor"):
        statistic_values("mean", h, group=torch.zeros(4))
    with pytest.raises(MinqrError, match="integer tensor"):
        statistic_values("mean", h, group=torch.zeros(3, dtype=torch.long))
    with pytest.raises(MinqrError, match=r"\[B, N\]"):
        statistic_values("mean", h[0])
    with pytest.raises(MinqrError, match="objective must be one of"):
        statistic_values("mean", h, reference=h, objective="bogus")
    with pytest.raises(MinqrError, match="unknown statistic"):
        Statistic("median")


def weighted_expected(text, outputs, reference, weights):
    """A mixture's statistic with the kinds weighted, by its definition, in float64 Python: the
    quantile as the window mean of the step quantile function, interval by interval, the CVaR by
    Rockafellar and Uryasev's formula max_t t - E_w[(t - X)^+] / alpha."""
    stat = parse_statistic(text)
    result = []
    n = outputs.shape[1]
    for h, r, w in zip(outputs.double().tolist(), reference.double().tolist(), weights.double().tolist()):
        d = [a - b for a, b in zip(h, r)]
        mean = sum(x * q for x, q in zip(d, w))
        if stat.name == "preference":
            value = sum(q * sigmoid(x) for x, q in zip(d, w))
        elif stat.name == "mean":
            value = mean
        elif stat.name == "mean_minus_std":
            value = mean - stat.level * math.sqrt(sum(q * (x - mean) ** 2 for x, q in zip(d, w)))
        elif stat.name == "quantile":
            # the mean of the step quantile function over tau +- 1/(2N), the window kept inside [0, 1]
            centre = min(max(stat.level, 0.5 / n), 1 - 0.5 / n)
            low, high = centre - 0.5 / n, centre + 0.5 / n
            pairs = sorted(zip(d, w))
            pieces, start = [], 0.0
            for x, q in pairs:
                pieces.append((start, start + q, x))
                start += q
            value = sum(x * max(min(b, high) - max(a, low), 0.0) for a, b, x in pieces) * n
        else:
            value = max(t - sum(q * max(t - x, 0.0) for x, q in zip(d, w)) / stat.level for t in d)
        result.append(value)
    return torch.tensor(result, dtype=torch.float64)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_weighted_kinds_against_the_definition(text, n, generator):
    outputs = torch.randn(6, n, generator=generator, dtype=torch.float64) * 3
    reference = torch.randn(6, n, generator=generator, dtype=torch.float64) * 3
    weights = torch.rand(6, n, generator=generator, dtype=torch.float64) ** 3  # some kinds nearly weightless
    weights[0, 0] = 0.0 if n > 1 else 1.0  # a kind of no weight at all
    weights = weights / weights.sum(-1, keepdim=True)
    got = statistic_values(text, outputs, reference=reference, weights=weights)
    torch.testing.assert_close(got, weighted_expected(text, outputs, reference, weights), rtol=1e-12, atol=1e-12)
    # equal weights are the population's statistic, [N] weights broadcast over the rows
    equal = statistic_values(text, outputs, reference=reference, weights=torch.full((n,), 1 / n, dtype=torch.float64))
    torch.testing.assert_close(equal, statistic_values(text, outputs, reference=reference), rtol=1e-12, atol=1e-12)
    # all the weight on kind 0: that kind's own reward difference (its preference sigma of it)
    one = torch.zeros(n, dtype=torch.float64)
    one[0] = 1.0
    got = statistic_values(text, outputs, reference=reference, weights=one)
    kind = outputs[:, 0] - reference[:, 0]
    torch.testing.assert_close(got, torch.sigmoid(kind) if text == "preference" else kind, rtol=1e-12, atol=1e-12)


def test_weighted_kinds_with_groups_and_without_a_reference(generator):
    outputs = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    weights = torch.softmax(torch.randn(5, 4, generator=generator, dtype=torch.float64), -1)
    group = torch.tensor([1, 1, 2, 2, 2])
    reference = torch.stack([outputs[group == g].mean(0) for g in group.tolist()])
    for text in TEXTS:
        torch.testing.assert_close(statistic_values(text, outputs, group=group, weights=weights),
                                   weighted_expected(text, outputs, reference, weights), rtol=1e-12, atol=1e-12)
    # without a reference the mean is the person's expected reward
    torch.testing.assert_close(statistic_values("mean", outputs, weights=weights), (outputs * weights).sum(-1))


def test_weights_are_checked(generator):
    h = torch.randn(4, 3, generator=generator)
    fine = torch.full((3,), 1 / 3)
    for objective in ("independent", "paper"):
        with pytest.raises(MinqrError, match="not kinds"):
            statistic_values("mean", h, reference=h, objective=objective, weights=fine)
    for bad in (torch.full((2,), 0.5), torch.full((4, 2), 0.5), torch.tensor([0.5, 0.6, -0.1]),
                torch.tensor([0.5, 0.5, 0.5]), torch.tensor([float("nan"), 0.5, 0.5]), [1 / 3] * 3):
        with pytest.raises(MinqrError, match="weights"):
            statistic_values("mean", h, reference=h, weights=bad)


def test_mean_and_spread_against_a_loop(generator):
    """The weighted mean and standard deviation of atoms, written out; 1/N without weights."""
    relative = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    weights = torch.rand(5, 4, generator=generator, dtype=torch.float64)
    weights /= weights.sum(-1, keepdim=True)
    for w in (None, weights):
        mean, spread = mean_and_spread(relative, w)
        for b in range(5):
            masses = [0.25] * 4 if w is None else w[b].tolist()
            m = sum(x * q for x, q in zip(relative[b].tolist(), masses))
            assert mean[b].item() == pytest.approx(m)
            assert spread[b].item() == pytest.approx(math.sqrt(sum(q * (x - m) ** 2 for x, q in zip(relative[b].tolist(),
                                                                                                   masses))))


def test_lone_member():
    assert lone_member(torch.tensor([0, 0, 1, 1])) is None
    assert lone_member(torch.tensor([3, 5, 3, 7, 5])) == 3
    assert lone_member(torch.tensor([9])) == 0
