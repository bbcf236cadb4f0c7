"""The fused loss ops: loads minqr._C (csrc/) and registers what the C++ side leaves to Python.

Every op is declared once in C++ (csrc/ops.cpp's TORCH_LIBRARY block), with a CPU and a CUDA
kernel, and all share one calling convention:

    torch.ops.minqr.<op>(h_chosen, h_rejected, *hyperparameters, reduction, compute_grad)
        -> (loss, grad_chosen [B, N], grad_rejected [B, N])

    paper_loss(h_chosen, h_rejected, kappa, lam, margin, reduction, compute_grad)
    mixture_loss(h_chosen, h_rejected, reduction, compute_grad)
    independent_loss(h_chosen, h_rejected, reduction, compute_grad)

One pass computes each pair's loss (float32, or float64 for float64 inputs) and, with
compute_grad, the gradient of that pair's loss with respect to its own outputs (in the input
dtype; [0]-shaped when compute_grad is false); then the losses are reduced: reduction 'none'
gives them all [B], 'mean' and 'sum' one value []. Their backward, registered in C++
(csrc/autograd.cpp, where a Python one cost 40-50 us more per step), scales those rows by the
gradient of the reduced loss through a fourth op, loss_backward(grad_loss, grad_chosen,
grad_rejected, reduction): no second pass over the pair (csrc/cpu/ has the measurement), and no
autograd node for the mean. The formulas are in minqr/objectives/.

This module registers the fake kernels (shapes, for torch.compile and opcheck) and holds the
argument checks that every implementation runs (minqr.objectives's dispatch and references, the fake
kernels below); csrc/ops.cpp says the same, word for word.
"""
import math
import numbers

import torch

try:
    from minqr import _C  # noqa: F401  (importing it runs the C++ registrations)

    IMPORT_ERROR = None
except ImportError as error:  # a pure-Python install (MINQR_NO_EXT=1) or a failed build
    _C = None
    IMPORT_ERROR = error

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
# op -> its hyper-parameters, in argument order
OPS = {"paper_loss": ("kappa", "lam", "margin"), "mixture_loss": (), "independent_loss": ()}


def _shape(h: torch.Tensor) -> str:
    return str(list(h.shape))  # "[B, N]", as C++ prints sizes


def _hyper(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_outputs(h_chosen, h_rejected) -> None:
    """Raise TypeError/ValueError for head outputs that no loss accepts."""
    for name, h in (("h_chosen", h_chosen), ("h_rejected", h_rejected)):
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
        if h.dtype not in DTYPES:
            raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {h.dtype}")
    if h_chosen.dtype != h_rejected.dtype:
        raise TypeError(f"h_chosen and h_rejected must have the same dtype, got {h_chosen.dtype} and "
                        f"{h_rejected.dtype}")
    for name, h in (("h_chosen", h_chosen), ("h_rejected", h_rejected)):
        if h.dim() != 2:
            raise ValueError(f"{name} must have shape [B, N] (2 dimensions), got shape {_shape(h)}")
    if h_chosen.shape != h_rejected.shape:
        raise ValueError(f"h_chosen and h_rejected must have the same shape, got {_shape(h_chosen)} and "
                         f"{_shape(h_rejected)}")
    if h_chosen.shape[1] < 1:
        raise ValueError(f"h_chosen must have N >= 1 outputs (shape [B, N]), got shape {_shape(h_chosen)}")
    if h_chosen.device != h_rejected.device:
        raise ValueError(f"h_chosen and h_rejected must be on the same device, got {h_chosen.device} and "
                         f"{h_rejected.device}")


def check_paper_hyperparameters(kappa, lam, margin) -> None:
    """Raise TypeError/ValueError for hyper-parameters the paper loss does not accept (numbers
    print as C++ prints them, which is Python's `:g`)."""
    kappa, lam, margin = _hyper("kappa", kappa), _hyper("lam", lam), _hyper("margin", margin)
    # Chained comparisons rather than math.isfinite, which torch.compile cannot trace when it
    # treats a float as symbolic; NaN fails every comparison.
    if not 0 < kappa < math.inf:
        raise ValueError(f"kappa must be finite and > 0, got {kappa:g}")
    if not 0 <= lam < math.inf:
        raise ValueError(f"lam must be finite and >= 0, got {lam:g}")
    if not -math.inf < margin < math.inf:
        raise ValueError(f"margin must be finite, got {margin:g}")


def check_reduction(reduction, h_chosen) -> None:
    """Raise ValueError for a reduction no loss knows, and for the mean of no pairs."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got '{reduction}'")
    if reduction == "mean" and h_chosen.shape[0] == 0:
        raise ValueError("h_chosen must have B >= 1 pairs for reduction='mean' (the mean of no pairs is "
                         f"undefined), got shape {_shape(h_chosen)}")


def _device_types(op: str) -> frozenset:
    if _C is None or not hasattr(torch.ops.minqr, op):
        return frozenset()
    overload = getattr(torch.ops.minqr, op).default
    return frozenset(device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if overload.has_kernel_for_dispatch_key(key))


# op -> the device types minqr._C has kernels for: {"cpu"}, plus "cuda" when it was built with
# nvcc. Plain frozensets so that torch.compile reads them as constants.
DEVICE_TYPES = {op: _device_types(op) for op in OPS}


def fused_available() -> bool:
    """Whether the compiled ops minqr._C are built and loaded (their CPU kernels at least)."""
    return _C is not None


def fused_unavailable_reason(op: str, device: torch.device):
    """Why `op` cannot run fused on `device` (a sentence), or None when it can."""
    if _C is None:
        return (f"the fused loss kernels minqr._C are not built ({IMPORT_ERROR}); build them with "
                "`pip install --no-build-isolation -e .`")
    if device.type not in DEVICE_TYPES[op]:
        return f"minqr._C has no {op} kernel for device type '{device.type}'"
    return None


def _fake_loss(op: str):
    """The op's fake kernel: output shapes for torch.compile and opcheck, with the same checks."""

    def fake(h_chosen, h_rejected, *rest):
        *hyper, reduction, compute_grad = rest
        check_outputs(h_chosen, h_rejected)
        if op == "paper_loss":
            check_paper_hyperparameters(*hyper)
        check_reduction(reduction, h_chosen)
        acc_dtype = torch.float64 if h_chosen.dtype == torch.float64 else torch.float32
        loss_shape = h_chosen.shape[:1] if reduction == "none" else ()
        loss = h_chosen.new_empty(loss_shape, dtype=acc_dtype)
        grad_shape = h_chosen.shape if compute_grad else (0,)
        return loss, h_chosen.new_empty(grad_shape), h_chosen.new_empty(grad_shape)

    return fake


def _fake_loss_backward(grad_loss, grad_chosen, grad_rejected, reduction):
    # csrc/ops.cpp's check_loss_backward: only csrc/autograd.cpp calls this op
    if reduction not in REDUCTIONS or grad_loss.dim() != (1 if reduction == "none" else 0):
        raise RuntimeError(f"minqr::loss_backward expects grad_loss ([B] for reduction='none', [] otherwise), "
                           f"got shape {_shape(grad_loss)} and reduction='{reduction}'")
    # the kernels return contiguous gradients whatever the saved ones' strides (csrc/ops.h)
    return (torch.empty_like(grad_chosen, memory_format=torch.contiguous_format),
            torch.empty_like(grad_rejected, memory_format=torch.contiguous_format))


if _C is not None:
    for _op in OPS:
        torch.library.register_fake(f"minqr::{_op}")(_fake_loss(_op))
    torch.library.register_fake("minqr::loss_backward")(_fake_loss_backward)
