"""Every objective's loss: the fused ops and the PyTorch references against the spec
(docs/design.md#objectives and #paper-loss; minqr/objectives/).

The oracles are written here, independent of minqr: `*_loops` spell each formula out with Python
floats (per pair, per i, per j, gradients included), and `*_numpy` vectorise the same formulas in
NumPy float64 for the sizes where loops are too slow; the loops check the NumPy versions, and finite
differences check the loops' gradients.
"""
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minqr.objectives import loss, ops, references
from minqr.objectives.loss import pair_loss
from minqr.objectives.references import quantile_levels

# torch's own opcheck and inductor still import torch.jit pieces that warn.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

fused = pytest.mark.skipif(not ops.fused_available(), reason="minqr._C is not built")
cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in ops.DEVICE_TYPES["mixture_loss"],
    reason="no CUDA device, or minqr._C built without its CUDA kernels",
)

OBJECTIVES = ("mixture", "independent", "paper")
PAPER_PARAMS = [(1.0, 1.0, 1.0), (0.5, 0.3, 0.0), (2.0, 2.0, -0.5), (0.25, 0.0, 1.5)]


# ----------------------------------------------------------------------------------------------
# Oracles: per pair, (loss, dL/dh_chosen, dL/dh_rejected)


def log_sigmoid(d):
    return -(max(-d, 0.0) + math.log1p(math.exp(-abs(d))))


def sigmoid(d):
    return math.exp(log_sigmoid(d))


def log_mean_sigmoid_loops(ds):
    """log((1/K) Σ σ(d)) over a list of differences, and its derivative w.r.t. each d."""
    logs = [log_sigmoid(d) for d in ds]
    top = max(logs)
    lse = top + math.log(sum(math.exp(x - top) for x in logs))
    weights = [math.exp(x - lse) for x in logs]  # softmax of log σ(d)
    return lse - math.log(len(ds)), [w * sigmoid(-d) for w, d in zip(weights, ds)]


def mixture_loops(hc, hr):
    losses, grads_c, grads_r = [], [], []
    for c, r in zip(hc, hr):
        value, slopes = log_mean_sigmoid_loops([ci - ri for ci, ri in zip(c, r)])
        losses.append(-value)
        grads_c.append([-s for s in slopes])
        grads_r.append(slopes)
    return np.array(losses), np.array(grads_c), np.array(grads_r)


def independent_loops(hc, hr):
    losses, grads_c, grads_r = [], [], []
    for c, r in zip(hc, hr):
        n = len(c)
        value, slopes = log_mean_sigmoid_loops([c[i] - r[j] for i in range(n) for j in range(n)])
        losses.append(-value)
        grads_c.append([-sum(slopes[i * n + j] for j in range(n)) for i in range(n)])
        grads_r.append([sum(slopes[i * n + j] for i in range(n)) for j in range(n)])
    return np.array(losses), np.array(grads_c), np.array(grads_r)


def paper_loops(qc, qr, kappa=1.0, lam=1.0, margin=1.0, qc_target=None, qr_target=None):
    """The paper loss and gradients (docs/design.md#paper-loss). The targets default to the inputs;
    passing them separately lets a finite difference move the predictions alone, which is what
    "targets detached" means."""
    qc_target = qc if qc_target is None else qc_target
    qr_target = qr if qr_target is None else qr_target
    n = len(qc[0])
    tau = [(2 * i + 1) / (2 * n) for i in range(n)]

    def huber(u):
        return 0.5 * u * u if abs(u) <= kappa else kappa * (abs(u) - 0.5 * kappa)

    def weight(u, t):
        return abs(t - (1.0 if u < 0 else 0.0))

    def clip(u):
        return max(-kappa, min(kappa, u))

    losses, grads_c, grads_r = [], [], []
    for b in range(len(qc)):
        d = sum(qc[b]) / n - sum(qr[b]) / n
        l_pair = -log_sigmoid(d)
        sig = sigmoid(-d)
        l_qr = 0.0
        gc = [-sig / n] * n
        gr = [sig / n] * n
        for i in range(n):
            for j in range(n):
                u = (qr_target[b][j] + margin) - qc[b][i]
                v = (qc_target[b][j] - margin) - qr[b][i]
                l_qr += 0.5 * (1 / n) * (weight(u, tau[i]) * huber(u) / kappa
                                         + weight(v, tau[i]) * huber(v) / kappa)
                gc[i] += lam * 0.5 * (1 / n) * (-weight(u, tau[i]) * clip(u) / kappa)
                gr[i] += lam * 0.5 * (1 / n) * (-weight(v, tau[i]) * clip(v) / kappa)
        losses.append(l_pair + lam * l_qr)
        grads_c.append(gc)
        grads_r.append(gr)
    return np.array(losses), np.array(grads_c), np.array(grads_r)


def log_mean_sigmoid_numpy(d, axes):
    """log((1/K) Σ σ(d)) over `axes` of d, and its derivative w.r.t. every d."""
    logs = -np.logaddexp(0.0, -d)
    top = logs.max(axis=axes, keepdims=True)
    lse = top + np.log(np.exp(logs - top).sum(axis=axes, keepdims=True))
    count = np.prod([d.shape[a] for a in axes])
    value = (lse - np.log(count)).reshape(d.shape[0])
    return value, np.exp(logs - lse) * np.exp(-np.logaddexp(0.0, d))  # w · σ(−d)


def mixture_numpy(hc, hr):
    value, slopes = log_mean_sigmoid_numpy(hc - hr, (1,))
    return -value, -slopes, slopes


def independent_numpy(hc, hr):
    value, slopes = log_mean_sigmoid_numpy(hc[:, :, None] - hr[:, None, :], (1, 2))
    return -value, -slopes.sum(2), slopes.sum(1)


def paper_numpy(qc, qr, kappa=1.0, lam=1.0, margin=1.0):
    n = qc.shape[1]
    tau = ((2 * np.arange(n) + 1) / (2 * n))[None, :, None]
    d = qc.mean(1) - qr.mean(1)
    sig = np.exp(-np.logaddexp(0.0, d))  # σ(−d)
    u = (qr[:, None, :] + margin) - qc[:, :, None]
    v = (qc[:, None, :] - margin) - qr[:, :, None]

    def weight(x):
        return np.abs(tau - (x < 0))

    def huber(x):
        return np.where(np.abs(x) <= kappa, 0.5 * x * x, kappa * (np.abs(x) - 0.5 * kappa))

    rho_sum = (weight(u) * huber(u)).sum((1, 2)) + (weight(v) * huber(v)).sum((1, 2))
    l_qr = 0.5 / n * rho_sum / kappa
    gc = -sig[:, None] / n - lam * 0.5 / n * (weight(u) * np.clip(u, -kappa, kappa)).sum(2) / kappa
    gr = sig[:, None] / n - lam * 0.5 / n * (weight(v) * np.clip(v, -kappa, kappa)).sum(2) / kappa
    return np.logaddexp(0.0, -d) + lam * l_qr, gc, gr


LOOPS = {"mixture": mixture_loops, "independent": independent_loops, "paper": paper_loops}
NUMPY = {"mixture": mixture_numpy, "independent": independent_numpy, "paper": paper_numpy}


def oracle(objective, hc, hr, **hyper):
    """(loss [B], grad_c [B, N], grad_r [B, N]) in float64, from the inputs as they are (rounded)."""
    hc = hc.detach().double().cpu().numpy()
    hr = hr.detach().double().cpu().numpy()
    if hc.size * hc.shape[1] <= 4000:
        return LOOPS[objective](hc.tolist(), hr.tolist(), **hyper)
    return NUMPY[objective](hc, hr, **hyper)


# ----------------------------------------------------------------------------------------------
# Helpers

IMPLS = [pytest.param("fused", marks=fused), "reference"]
SIZES = [(b, n) for n in (1, 2, 7, 10, 32, 64) for b in (1, 3, 1000)]
TOLERANCE = {  # relative to the largest value compared; halves: their rounding (gradients only)
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}


def hyper_for(objective, index=0):
    """The objective's hyper-parameters; for paper, one of PAPER_PARAMS chosen by index."""
    if objective != "paper":
        return {}
    return dict(zip(("kappa", "lam", "margin"), PAPER_PARAMS[index % len(PAPER_PARAMS)]))


def pairs(b, n, dtype=torch.float64, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    hc = (scale * torch.randn(b, n, generator=g, dtype=torch.float64)).to(dtype)
    hr = (scale * torch.randn(b, n, generator=g, dtype=torch.float64) - 0.3).to(dtype)
    return hc, hr


def loss_and_grads(objective, impl, hc, hr, reduction="none", grad_output=None, **hyper):
    """The loss and the gradients that autograd gives for a grad_output (default: ones).
    Inputs that already require grad (views of a leaf) are used as they are, strides included."""
    if not hc.requires_grad:
        hc = hc.detach().clone().requires_grad_()
        hr = hr.detach().clone().requires_grad_()
    out = pair_loss(hc, hr, objective, reduction, impl, **hyper)
    go = torch.ones_like(out) if grad_output is None else grad_output
    gc, gr = torch.autograd.grad(out, (hc, hr), go)
    return out.detach(), gc, gr


def assert_close(got, want, rel):
    got = np.asarray(got.detach().double().cpu().numpy() if torch.is_tensor(got) else got)
    want = np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * scale)


def op_call(objective, hc, hr, compute_grad=True, reduction="none", **hyper):
    """The objective's fused op called directly: (loss, grad_chosen, grad_rejected)."""
    spec = loss.OBJECTIVES[objective]
    values = {**spec.hyperparameters, **hyper}
    return getattr(torch.ops.minqr, spec.op)(hc, hr, *(float(values[k]) for k in spec.hyperparameters),
                                            reduction, compute_grad)


# ----------------------------------------------------------------------------------------------
# The oracles themselves


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_numpy_oracles_match_loops(objective):
    for b, n in [(3, 1), (4, 2), (5, 7), (2, 10)]:
        for index, scale in enumerate((1.5, 40.0, 400.0)):
            hc, hr = pairs(b, n, seed=b * n + index, scale=scale)
            hyper = hyper_for(objective, index)
            want = LOOPS[objective](hc.tolist(), hr.tolist(), **hyper)
            got = NUMPY[objective](hc.numpy(), hr.numpy(), **hyper)
            for g, w in zip(got, want):
                assert_close(g, w, 1e-12)


@pytest.mark.parametrize("objective", ["mixture", "independent"])
def test_oracle_gradients_are_derivatives(objective):
    """The loops' gradient formulas = central differences of their loss."""
    hc, hr = pairs(2, 4, seed=3, scale=2.0)
    hc, hr = hc.tolist(), hr.tolist()
    _, gc, gr = LOOPS[objective](hc, hr)
    eps = 1e-6
    for b in range(2):
        for i in range(4):
            for side, grad in ((0, gc), (1, gr)):
                plus, minus = [[row[:] for row in h] for h in (hc, hr)], [[row[:] for row in h] for h in (hc, hr)]
                plus[side][b][i] += eps
                minus[side][b][i] -= eps
                slope = (LOOPS[objective](*plus)[0][b] - LOOPS[objective](*minus)[0][b]) / (2 * eps)
                assert abs(slope - grad[b][i]) < 1e-7


def test_paper_gradient_formula_is_the_derivative_with_detached_targets():
    """The paper gradient formula (docs/design.md#paper-loss) = finite differences of L moving the predictions only."""
    qc, qr = pairs(2, 5, seed=3)
    qc, qr = qc.tolist(), qr.tolist()
    kappa, lam, margin = 0.7, 1.3, 0.4
    _, gc, gr = paper_loops(qc, qr, kappa, lam, margin)
    eps = 1e-6
    for b in range(2):
        for i in range(5):
            for pred, grad, side in ((qc, gc, "c"), (qr, gr, "r")):
                plus = [row[:] for row in pred]
                minus = [row[:] for row in pred]
                plus[b][i] += eps
                minus[b][i] -= eps
                targets = dict(qc_target=qc, qr_target=qr)
                args = (plus, qr) if side == "c" else (qc, plus)
                lp = paper_loops(*args, kappa, lam, margin, **targets)[0][b]
                args = (minus, qr) if side == "c" else (qc, minus)
                lm = paper_loops(*args, kappa, lam, margin, **targets)[0][b]
                assert abs((lp - lm) / (2 * eps) - grad[b][i]) < 1e-7


# ----------------------------------------------------------------------------------------------
# Against the oracles


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("b,n", SIZES)
def test_float64_matches_oracle(impl, objective, b, n):
    hyper = hyper_for(objective, b + n)
    hc, hr = pairs(b, n, seed=1000 * b + n)
    go = torch.randn(b, dtype=torch.float64, generator=torch.Generator().manual_seed(b + n))
    loss, gc, gr = loss_and_grads(objective, impl, hc, hr, "none", go, **hyper)
    want_loss, want_gc, want_gr = oracle(objective, hc, hr, **hyper)
    go = go.numpy()[:, None]
    assert loss.dtype == torch.float64 and gc.dtype == torch.float64 and gr.dtype == torch.float64
    assert_close(loss, want_loss, 1e-10)
    assert_close(gc, go * want_gc, 1e-10)
    assert_close(gr, go * want_gr, 1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_reductions_and_dtypes(impl, objective, reduction, dtype):
    b, n = 37, 10
    for index in range(2):
        hyper = hyper_for(objective, index)
        hc, hr = pairs(b, n, dtype, seed=index)
        loss, gc, gr = loss_and_grads(objective, impl, hc, hr, reduction, **hyper)
        per_pair, want_gc, want_gr = oracle(objective, hc, hr, **hyper)  # on the rounded inputs
        scale = {"mean": 1 / b, "sum": 1.0, "none": 1.0}[reduction]
        want_loss = {"mean": per_pair.mean(), "sum": per_pair.sum(), "none": per_pair}[reduction]
        # The loss is computed and returned in float32 even for halves: float32 accuracy.
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert loss.dtype == acc and gc.dtype == dtype and gr.dtype == dtype
        assert loss.shape == ((b,) if reduction == "none" else ())
        assert_close(loss, want_loss, TOLERANCE[acc])
        assert_close(gc, scale * want_gc, TOLERANCE[dtype])
        assert_close(gr, scale * want_gr, TOLERANCE[dtype])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@fused
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_op_reduction_has_the_bits_of_torch_reductions(objective, dtype, device):
    """The op's own mean and sum give the bits of torch.mean / torch.sum over its per-pair losses,
    gradients included, for any grad_output and on each device: a loss reduced by the op trains
    exactly as one reduced after it, as before the reduction moved into the op."""
    hyper = hyper_for(objective, 1)
    hc, hr = (h.to(device) for h in pairs(37, 7, dtype, seed=13))
    for reduction, reduce in (("mean", torch.mean), ("sum", torch.sum)):
        for go in (1.0, -2.5):
            grad_output = torch.tensor(go, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                                       device=device)
            got = loss_and_grads(objective, "fused", hc, hr, reduction, grad_output, **hyper)
            a, b = (h.detach().clone().requires_grad_() for h in (hc, hr))
            out = reduce(pair_loss(a, b, objective, "none", "fused", **hyper))
            want = (out.detach(), *torch.autograd.grad(out, (a, b), grad_output))
            for g, w in zip(got, want):
                assert torch.equal(g, w), (reduction, go)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_huge_differences_stay_finite(impl, objective, dtype):
    """d = ±300 and beyond: every σ(d) of a pair may underflow, the loss must not."""
    n = 5
    rows = [[300.0] * n, [-300.0] * n, [300.0, -300.0, 0.0, 1000.0, -1000.0], [-1e4] * n,
            [-310.0, -300.0, -290.0, -320.0, -305.0]]
    hc = torch.tensor(rows, dtype=dtype)
    hr = torch.tensor([[0.0] * n, [0.0] * n, [-1.0, 2.0, -3.0, 4.0, 0.5], [1e4] * n, [5.0] * n], dtype=dtype)
    hyper = hyper_for(objective, 0)
    loss, gc, gr = loss_and_grads(objective, impl, hc, hr, **hyper)
    for x in (loss, gc, gr):
        assert torch.isfinite(x).all()
    # The reference's float32 logsumexp of log σ(d) ≈ d near ±2e4 keeps ~1e-3 of the weights (a
    # float32 ulp there is 2e-3); the kernels work relative to the largest d, which is exact.
    rel = 1e-2 if impl == "reference" and dtype == torch.float32 else TOLERANCE[dtype]
    for got, want in zip((loss, gc, gr), oracle(objective, hc, hr, **hyper)):
        assert_close(got, want, rel)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("objective", ["mixture", "independent"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outputs_near_the_largest_float(impl, objective, dtype):
    """Equal outputs near the type's largest value: every difference is 0, so the loss is what it
    is at 0 (log 2 for the sigmoid terms); a midpoint taken as (high + low) / 2 overflowed to inf.
    (paper's mean of the outputs overflows there by definition.)"""
    big = torch.finfo(dtype).max / 1.5
    hc = torch.full((3, 4), big, dtype=dtype)
    hr = hc.clone()
    hyper = hyper_for(objective, 0)
    loss, gc, gr = loss_and_grads(objective, impl, hc, hr, **hyper)
    want = loss_and_grads(objective, impl, torch.zeros_like(hc), torch.zeros_like(hr), **hyper)
    for got, expected in zip((loss, gc, gr), want):
        assert_close(got, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("objective", ["mixture", "independent"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spread", [10.0, 79.0, 81.0, 650.0, 750.0])
def test_spread_outputs(impl, objective, dtype, spread):
    """Outputs spread over about `spread`: the CPU kernels compute a block of pairs directly while
    every difference lies within 80 (float32) or 700 (float64), shifted by the largest otherwise;
    both sides of both bounds, with ordinary pairs in the same blocks."""
    hc, hr = pairs(40, 6, dtype, seed=int(spread))
    hc[::3, 0] = spread / 2  # mixture: d_0 ≈ spread; independent: d_00 too, and the outputs' span
    hr[::3, 0] = -spread / 2
    loss, gc, gr = loss_and_grads(objective, impl, hc, hr)
    for got, want in zip((loss, gc, gr), oracle(objective, hc, hr)):
        assert_close(got, want, TOLERANCE[dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_nan_in_nan_out(impl, objective):
    hc, hr = pairs(20, 7, torch.float32, seed=8)
    hc[3, 2] = math.nan
    hr[11, 0] = math.nan
    loss, gc, gr = loss_and_grads(objective, impl, hc, hr, **hyper_for(objective))
    poisoned = torch.zeros(20, dtype=torch.bool)
    poisoned[[3, 11]] = True
    assert loss[poisoned].isnan().all() and not loss[~poisoned].isnan().any()
    assert gc[poisoned].isnan().any(dim=1).all() and not gc[~poisoned].isnan().any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paper_ties_at_zero_and_kappa(impl, dtype):
    # Quarter steps: every u, v is exact, and many hit 0 and ±κ exactly, where the weight
    # switches (1{u<0}) and the Huber pieces meet.
    g = torch.Generator().manual_seed(7)
    qc = (torch.randint(-6, 7, (64, 6), generator=g) / 4).to(dtype)
    qr = (torch.randint(-6, 7, (64, 6), generator=g) / 4).to(dtype)
    hyper = {"kappa": 0.5, "lam": 1.0, "margin": 0.25}
    u = (qr[:, None, :] + hyper["margin"]) - qc[:, :, None]
    v = (qc[:, None, :] - hyper["margin"]) - qr[:, :, None]
    for x in (u, v):
        assert (x == 0).any() and (x == hyper["kappa"]).any() and (x == -hyper["kappa"]).any()
    loss, gc, gr = loss_and_grads("paper", impl, qc, qr, **hyper)
    for got, want in zip((loss, gc, gr), oracle("paper", qc, qr, **hyper)):
        assert_close(got, want, TOLERANCE[dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("n", [256, 300])
def test_many_outputs(impl, objective, n):
    hc, hr = pairs(3, n, seed=n)
    hyper = hyper_for(objective, n)
    loss, gc, gr = loss_and_grads(objective, impl, hc, hr, **hyper)
    for got, want in zip((loss, gc, gr), NUMPY[objective](hc.numpy(), hr.numpy(), **hyper)):
        assert_close(got, want, 1e-10)


@fused
@pytest.mark.parametrize("objective,b", [("mixture", 8192), ("independent", 2048), ("paper", 2048)])
def test_large_batch_across_threads(objective, b):
    """Enough work that the CPU kernels split the batch into tasks (and threads): every pair still
    matches the oracle, and a second call gives the same bits."""
    hc, hr = pairs(b, 32, torch.float32, seed=12)
    hyper = hyper_for(objective, 1)
    loss, gc, gr = loss_and_grads(objective, "fused", hc, hr, **hyper)
    for got, want in zip((loss, gc, gr), oracle(objective, hc, hr, **hyper)):
        assert_close(got, want, TOLERANCE[torch.float32])
    for first, second in zip((loss, gc, gr), loss_and_grads(objective, "fused", hc, hr, **hyper)):
        assert torch.equal(first, second)


# ----------------------------------------------------------------------------------------------
# N = 1: every objective is Bradley–Terry


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_output_is_bradley_terry_in_every_reference(dtype):
    hc, hr = (h.requires_grad_() for h in pairs(200, 1, dtype, seed=5, scale=30.0))
    want = references.bradley_terry_reference(hc, hr)
    assert torch.equal(want, -F.logsigmoid(hc[:, 0] - hr[:, 0]))
    want_grads = torch.autograd.grad(want.sum(), [hc, hr])
    for reference in (references.mixture_reference, references.independent_reference,
                      lambda a, b: references.paper_reference(a, b, lam=0.0)):
        got = reference(hc, hr)
        assert torch.equal(got, want)
        for g, w in zip(torch.autograd.grad(got.sum(), [hc, hr]), want_grads):
            assert torch.equal(g, w)


@fused
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_one_output_is_bradley_terry_in_every_fused_op(dtype):
    """Bit for bit: the scalar head trains the same through mixture_loss (bradley_terry's op),
    independent_loss or paper_loss with lam = 0."""
    hc, hr = pairs(300, 1, dtype, seed=6, scale=40.0)
    want = op_call("mixture", hc, hr)
    for got in (op_call("independent", hc, hr), op_call("paper", hc, hr, lam=0.0)):
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    loss, grad_c, grad_r = want
    assert torch.equal(grad_r, -grad_c)
    # and Bradley–Terry, to the rounding of libm's exp/log1p against torch's vectorised ones
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    d = (hc[:, 0].to(acc) - hr[:, 0].to(acc)).double()  # rounded as the kernel rounds it
    rtol = 1e-15 if dtype == torch.float64 else 3e-7
    tiny = torch.finfo(acc).tiny  # below it float32 flushes what float64 still holds
    torch.testing.assert_close(loss.double(), -F.logsigmoid(d), rtol=rtol, atol=tiny)
    grad_rtol = 2.0**-7 if dtype == torch.bfloat16 else rtol  # one rounding to bfloat16 each
    torch.testing.assert_close(grad_c.double()[:, 0], -torch.sigmoid(-d).to(dtype).double(), rtol=grad_rtol,
                               atol=tiny)
    # pair_loss's bradley_terry is that op
    through = pair_loss(hc, hr, "bradley_terry", "none", impl="fused")
    assert torch.equal(through, loss)


def test_bradley_terry_needs_one_output():
    with pytest.raises(ValueError) as info:
        pair_loss(torch.zeros(2, 3), torch.zeros(2, 3), "bradley_terry")
    assert str(info.value) == ("objective 'bradley_terry' is the scalar head's, N = 1, but h_chosen has shape "
                               "[2, 3]; for N outputs use mixture, independent or paper")


def test_quantile_levels():
    assert torch.allclose(quantile_levels(10), torch.linspace(0.05, 0.95, 10))
    assert quantile_levels(1).tolist() == [0.5]
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        quantile_levels(0)


# ----------------------------------------------------------------------------------------------
# The ops: autograd, torch.library, torch.compile, layouts


@fused
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradcheck(objective):
    """torch.autograd.gradcheck compares with finite differences of L itself. mixture and
    independent are plain functions; paper's spec gradient deliberately is not dL/dq when lam > 0
    (its targets are detached, as in QR-DQN), so there it runs at lam = 0, where the targets do
    not matter; the tests above check paper's op against the spec's formula, and that formula
    against finite differences taken with the targets held fixed."""
    hc, hr = pairs(4, 3, seed=11)
    hc.requires_grad_()
    hr.requires_grad_()
    hyper = {"kappa": 0.8, "lam": 0.0, "margin": 0.5} if objective == "paper" else {}

    def f(a, b):
        return pair_loss(a, b, objective, "none", "fused", **hyper)

    assert torch.autograd.gradcheck(f, (hc, hr))


@fused
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_opcheck(objective):
    op = getattr(torch.ops.minqr, loss.OBJECTIVES[objective].op).default
    hyper = {"paper": [(1.0, 1.0, 1.0), (0.5, 0.0, -1.0), (2.0, 0.5, 0.0)]}.get(objective, [()] * 3)
    samples = [
        (*pairs(5, 10, torch.float32, seed=1), *hyper[0], "none", True),
        (*pairs(3, 1, torch.float64, seed=2), *hyper[1], "mean", True),
        (*[h.t().contiguous().t() for h in pairs(4, 7, seed=3)], *hyper[2], "sum", False),
        (*pairs(6, 3, torch.bfloat16, seed=4), *hyper[0], "mean", True),
        (*pairs(1, 2, torch.float32, seed=5), *hyper[1], "sum", True),
    ]
    for hc, hr, *rest in samples:
        hc.requires_grad_(rest[-1])
        hr.requires_grad_(rest[-1])
        torch.library.opcheck(op, (hc, hr, *rest))


@fused
def test_opcheck_loss_backward():
    grad_c, grad_r = pairs(5, 7, torch.float32, seed=9)
    samples = [(grad_loss, "none") for grad_loss in (torch.rand(5), torch.full((5,), 0.2), torch.ones(()).expand(5))]
    samples += [(torch.tensor(0.7), "mean"), (torch.tensor(-1.5), "sum")]
    for grad_loss, reduction in samples:
        torch.library.opcheck(torch.ops.minqr.loss_backward.default, (grad_loss, grad_c, grad_r, reduction))
    # saved gradients with transposed strides: the fake op gives the contiguous layout the kernel returns
    grad_c, grad_r = (g.t().contiguous().t() for g in pairs(5, 7, torch.float32, seed=10))
    torch.library.opcheck(torch.ops.minqr.loss_backward.default, (torch.tensor(0.7), grad_c, grad_r, "mean"))


@fused
@pytest.mark.parametrize("objective,dynamic", [("mixture", False), ("independent", False),
                                               ("paper", False), ("mixture", True)])
def test_torch_compile_fullgraph(objective, dynamic):
    hc, hr = pairs(64, 10, torch.float32, seed=5)
    hyper = hyper_for(objective, 2)
    want, want_gc, want_gr = loss_and_grads(objective, "fused", hc, hr, "mean", **hyper)
    compiled = torch.compile(pair_loss, fullgraph=True, dynamic=dynamic)
    hc.requires_grad_()
    hr.requires_grad_()
    got = compiled(hc, hr, objective, impl="fused", **hyper)
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(hc.grad, want_gc)
    torch.testing.assert_close(hr.grad, want_gr)
    # and against the spec written out, independently of the eager op
    loss, gc, gr = oracle(objective, hc, hr, **hyper)
    assert_close(got, np.mean(loss), 1e-5)
    assert_close(hc.grad, gc / hc.shape[0], 1e-5)
    assert_close(hr.grad, gr / hc.shape[0], 1e-5)


@fused
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_second_derivative_is_refused_not_zero(objective):
    hc, hr = (h.requires_grad_() for h in pairs(4, 5, seed=21))
    hyper = hyper_for(objective)
    loss = pair_loss(hc, hr, objective, impl="fused", **hyper)
    with pytest.raises(RuntimeError, match=r"no second derivative.*impl='reference'"):
        torch.autograd.grad(loss, (hc, hr), create_graph=True)
    # the reference has one (a gradient penalty through it is not zero)
    ref = pair_loss(hc, hr, objective, impl="reference", **hyper)
    (gc, _) = torch.autograd.grad(ref, (hc, hr), create_graph=True)
    assert torch.autograd.grad(gc.pow(2).sum(), hc)[0].abs().sum() > 0


def strided_views(hc, hr):
    """The same values as views that require grad: every other column, and a transpose."""
    wide = torch.zeros(hc.shape[0], 2 * hc.shape[1], dtype=hc.dtype, device=hc.device)
    wide[:, ::2] = hc
    wide.requires_grad_()
    tall = hr.t().contiguous().requires_grad_()
    views = (wide[:, ::2], tall.t())
    assert not any(h.is_contiguous() for h in views)
    return views


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_non_contiguous_inputs(impl, objective):
    hc, hr = pairs(30, 16, torch.float32, seed=9)
    hyper = hyper_for(objective)
    want = loss_and_grads(objective, impl, hc, hr, **hyper)
    got = loss_and_grads(objective, impl, *strided_views(hc, hr), **hyper)
    # The fused ops copy strided inputs once: bit-identical. The reference's reductions may
    # sum strided data in another order.
    tol = 0 if impl == "fused" else 1e-6
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_no_pairs(impl, objective, reduction):
    hc = torch.zeros(0, 4, requires_grad=True)
    hr = torch.zeros(0, 4, requires_grad=True)
    out = pair_loss(hc, hr, objective, reduction, impl)
    assert out.shape == ((0,) if reduction == "none" else ()) and out.sum().item() == 0
    out.sum().backward()
    assert hc.grad.shape == (0, 4) and hr.grad.shape == (0, 4)


@fused
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_no_grad_forward_skips_gradients(objective):
    hc, hr = pairs(20, 10, torch.float32)
    hyper = hyper_for(objective)
    loss, gc, gr = op_call(objective, hc, hr, False, **hyper)
    assert gc.shape == gr.shape == (0,)
    assert torch.equal(loss, op_call(objective, hc, hr, True, **hyper)[0])
    with torch.no_grad():
        assert torch.equal(pair_loss(hc, hr, objective, "none", "fused", **hyper), loss)
    hc.requires_grad_()
    loss, _, _ = op_call(objective, hc, hr, False, **hyper)
    with pytest.raises(RuntimeError, match="ran with compute_grad=False"):
        loss.sum().backward()


# ----------------------------------------------------------------------------------------------
# Bad input: the same error type and message from every implementation


def _h(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


BAD = [  # (objective, h_chosen, h_rejected, kwargs, error type, message)
    *[(objective, *case) for objective in OBJECTIVES for case in [
        (_h(2, 3, dtype=torch.int64), _h(2, 3), {}, TypeError,
         "h_chosen must be a float16, bfloat16, float32 or float64 tensor, got torch.int64"),
        (_h(2, 3), _h(2, 3, dtype=torch.complex64), {}, TypeError,
         "h_rejected must be a float16, bfloat16, float32 or float64 tensor, got torch.complex64"),
        (_h(2, 3), _h(2, 3, dtype=torch.float64), {}, TypeError,
         "h_chosen and h_rejected must have the same dtype, got torch.float32 and torch.float64"),
        ([[0.0]], _h(1, 1), {}, TypeError, "h_chosen must be a torch.Tensor, got list"),
        (_h(3), _h(3), {}, ValueError, "h_chosen must have shape [B, N] (2 dimensions), got shape [3]"),
        (_h(2, 3), _h(2, 3, 1), {}, ValueError,
         "h_rejected must have shape [B, N] (2 dimensions), got shape [2, 3, 1]"),
        (_h(2, 3), _h(2, 4), {}, ValueError,
         "h_chosen and h_rejected must have the same shape, got [2, 3] and [2, 4]"),
        (_h(2, 0), _h(2, 0), {}, ValueError, "h_chosen must have N >= 1 outputs (shape [B, N]), got shape [2, 0]"),
        (_h(2, 3), _h(2, 3, device="meta"), {}, ValueError,
         "h_chosen and h_rejected must be on the same device, got cpu and meta"),
        (_h(0, 3), _h(0, 3), {}, ValueError,
         "h_chosen must have B >= 1 pairs for reduction='mean' (the mean of no pairs is undefined), "
         "got shape [0, 3]"),
        (_h(2, 3), _h(2, 3), {"reduction": "avg"}, ValueError,
         "reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
        (_h(2, 3), _h(2, 3), {"impl": "cuda"}, ValueError,
         "impl must be one of 'auto', 'fused', 'reference', got 'cuda'"),
    ]],
    ("paper", _h(2, 3), _h(2, 3), {"kappa": 0.0}, ValueError, "kappa must be finite and > 0, got 0"),
    ("paper", _h(2, 3), _h(2, 3), {"kappa": -1.5}, ValueError, "kappa must be finite and > 0, got -1.5"),
    ("paper", _h(2, 3), _h(2, 3), {"kappa": math.inf}, ValueError, "kappa must be finite and > 0, got inf"),
    ("paper", _h(2, 3), _h(2, 3), {"kappa": math.nan}, ValueError, "kappa must be finite and > 0, got nan"),
    ("paper", _h(2, 3), _h(2, 3), {"lam": -0.25}, ValueError, "lam must be finite and >= 0, got -0.25"),
    ("paper", _h(2, 3), _h(2, 3), {"lam": math.nan}, ValueError, "lam must be finite and >= 0, got nan"),
    ("paper", _h(2, 3), _h(2, 3), {"margin": -math.inf}, ValueError, "margin must be finite, got -inf"),
    ("paper", _h(2, 3), _h(2, 3), {"kappa": "1"}, TypeError, "kappa must be a real number, got str"),
    # the hyper-parameters are checked before the reduction, everywhere
    ("paper", _h(0, 3), _h(0, 3), {"kappa": -1.0}, ValueError, "kappa must be finite and > 0, got -1"),
    ("paper", _h(2, 3), _h(2, 3), {"lam": -1.0, "reduction": "avg"}, ValueError, "lam must be finite and >= 0, got -1"),
    ("paper", _h(2, 3), _h(2, 3), {"lam": True}, TypeError, "lam must be a real number, got bool"),
    ("mixture", _h(2, 3), _h(2, 3), {"kappa": 1.0}, TypeError,
     "objective 'mixture' takes the hyper-parameters none, got ['kappa']"),
]


@pytest.mark.parametrize("objective,hc,hr,kwargs,error,message", BAD)
def test_bad_input_same_error_everywhere(objective, hc, hr, kwargs, error, message):
    impls = ["reference", "auto"] + (["fused"] if ops.fused_available() else [])
    for impl in impls:
        call = {"impl": impl, **kwargs}
        with pytest.raises(error) as info:
            pair_loss(hc, hr, objective, **call)
        assert str(info.value) == message, impl
    # The op itself (C++ checks on CPU, the fake kernel on meta), where its schema admits the
    # arguments: tensors, numbers and a reduction, no impl.
    spec = loss.OBJECTIVES[objective]
    reduction = kwargs.get("reduction", "mean")
    hyper = {**spec.hyperparameters, **{k: v for k, v in kwargs.items() if k != "reduction"}}
    admissible = (
        ops.fused_available()
        and isinstance(hc, torch.Tensor)
        and set(kwargs) <= {*spec.hyperparameters, "reduction"}
        and all(isinstance(x, float) for x in hyper.values())
    )
    if admissible:
        args = (*(hyper[k] for k in spec.hyperparameters), reduction, True)
        op = getattr(torch.ops.minqr, spec.op)
        on_meta = [(hc.to("meta"), hr.to("meta"))] if hr.device.type == "cpu" else []
        for a, b in [(hc, hr)] + on_meta:
            with pytest.raises(error) as info:
                op(a, b, *args)
            assert str(info.value) == message


# ----------------------------------------------------------------------------------------------
# Dispatch


@pytest.fixture
def unbuilt(monkeypatch):
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "IMPORT_ERROR", ImportError("no module named minqr._C"))
    monkeypatch.setattr(ops, "DEVICE_TYPES", {op: frozenset() for op in ops.OPS})
    monkeypatch.setattr(loss, "_warned", set())


def test_fused_when_not_built_raises(unbuilt):
    assert not ops.fused_available()
    with pytest.raises(RuntimeError, match="impl='fused': the fused loss kernels .* not built"):
        pair_loss(_h(2, 3), _h(2, 3), "mixture", impl="fused")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_auto_warns_once_and_uses_reference(unbuilt, objective):
    hc, hr = pairs(5, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = pair_loss(hc, hr, objective)
        second = pair_loss(hc, hr, objective)
    assert len(caught) == 1 and "not built" in str(caught[0].message)
    assert torch.equal(first, pair_loss(hc, hr, objective, impl="reference")) and torch.equal(first, second)


def test_auto_on_a_device_without_kernel_uses_reference(monkeypatch):
    monkeypatch.setattr(loss, "_warned", set())
    hc, hr = _h(3, 4, device="meta"), _h(3, 4, device="meta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pair_loss(hc, hr, "independent", "none")
        pair_loss(hc, hr, "independent")
    assert len(caught) == 1 and "device type 'meta'" in str(caught[0].message)
    assert out.shape == (3,) and out.device.type == "meta"


@fused
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_auto_uses_fused_on_cpu(monkeypatch, objective):
    calls = []
    monkeypatch.setitem(loss.OBJECTIVES, objective, dataclasses.replace(
        loss.OBJECTIVES[objective], reference=lambda *a, **k: calls.append(1)))
    pair_loss(_h(2, 3), _h(2, 3), objective)
    assert calls == []


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@cuda
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,n", [(1, 1), (3, 7), (1000, 10), (257, 64), (5, 300)])
def test_cuda_matches_oracle(objective, dtype, b, n):
    hyper = hyper_for(objective, b + n)
    hc, hr = pairs(b, n, dtype, seed=b + n)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    go = torch.randn(b, dtype=acc)
    loss, gc, gr = loss_and_grads(objective, "fused", hc.cuda(), hr.cuda(), "none", go.cuda(), **hyper)
    want_loss, want_gc, want_gr = oracle(objective, hc, hr, **hyper)
    go = go.double().numpy()[:, None]
    assert_close(loss.cpu(), want_loss, TOLERANCE[acc])
    assert_close(gc.cpu(), go * want_gc, TOLERANCE[dtype])
    assert_close(gr.cpu(), go * want_gr, TOLERANCE[dtype])


@cuda
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_cuda_layouts_extremes_and_empty(objective):
    hyper = hyper_for(objective)
    hc, hr = pairs(100, 10, torch.float32, seed=4)
    want = loss_and_grads(objective, "fused", hc, hr, **hyper)
    strided = strided_views(hc.cuda(), hr.cuda())
    for g, w in zip(loss_and_grads(objective, "fused", *strided, **hyper), want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)
    huge = torch.full((4, 10), 300.0, device="cuda")
    for x in loss_and_grads(objective, "fused", huge, -huge, **hyper) + loss_and_grads(
            objective, "fused", -huge, huge, **hyper):
        assert torch.isfinite(x).all()
    one = pairs(50, 1, torch.float32, seed=3)
    assert torch.equal(op_call("mixture", *(h.cuda() for h in one))[0],
                       op_call("independent", *(h.cuda() for h in one))[0])
    empty = pair_loss(_h(0, 4, device="cuda"), _h(0, 4, device="cuda"), objective, "none", "fused", **hyper)
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="same device"):
        pair_loss(_h(2, 3, device="cuda"), _h(2, 3), objective, impl="fused", **hyper)


# ----------------------------------------------------------------------------------------------
# Pair margins (the data's `margin` column, TRL's -log sigma(r_c - r_r - m)): each objective written
# out by hand in float64. bradley_terry, mixture and independent compare sigma(c_i - r_j - m); paper
# takes m in its Bradley-Terry term on the means only, not in its quantile-Huber targets.

MARGIN_OBJECTIVES = ("bradley_terry", *OBJECTIVES)
PAIR_MARGINS = [0.0, 0.5, -1.0, 2.0, 3.5, -0.25]
MARGIN_PAPER = {"kappa": 0.5, "lam": 0.3, "margin": 1.0}


def pair_margin_by_hand(objective, hc, hr, margins, kappa=1.0, lam=1.0, margin=1.0):
    """(loss [B], dL/dh_c [B, N], dL/dh_r [B, N]) with pair margins, Python floats."""
    losses, grads_c, grads_r = [], [], []
    for c, r, m in zip(hc, hr, margins):
        n = len(c)
        if objective in ("bradley_terry", "mixture"):  # bradley_terry is the mixture at N = 1
            terms = [sigmoid(c[i] - r[i] - m) for i in range(n)]
            losses.append(-math.log(sum(terms) / n))
            # dL/dc_i = -sigma_i (1 - sigma_i) / sum_k sigma_k
            grads_c.append([-t * (1 - t) / sum(terms) for t in terms])
            grads_r.append([t * (1 - t) / sum(terms) for t in terms])
        elif objective == "independent":
            terms = [[sigmoid(c[i] - r[j] - m) for j in range(n)] for i in range(n)]
            total = sum(map(sum, terms))
            losses.append(-math.log(total / n**2))
            grads_c.append([-sum(t * (1 - t) for t in terms[i]) / total for i in range(n)])
            grads_r.append([sum(terms[i][j] * (1 - terms[i][j]) for i in range(n)) / total for j in range(n)])
        else:
            # the quantile-Huber term and its gradients: paper's oracle at lam = 1 less its pairwise term
            full, with_c, with_r = paper_loops([c], [r], kappa, 1.0, margin)
            pairwise, pair_c, pair_r = paper_loops([c], [r], kappa, 0.0, margin)
            d = sum(c) / n - sum(r) / n
            losses.append(-log_sigmoid(d - m) + lam * (full[0] - pairwise[0]))
            grads_c.append([-sigmoid(-(d - m)) / n + lam * (with_c[0][i] - pair_c[0][i]) for i in range(n)])
            grads_r.append([sigmoid(-(d - m)) / n + lam * (with_r[0][i] - pair_r[0][i]) for i in range(n)])
    return losses, grads_c, grads_r


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("objective", MARGIN_OBJECTIVES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_pair_margin_against_hand_computation(impl, objective, dtype, reduction):
    n = 1 if objective == "bradley_terry" else 5
    hc, hr = pairs(len(PAIR_MARGINS), n, dtype, seed=11)
    hyper = MARGIN_PAPER if objective == "paper" else {}
    margins = torch.tensor(PAIR_MARGINS, dtype=dtype)
    losses, grads_c, grads_r = pair_margin_by_hand(objective, hc.double().tolist(), hr.double().tolist(),
                                                   PAIR_MARGINS, **hyper)
    # (paper's fused op returns the pairs' losses and pair_loss reduces them after the margin's
    # change; the others' ops reduce the shifted pairs themselves)
    scale = 1 / len(PAIR_MARGINS) if reduction == "mean" else 1.0
    reduce = {"none": np.asarray, "mean": np.mean, "sum": np.sum}[reduction]
    want = (reduce(losses), scale * np.asarray(grads_c), scale * np.asarray(grads_r))
    got = loss_and_grads(objective, impl, hc, hr, reduction, pair_margin=margins, **hyper)
    for g, w in zip(got, want):
        assert_close(g, w, TOLERANCE[dtype])
    # the margins matter: the loss without them is another
    without = pair_loss(hc, hr, objective, "none", impl, **hyper)
    assert not np.allclose(without.double().numpy(), losses, rtol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("objective", MARGIN_OBJECTIVES)
def test_zero_pair_margins_change_nothing(impl, objective):
    hc, hr = pairs(7, 1 if objective == "bradley_terry" else 4, torch.float32, seed=12)
    hyper = MARGIN_PAPER if objective == "paper" else {}
    with_zeros = loss_and_grads(objective, impl, hc, hr, pair_margin=torch.zeros(7), **hyper)
    for got, want in zip(with_zeros, loss_and_grads(objective, impl, hc, hr, **hyper)):
        assert torch.equal(got, want)


def test_pair_margin_shape_is_checked():
    hc, hr = pairs(3, 4)
    with pytest.raises(ValueError, match=r"^pair_margin must have shape \[B\] = \[3\], got \[3, 1\]$"):
        pair_loss(hc, hr, "mixture", pair_margin=torch.zeros(3, 1, dtype=torch.float64))


@pytest.mark.parametrize("objective", sorted(loss.OBJECTIVES))
def test_the_pair_model_is_the_likelihood_the_objective_trains(objective):
    """Each objective's pair model (minqr/objectives/pair_models.py), read by the statistics'
    preference P(y ≻ y0), is the likelihood its loss maximises: loss = −log P(chosen ≻ rejected)
    (paper's with lam = 0, its Bradley-Terry term alone)."""
    from minqr.distribution.statistics import statistic_values

    spec = loss.OBJECTIVES[objective]
    assert spec.pair_model in ("kinds", "draws", "means")
    n = 1 if spec.one_output else 6
    chosen, rejected = torch.randn(2, 16, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    hyper = {"lam": 0.0} if "lam" in spec.hyperparameters else {}
    per_pair = pair_loss(chosen, rejected, objective=objective, reduction="none", impl="reference", **hyper)
    preference = statistic_values("preference", chosen, reference=rejected, objective=objective)
    torch.testing.assert_close(-torch.log(preference), per_pair, rtol=1e-10, atol=1e-12)
