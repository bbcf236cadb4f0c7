"""The loss: fused op and PyTorch reference against the spec (../shared/DESIGN.md, "The loss").

Two oracles are written here, independent of minqr/loss.py: `spec_loops` spells the DESIGN
formulas out with Python floats (per pair, per i, per j, gradients included), and `spec_numpy`
vectorises the same formulas in NumPy float64 for the sizes where loops are too slow; the first
checks the second.
"""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minqr
from minqr import loss as loss_module
from minqr import ops
from minqr.loss import qr_pairwise_loss, qr_pairwise_loss_reference, quantile_levels

# torch's own opcheck and inductor still import torch.jit pieces that warn.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

fused = pytest.mark.skipif(not minqr.fused_available(), reason="minqr._C is not built")
cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in ops.DEVICE_TYPES,
    reason="no CUDA device, or minqr._C built without its CUDA kernel",
)


# ----------------------------------------------------------------------------------------------
# Oracles


def spec_loops(qc, qr, kappa, lam, margin, qc_target=None, qr_target=None):
    """Per-pair loss and both gradients, straight from DESIGN.md, in Python floats.

    The targets default to the inputs; passing them separately lets a finite difference move the
    predictions alone, which is what "targets detached" means.
    """
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
        l_pair = max(-d, 0.0) + math.log1p(math.exp(-abs(d)))  # softplus(-d)
        sig = math.exp(-max(d, 0.0)) / (math.exp(-max(d, 0.0)) + math.exp(min(d, 0.0)))  # σ(−d)
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


def spec_numpy(qc, qr, kappa, lam, margin):
    """The same as spec_loops, vectorised in NumPy float64 ([B, i, j] arrays)."""
    qc, qr = np.asarray(qc, np.float64), np.asarray(qr, np.float64)
    n = qc.shape[1]
    tau = ((2 * np.arange(n) + 1) / (2 * n))[None, :, None]
    d = qc.mean(1) - qr.mean(1)
    l_pair = np.logaddexp(0.0, -d)
    sig = 0.5 * (1 - np.tanh(d / 2))  # σ(−d)
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
    return l_pair + lam * l_qr, gc, gr


def spec(qc, qr, kappa, lam, margin):
    qc = qc.detach().double().numpy()
    qr = qr.detach().double().numpy()
    if qc.size * qc.shape[1] <= 4000:
        return spec_loops(qc.tolist(), qr.tolist(), kappa, lam, margin)
    return spec_numpy(qc, qr, kappa, lam, margin)


# ----------------------------------------------------------------------------------------------
# Helpers

IMPLS = [pytest.param("fused", marks=fused), "reference"]
SIZES = [(b, n) for n in (1, 2, 7, 10, 32, 64) for b in (1, 3, 1000)]
# κ, λ, m combinations; inputs scaled so that differences fall on both Huber branches.
PARAMS = [(1.0, 1.0, 1.0), (0.5, 0.3, 0.0), (2.0, 2.0, -0.5), (0.25, 0.0, 1.5)]
TOLERANCE = {  # relative to the largest value compared; halves: their rounding (gradients only)
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}


def pairs(b, n, dtype=torch.float64, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    qc = (scale * torch.randn(b, n, generator=g, dtype=torch.float64)).to(dtype)
    qr = (scale * torch.randn(b, n, generator=g, dtype=torch.float64) - 0.3).to(dtype)
    return qc, qr


def loss_and_grads(impl, qc, qr, kappa, lam, margin, reduction="none", grad_output=None):
    """The loss and the gradients that autograd gives for a grad_output (default: ones).
    Inputs that already require grad (views of a leaf) are used as they are, strides included."""
    if not qc.requires_grad:
        qc = qc.detach().clone().requires_grad_()
        qr = qr.detach().clone().requires_grad_()
    out = qr_pairwise_loss(qc, qr, kappa, lam, margin, reduction, impl=impl)
    go = torch.ones_like(out) if grad_output is None else grad_output
    gc, gr = torch.autograd.grad(out, (qc, qr), go)
    return out.detach(), gc, gr


def assert_close(got, want, rel):
    got = np.asarray(got.detach().double().cpu().numpy() if torch.is_tensor(got) else got)
    want = np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * scale)


# ----------------------------------------------------------------------------------------------
# Against the spec


def test_numpy_oracle_matches_loops():
    for b, n in [(3, 1), (4, 2), (5, 7), (2, 10)]:
        qc, qr = pairs(b, n, seed=b * n)
        for kappa, lam, margin in PARAMS:
            want = spec_loops(qc.tolist(), qr.tolist(), kappa, lam, margin)
            got = spec_numpy(qc.numpy(), qr.numpy(), kappa, lam, margin)
            for g, w in zip(got, want):
                assert_close(g, w, 1e-13)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,n", SIZES)
def test_float64_matches_spec(impl, b, n):
    kappa, lam, margin = PARAMS[(b + n) % len(PARAMS)]
    qc, qr = pairs(b, n, seed=1000 * b + n)
    go = torch.randn(b, dtype=torch.float64, generator=torch.Generator().manual_seed(b + n))
    loss, gc, gr = loss_and_grads(impl, qc, qr, kappa, lam, margin, "none", go)
    want_loss, want_gc, want_gr = spec(qc, qr, kappa, lam, margin)
    go = go.numpy()[:, None]
    assert loss.dtype == torch.float64 and gc.dtype == torch.float64
    assert_close(loss, want_loss, 1e-10)
    assert_close(gc, go * want_gc, 1e-10)
    assert_close(gr, go * want_gr, 1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_reductions_and_dtypes(impl, reduction, dtype):
    b, n = 37, 10
    for seed, (kappa, lam, margin) in enumerate(PARAMS):
        qc, qr = pairs(b, n, dtype, seed=seed)
        loss, gc, gr = loss_and_grads(impl, qc, qr, kappa, lam, margin, reduction)
        per_pair, want_gc, want_gr = spec(qc, qr, kappa, lam, margin)  # on the rounded inputs
        scale = {"mean": 1 / b, "sum": 1.0, "none": 1.0}[reduction]
        want_loss = {"mean": per_pair.mean(), "sum": per_pair.sum(), "none": per_pair}[reduction]
        # The loss is computed and returned in float32 even for halves: float32 accuracy.
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert loss.dtype == acc and gc.dtype == dtype and gr.dtype == dtype
        assert loss.shape == ((b,) if reduction == "none" else ())
        assert_close(loss, want_loss, TOLERANCE[acc])
        assert_close(gc, scale * want_gc, TOLERANCE[dtype])
        assert_close(gr, scale * want_gr, TOLERANCE[dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_at_zero_and_kappa(impl, dtype):
    # Quarter steps: every u, v is exact, and many hit 0 and ±κ exactly, where the weight
    # switches (1{u<0}) and the Huber pieces meet.
    g = torch.Generator().manual_seed(7)
    qc = (torch.randint(-6, 7, (64, 6), generator=g) / 4).to(dtype)
    qr = (torch.randint(-6, 7, (64, 6), generator=g) / 4).to(dtype)
    kappa, lam, margin = 0.5, 1.0, 0.25
    u = (qr[:, None, :] + margin) - qc[:, :, None]
    v = (qc[:, None, :] - margin) - qr[:, :, None]
    for x in (u, v):
        assert (x == 0).any() and (x == kappa).any() and (x == -kappa).any()
    loss, gc, gr = loss_and_grads(impl, qc, qr, kappa, lam, margin)
    want_loss, want_gc, want_gr = spec(qc, qr, kappa, lam, margin)
    for got, want in ((loss, want_loss), (gc, want_gc), (gr, want_gr)):
        assert_close(got, want, TOLERANCE[dtype])


def test_gradient_formula_is_the_derivative_with_detached_targets():
    """DESIGN's gradient formula = finite differences of L moving the predictions only."""
    qc, qr = pairs(2, 5, seed=3)
    qc, qr = qc.tolist(), qr.tolist()
    kappa, lam, margin = 0.7, 1.3, 0.4
    _, gc, gr = spec_loops(qc, qr, kappa, lam, margin)
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
                lp = spec_loops(*args, kappa, lam, margin, **targets)[0][b]
                args = (minus, qr) if side == "c" else (qc, minus)
                lm = spec_loops(*args, kappa, lam, margin, **targets)[0][b]
                assert abs((lp - lm) / (2 * eps) - grad[b][i]) < 1e-7


def test_scalar_head_is_bradley_terry():
    r_c, r_r = pairs(50, 1)
    want = -F.logsigmoid(r_c[:, 0] - r_r[:, 0])
    assert torch.equal(qr_pairwise_loss_reference(r_c, r_r, lam=0.0, reduction="none"), want)
    if minqr.fused_available():
        # The kernel's exp/log1p (libm) and torch's vectorised ones may differ in the last bit.
        for dtype, rtol in ((torch.float64, 1e-15), (torch.float32, 3e-7)):
            a, b = r_c.to(dtype), r_r.to(dtype)
            got = qr_pairwise_loss(a, b, lam=0.0, reduction="none", impl="fused")
            torch.testing.assert_close(got, -F.logsigmoid(a[:, 0] - b[:, 0]), rtol=rtol, atol=0)


def test_quantile_levels():
    assert torch.allclose(quantile_levels(10), torch.linspace(0.05, 0.95, 10))
    assert quantile_levels(1).tolist() == [0.5]
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        quantile_levels(0)


# ----------------------------------------------------------------------------------------------
# The op: autograd, torch.library, torch.compile, layouts


@fused
def test_gradcheck():
    """torch.autograd.gradcheck compares with finite differences of L itself, so it can hold only
    where the detached targets do not matter: lam = 0 (the pairwise term, N > 1). With lam > 0 the
    spec's gradient is deliberately not dL/dq (the targets' dependence is cut, as in QR-DQN); the
    tests above check the op against the spec's formula and that formula against finite
    differences taken with the targets held fixed."""
    qc, qr = pairs(4, 3, seed=11)
    qc.requires_grad_()
    qr.requires_grad_()

    def f(a, b):
        return qr_pairwise_loss(a, b, kappa=0.8, lam=0.0, margin=0.5, reduction="none",
                                impl="fused")

    assert torch.autograd.gradcheck(f, (qc, qr))


@fused
def test_opcheck():
    op = torch.ops.minqr.qr_pairwise_loss.default
    samples = [
        (*pairs(5, 10, torch.float32, seed=1), 1.0, 1.0, 1.0, True),
        (*pairs(3, 1, torch.float64, seed=2), 0.5, 0.0, -1.0, True),
        (*[q.t().contiguous().t() for q in pairs(4, 7, seed=3)], 2.0, 0.5, 0.0, False),
    ]
    for qc, qr, *rest in samples:
        qc.requires_grad_(rest[-1])
        qr.requires_grad_(rest[-1])
        torch.library.opcheck(op, (qc, qr, *rest))


@fused
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    qc, qr = pairs(64, 10, torch.float32, seed=5)
    want, want_gc, want_gr = loss_and_grads("fused", qc, qr, 0.9, 1.1, 0.7, "mean")
    compiled = torch.compile(qr_pairwise_loss, fullgraph=True, dynamic=dynamic)
    qc.requires_grad_()
    qr.requires_grad_()
    got = compiled(qc, qr, 0.9, 1.1, 0.7, impl="fused")
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(qc.grad, want_gc)
    torch.testing.assert_close(qr.grad, want_gr)
    # and against the spec written out, independently of the eager op
    loss, gc, gr = spec(qc, qr, 0.9, 1.1, 0.7)
    assert_close(got, np.mean(loss), 1e-5)
    assert_close(qc.grad, np.asarray(gc) / qc.shape[0], 1e-5)
    assert_close(qr.grad, np.asarray(gr) / qc.shape[0], 1e-5)


@fused
def test_second_derivative_is_refused_not_zero():
    qc, qr = (q.requires_grad_() for q in pairs(4, 5, seed=21))
    loss = qr_pairwise_loss(qc, qr, impl="fused")
    with pytest.raises(RuntimeError, match="no second derivative.*impl='reference'"):
        torch.autograd.grad(loss, (qc, qr), create_graph=True)
    # the reference has one (a gradient penalty through it is not zero)
    ref = qr_pairwise_loss(qc, qr, impl="reference")
    (gc, _) = torch.autograd.grad(ref, (qc, qr), create_graph=True)
    assert torch.autograd.grad(gc.pow(2).sum(), qc)[0].abs().sum() > 0


def strided_views(qc, qr):
    """The same values as views that require grad: every other column, and a transpose."""
    wide = torch.zeros(qc.shape[0], 2 * qc.shape[1], dtype=qc.dtype, device=qc.device)
    wide[:, ::2] = qc
    wide.requires_grad_()
    tall = qr.t().contiguous().requires_grad_()
    views = (wide[:, ::2], tall.t())
    assert not any(q.is_contiguous() for q in views)
    return views


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    qc, qr = pairs(30, 16, torch.float32, seed=9)
    want = loss_and_grads(impl, qc, qr, 1.0, 1.0, 1.0)
    got = loss_and_grads(impl, *strided_views(qc, qr), 1.0, 1.0, 1.0)
    # The fused op copies strided inputs once: bit-identical. The reference's reductions may
    # sum strided data in another order.
    tol = 0 if impl == "fused" else 1e-6
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [256, 300])
def test_many_quantiles(impl, n):
    qc, qr = pairs(3, n, seed=n)
    loss, gc, gr = loss_and_grads(impl, qc, qr, 1.0, 0.5, 1.0)
    for got, want in zip((loss, gc, gr), spec_numpy(qc.numpy(), qr.numpy(), 1.0, 0.5, 1.0)):
        assert_close(got, want, 1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_no_pairs(impl, reduction):
    qc = torch.zeros(0, 4, requires_grad=True)
    qr = torch.zeros(0, 4, requires_grad=True)
    out = qr_pairwise_loss(qc, qr, reduction=reduction, impl=impl)
    assert out.shape == ((0,) if reduction == "none" else ()) and out.sum().item() == 0
    out.sum().backward()
    assert qc.grad.shape == (0, 4)


@fused
def test_no_grad_forward_skips_gradients():
    qc, qr = pairs(20, 10, torch.float32)
    loss, gc, gr = torch.ops.minqr.qr_pairwise_loss(qc, qr, 1.0, 1.0, 1.0, False)
    assert gc.shape == gr.shape == (0,)
    with torch.no_grad():
        assert torch.equal(qr_pairwise_loss(qc, qr, reduction="none", impl="fused"), loss)
    qc.requires_grad_()
    loss, _, _ = torch.ops.minqr.qr_pairwise_loss(qc, qr, 1.0, 1.0, 1.0, False)
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.sum().backward()


# ----------------------------------------------------------------------------------------------
# Bad input: the same error type and message from every implementation


def _q(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


BAD = [  # (q_chosen, q_rejected, kwargs, error type, message start)
    (_q(2, 3, dtype=torch.int64), _q(2, 3), {}, TypeError,
     "q_chosen must be a float16, bfloat16, float32 or float64 tensor, got torch.int64"),
    (_q(2, 3), _q(2, 3, dtype=torch.complex64), {}, TypeError,
     "q_rejected must be a float16, bfloat16, float32 or float64 tensor, got torch.complex64"),
    (_q(2, 3), _q(2, 3, dtype=torch.float64), {}, TypeError,
     "q_chosen and q_rejected must have the same dtype, got torch.float32 and torch.float64"),
    ([[0.0]], _q(1, 1), {}, TypeError, "q_chosen must be a torch.Tensor, got list"),
    (_q(3), _q(3), {}, ValueError, "q_chosen must have shape [B, N] (2 dimensions), got shape [3]"),
    (_q(2, 3), _q(2, 3, 1), {}, ValueError,
     "q_rejected must have shape [B, N] (2 dimensions), got shape [2, 3, 1]"),
    (_q(2, 3), _q(2, 4), {}, ValueError,
     "q_chosen and q_rejected must have the same shape, got [2, 3] and [2, 4]"),
    (_q(2, 0), _q(2, 0), {}, ValueError,
     "q_chosen must have N >= 1 quantiles (shape [B, N]), got shape [2, 0]"),
    (_q(2, 3), _q(2, 3, device="meta"), {}, ValueError,
     "q_chosen and q_rejected must be on the same device, got cpu and meta"),
    (_q(2, 3), _q(2, 3), {"kappa": 0.0}, ValueError, "kappa must be finite and > 0, got 0"),
    (_q(2, 3), _q(2, 3), {"kappa": -1.5}, ValueError, "kappa must be finite and > 0, got -1.5"),
    (_q(2, 3), _q(2, 3), {"kappa": math.inf}, ValueError, "kappa must be finite and > 0, got inf"),
    (_q(2, 3), _q(2, 3), {"kappa": math.nan}, ValueError, "kappa must be finite and > 0, got nan"),
    (_q(2, 3), _q(2, 3), {"lam": -0.25}, ValueError, "lam must be finite and >= 0, got -0.25"),
    (_q(2, 3), _q(2, 3), {"lam": math.nan}, ValueError, "lam must be finite and >= 0, got nan"),
    (_q(2, 3), _q(2, 3), {"margin": -math.inf}, ValueError, "margin must be finite, got -inf"),
    (_q(2, 3), _q(2, 3), {"kappa": "1"}, TypeError, "kappa must be a real number, got str"),
    (_q(2, 3), _q(2, 3), {"lam": True}, TypeError, "lam must be a real number, got bool"),
    (_q(0, 3), _q(0, 3), {}, ValueError,
     "q_chosen must have B >= 1 pairs for reduction='mean' (the mean of no pairs is undefined), "
     "got shape [0, 3]"),
    (_q(2, 3), _q(2, 3), {"reduction": "avg"}, ValueError,
     "reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    (_q(2, 3), _q(2, 3), {"impl": "cuda"}, ValueError,
     "impl must be one of 'auto', 'fused', 'reference', got 'cuda'"),
]


@pytest.mark.parametrize("qc,qr,kwargs,error,message", BAD)
def test_bad_input_same_error_everywhere(qc, qr, kwargs, error, message):
    impls = ["reference", "auto"] + (["fused"] if minqr.fused_available() else [])
    for impl in impls:
        call = {"impl": impl, **kwargs}
        with pytest.raises(error) as info:
            qr_pairwise_loss(qc, qr, **call)
        assert str(info.value) == message, impl
    # The op itself (C++ checks on CPU, the fake kernel on meta), where its schema admits the
    # arguments: tensors and numbers, no reduction or impl.
    op_kwargs = {"kappa": 1.0, "lam": 1.0, "margin": 1.0, **kwargs}
    admissible = (
        minqr.fused_available()
        and isinstance(qc, torch.Tensor)
        and set(kwargs) <= {"kappa", "lam", "margin"}
        and all(isinstance(x, float) for x in op_kwargs.values())
        and qc.shape[0] > 0
    )
    if admissible:
        args = (op_kwargs["kappa"], op_kwargs["lam"], op_kwargs["margin"], True)
        on_meta = [(qc.to("meta"), qr.to("meta"))] if qr.device.type == "cpu" else []
        for a, b in [(qc, qr)] + on_meta:
            with pytest.raises(error) as info:
                torch.ops.minqr.qr_pairwise_loss(a, b, *args)
            assert str(info.value) == message


# ----------------------------------------------------------------------------------------------
# Dispatch


@pytest.fixture
def unbuilt(monkeypatch):
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "IMPORT_ERROR", ImportError("no module named minqr._C"))
    monkeypatch.setattr(ops, "DEVICE_TYPES", frozenset())
    monkeypatch.setattr(loss_module, "_warned", set())


def test_fused_when_not_built_raises(unbuilt):
    assert not minqr.fused_available()
    with pytest.raises(RuntimeError, match="impl='fused': the fused loss kernel .* not built"):
        qr_pairwise_loss(_q(2, 3), _q(2, 3), impl="fused")


def test_auto_warns_once_and_uses_reference(unbuilt):
    qc, qr = pairs(5, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = qr_pairwise_loss(qc, qr)
        second = qr_pairwise_loss(qc, qr)
    assert len(caught) == 1 and "not built" in str(caught[0].message)
    assert torch.equal(first, qr_pairwise_loss_reference(qc, qr)) and torch.equal(first, second)


def test_auto_on_a_device_without_kernel_uses_reference(monkeypatch):
    monkeypatch.setattr(loss_module, "_warned", set())
    qc, qr = _q(3, 4, device="meta"), _q(3, 4, device="meta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = qr_pairwise_loss(qc, qr, reduction="none")
        qr_pairwise_loss(qc, qr)
    assert len(caught) == 1 and "device type 'meta'" in str(caught[0].message)
    assert out.shape == (3,) and out.device.type == "meta"


@fused
def test_auto_uses_fused_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(loss_module, "qr_pairwise_loss_reference",
                        lambda *a, **k: calls.append(1))
    qr_pairwise_loss(_q(2, 3), _q(2, 3))
    assert calls == []


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,n", [(1, 1), (3, 7), (1000, 10), (257, 64), (5, 300)])
def test_cuda_matches_spec(dtype, b, n):
    kappa, lam, margin = PARAMS[(b + n) % len(PARAMS)]
    qc, qr = pairs(b, n, dtype, seed=b + n)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    go = torch.randn(b, dtype=acc)
    loss, gc, gr = loss_and_grads("fused", qc.cuda(), qr.cuda(), kappa, lam, margin, "none",
                                  go.cuda())
    want_loss, want_gc, want_gr = spec(qc, qr, kappa, lam, margin)
    go = go.double().numpy()[:, None]
    assert_close(loss.cpu(), want_loss, TOLERANCE[acc])
    assert_close(gc.cpu(), go * want_gc, TOLERANCE[dtype])
    assert_close(gr.cpu(), go * want_gr, TOLERANCE[dtype])


@cuda
def test_cuda_layouts_and_empty():
    qc, qr = pairs(100, 10, torch.float32, seed=4)
    want = loss_and_grads("fused", qc, qr, 1.0, 1.0, 1.0)
    strided = strided_views(qc.cuda(), qr.cuda())
    for g, w in zip(loss_and_grads("fused", *strided, 1.0, 1.0, 1.0), want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)
    empty = qr_pairwise_loss(_q(0, 4, device="cuda"), _q(0, 4, device="cuda"), reduction="none",
                             impl="fused")
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="same device"):
        qr_pairwise_loss(_q(2, 3, device="cuda"), _q(2, 3), impl="fused")
