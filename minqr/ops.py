"""The fused loss op: loads minqr._C (csrc/) and registers what the C++ side leaves to Python.

The schema is declared once in C++ (csrc/qr_loss_op.cpp), with a CPU and a CUDA kernel:

    torch.ops.minqr.qr_pairwise_loss(q_chosen, q_rejected, kappa, lam, margin, compute_grad)
        -> (loss [B], grad_chosen [B, N], grad_rejected [B, N])

One pass computes each pair's loss (float32, or float64 for float64 inputs) and, with
compute_grad, the gradient of that pair's loss with respect to its own quantiles (in the input
dtype; [0]-shaped when compute_grad is false). The backward registered here scales those rows by
grad_output: no second pass over the N x N differences (csrc/qr_loss_cpu.cpp has the measurement).

This module also holds check_loss_args, the one argument check that every implementation runs:
minqr.loss (reference and dispatch), the fake kernel below, and its C++ twin in the kernels.
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


def _shape(q: torch.Tensor) -> str:
    return str(list(q.shape))  # "[B, N]", as C++ prints sizes


def _hyper(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_loss_args(q_chosen, q_rejected, kappa, lam, margin) -> None:
    """Raise TypeError/ValueError for arguments the loss does not accept.

    The messages are those of check_loss_args in csrc/qr_loss_op.cpp, word for word (numbers
    print as C++ prints them, which is Python's `:g`).
    """
    for name, q in (("q_chosen", q_chosen), ("q_rejected", q_rejected)):
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(q).__name__}")
        if q.dtype not in DTYPES:
            raise TypeError(
                f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {q.dtype}"
            )
    if q_chosen.dtype != q_rejected.dtype:
        raise TypeError(
            "q_chosen and q_rejected must have the same dtype, "
            f"got {q_chosen.dtype} and {q_rejected.dtype}"
        )
    for name, q in (("q_chosen", q_chosen), ("q_rejected", q_rejected)):
        if q.dim() != 2:
            raise ValueError(f"{name} must have shape [B, N] (2 dimensions), got shape {_shape(q)}")
    if q_chosen.shape != q_rejected.shape:
        raise ValueError(
            "q_chosen and q_rejected must have the same shape, "
            f"got {_shape(q_chosen)} and {_shape(q_rejected)}"
        )
    if q_chosen.shape[1] < 1:
        raise ValueError(
            f"q_chosen must have N >= 1 quantiles (shape [B, N]), got shape {_shape(q_chosen)}"
        )
    if q_chosen.device != q_rejected.device:
        raise ValueError(
            "q_chosen and q_rejected must be on the same device, "
            f"got {q_chosen.device} and {q_rejected.device}"
        )
    kappa, lam, margin = _hyper("kappa", kappa), _hyper("lam", lam), _hyper("margin", margin)
    # Chained comparisons rather than math.isfinite, which torch.compile cannot trace when it
    # treats a float as symbolic; NaN fails every comparison.
    if not 0 < kappa < math.inf:
        raise ValueError(f"kappa must be finite and > 0, got {kappa:g}")
    if not 0 <= lam < math.inf:
        raise ValueError(f"lam must be finite and >= 0, got {lam:g}")
    if not -math.inf < margin < math.inf:
        raise ValueError(f"margin must be finite, got {margin:g}")


def _device_types() -> frozenset:
    if _C is None:
        return frozenset()
    op = torch.ops.minqr.qr_pairwise_loss.default
    return frozenset(
        device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if op.has_kernel_for_dispatch_key(key)
    )


# The device types minqr._C has kernels for: {"cpu"}, plus "cuda" when it was built with nvcc.
# A plain frozenset so that torch.compile reads it as a constant.
DEVICE_TYPES = _device_types()


if _C is not None:

    @torch.library.register_fake("minqr::qr_pairwise_loss")
    def _qr_pairwise_loss_fake(q_chosen, q_rejected, kappa, lam, margin, compute_grad):
        check_loss_args(q_chosen, q_rejected, kappa, lam, margin)
        acc_dtype = torch.float64 if q_chosen.dtype == torch.float64 else torch.float32
        loss = q_chosen.new_empty(q_chosen.shape[0], dtype=acc_dtype)
        grad_shape = q_chosen.shape if compute_grad else (0,)
        return loss, q_chosen.new_empty(grad_shape), q_chosen.new_empty(grad_shape)

    def _setup_context(ctx, inputs, output):
        _, grad_chosen, grad_rejected = output
        ctx.compute_grad = inputs[5]
        ctx.save_for_backward(grad_chosen, grad_rejected)
        ctx.mark_non_differentiable(grad_chosen, grad_rejected)

    def _backward(ctx, grad_loss, _grad_of_grad_chosen, _grad_of_grad_rejected):
        if not ctx.compute_grad:
            raise RuntimeError(
                "minqr::qr_pairwise_loss ran with compute_grad=False, so it has no gradient to "
                "give backward; call it with compute_grad=True when the inputs require grad "
                "(minqr.qr_pairwise_loss does)"
            )
        if torch.is_grad_enabled():
            # backward(create_graph=True): the saved gradients are constants here, so a second
            # derivative through them would come out as zero instead of failing. Refuse instead.
            raise RuntimeError(
                "minqr::qr_pairwise_loss has no second derivative (its backward scales gradients "
                "saved by the forward); for create_graph=True use qr_pairwise_loss(..., "
                "impl='reference')"
            )
        grad_chosen, grad_rejected = ctx.saved_tensors
        # grad_loss is float32 (or float64): scale in that precision, round to the input dtype once.
        scale = grad_loss.unsqueeze(1)
        return (
            (grad_chosen * scale).to(grad_chosen.dtype),
            (grad_rejected * scale).to(grad_rejected.dtype),
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd(
        "minqr::qr_pairwise_loss", _backward, setup_context=_setup_context
    )
