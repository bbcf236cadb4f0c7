"""Speed of every objective's loss, forward+backward: the fused op against the eager PyTorch
reference and torch.compile of it, on CPU and (when present) CUDA. `pytest benchmarks/test_loss_speed.py`.

Each cell (objective, device, dtype, B, N) is a pytest-benchmark group of up to three tests (fused,
eager, compiled), each timing minqr.pair_loss then torch.autograd.grad; the median and best ratios
and, on the GPU, the bandwidth against the floor are printed at the end (benchmarks/conftest.py).
The targets are ratios of the implementations timed side by side in this run, which
test_the_loss_targets checks last. Test ids read like `mixture-cpu-float32-B4096-N10-fused`, so
`-k "B4096 and float32 or targets"` selects the target cells and their check; MINQR_BENCH_QUICK=1
runs only those. Every timed result is then checked against the float64 reference.

independent and paper's references materialise [B, N, N] tensors (several of them, with their
gradients), so eager and compiled run only where B*N*N stays below a per-device limit: beyond it
they would need tens of GB (B = 1,048,576, N = 64: 17 GB per float32 tensor). The fused ops run
everywhere.
"""
import os
import time

import pytest
import torch

from minqr.objectives import ops
from minqr.objectives.loss import OBJECTIVES, pair_loss

# inductor still imports torch.jit pieces that warn
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

QUICK = os.environ.get("MINQR_BENCH_QUICK") == "1"
LOSSES = ("mixture", "independent", "paper")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32] if QUICK else [torch.float32, torch.bfloat16]
BATCHES = [4096] if QUICK else [64, 4096, 65536, 1048576]
OUTPUTS = [10, 32, 64]
IMPLS = ["fused", "eager", "compiled"]
REFERENCE_LIMIT = {"cpu": 2**24, "cuda": 2**28}  # elements the reference may materialise per tensor
SECONDS_PER_CELL = {"cpu": 1.0, "cuda": 0.5}  # timing budget per test, warm-up excluded
# The performance targets (docs/design.md#targets): fused forward+backward at least this many times
# faster than the eager and the compiled reference, at B = 4096, float32, every N, by the median as
# well as the best round.
TARGET_BATCH = 4096
TARGETS = {"cpu": {"eager": 10.0, "compiled": 2.0}, "cuda": {"eager": 20.0, "compiled": 3.0}}


def _loss_fn(objective, impl):
    if impl == "fused":
        return lambda a, b: pair_loss(a, b, objective, impl="fused")
    if impl == "eager":
        return lambda a, b: pair_loss(a, b, objective, impl="reference")
    torch._dynamo.reset()  # a fresh compile per cell: no recompile limit, no dynamic shapes
    return torch.compile(lambda a, b: pair_loss(a, b, objective, impl="reference"), dynamic=False)


def _reference_elements(objective, b, n):
    return b * n if objective == "mixture" else b * n * n


def _params():
    for objective in LOSSES:
        for device in DEVICES:
            for dtype in DTYPES:
                for b in BATCHES:
                    for n in OUTPUTS:
                        for impl in IMPLS:
                            name = f"{objective}-{device}-{str(dtype).removeprefix('torch.')}-B{b}-N{n}-{impl}"
                            yield pytest.param(objective, device, dtype, b, n, impl, id=name)


@pytest.mark.parametrize("objective,device,dtype,b,n,impl", list(_params()))
def test_loss_speed(benchmark, loss_speed_results, objective, device, dtype, b, n, impl):
    op = OBJECTIVES[objective].op
    if impl == "fused" and device not in ops.DEVICE_TYPES[op]:
        pytest.skip(f"minqr._C is not built, or has no {device} kernel for {op}")
    if impl != "fused" and _reference_elements(objective, b, n) > REFERENCE_LIMIT[device]:
        pytest.skip(f"the reference would materialise {_reference_elements(objective, b, n):,} elements per tensor")
    g = torch.Generator().manual_seed(0)
    hc = torch.randn(b, n, generator=g).to(device=device, dtype=dtype).requires_grad_()
    hr = torch.randn(b, n, generator=g).to(device=device, dtype=dtype).requires_grad_()
    loss_fn = _loss_fn(objective, impl)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        loss = loss_fn(hc, hr)
        grads = torch.autograd.grad(loss, (hc, hr))
        sync()  # CUDA: the time of the work, not of queueing it
        return loss, grads

    step()  # warm-up: compiles, allocator, caches
    start = time.perf_counter()
    step()
    once = time.perf_counter() - start
    rounds = max(5, min(400, int(SECONDS_PER_CELL[device] / max(once, 1e-6))))
    benchmark.group = f"{objective} {device} {str(dtype).removeprefix('torch.')} B={b} N={n}"
    loss, (grad_c, grad_r) = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    # Both the median and the best round: on a shared machine the median also measures the
    # neighbours (an OpenMP team waits for its slowest, descheduled thread), the best round
    # what the code can do; on a quiet one the two agree closely.
    stats = benchmark.stats.stats
    loss_speed_results[(objective, device, dtype, b, n)][impl] = (stats.median, stats.min)

    _check_against_reference(objective, hc, hr, loss, grad_c, grad_r)


def _check_against_reference(objective, hc, hr, loss, grad_c, grad_r):
    """The timed result against the float64 reference: gradients of the first rows (pairs are
    independent), the mean loss where the reference fits in memory."""
    b, n = hc.shape
    rows = min(b, 2048)
    reference = OBJECTIVES[objective].reference
    h64 = [h.detach()[:rows].double().cpu().requires_grad_() for h in (hc, hr)]
    ref = reference(*h64).sum() / b
    ref_gc, ref_gr = torch.autograd.grad(ref, h64)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2**-7}[hc.dtype]
    for got, want in ((grad_c[:rows], ref_gc), (grad_r[:rows], ref_gr)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol * scale)
    if _reference_elements(objective, b, n) <= 2**22:
        h64 = [h.detach().double().cpu() for h in (hc, hr)]
        want = reference(*h64).mean()
        torch.testing.assert_close(loss.double().cpu(), want, rtol=1e-5, atol=0)


def test_the_loss_targets(loss_speed_results):
    """The fused op against the references timed beside it in this run, in the target cells
    (runs after the cells: pytest keeps the file's order)."""
    checked, missed = 0, []
    for (objective, device, dtype, b, n), times in sorted(loss_speed_results.items(), key=lambda kv: str(kv[0])):
        fused = times.get("fused")
        if b != TARGET_BATCH or dtype != torch.float32 or fused is None:
            continue
        for name, target in TARGETS[device].items():
            slow = times.get(name)
            if slow is None:
                continue
            checked += 1
            ratio = min(slow[0] / fused[0], slow[1] / fused[1])  # the median's and the best round's
            if ratio < target:
                missed.append(f"{objective} {device} N={n}: {ratio:.1f}x {name}, target {target:g}x")
    if not checked:
        pytest.skip("no target cell ran (B=4096, float32, fused beside eager or compiled)")
    assert not missed, "loss speed targets missed: " + "; ".join(missed)
